"""Expert (teacher) trajectories: train them, store them, serve windows.

Layout of an expert directory:

  metadata.json                what the experts are (dataset, model, schedule)
  expert_0003/epoch_0012.npz   one snapshot per epoch (0 = initialisation)
  expert_0003/progress.json    per snapshot: CRC32 of its arrays, file size,
                               test accuracy, loss

A snapshot counts only once its file has been atomically renamed into place
*and* progress.json records its checksum, so a kill at any moment leaves either
a complete snapshot or one that is recomputed. Distillation reads two snapshots
(t and t+M) per trajectory through `TrajectoryStore.load`, never whole
trajectories.

Why not Orbax here (the distillation state does use it): an expert belongs to
one process, and Orbax 0.12 cannot write process-local data in a
multi-process job (its numpy writer writes only on process 0 and its array
writer refuses fully addressable arrays). A per-snapshot npz is also ~14x
faster to read than an Orbax restore (0.6 ms vs 8 ms for a digits ConvNet),
which matters on GPUs where a distillation step reads 2 x T snapshots.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import zlib
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from seqmatch_jax import files
from seqmatch_jax import parallel
from seqmatch_jax import training
from seqmatch_jax.errors import CheckpointError
from seqmatch_jax.models import Network

FORMAT_VERSION = 2  # 1: Orbax snapshots (first release)
_SNAPSHOT_NAME = re.compile(r'epoch_(\d+)\.npz')
InitFn = Callable[[int, jax.Array], tuple[Any, Any]]


def tree_crc32(tree: Any) -> int:
  """Checksum of a pytree's array bytes: detects truncated or altered snapshots."""
  crc = 0
  for leaf in jax.tree.leaves(tree):
    crc = zlib.crc32(np.ascontiguousarray(np.asarray(leaf)).tobytes(), crc)
  return crc


def _write_json(path: str, obj: Any) -> None:
  files.write_json(path, obj, indent=1, sort_keys=True)


def _read_json(path: str, fix: str, required: Sequence[str] = ()) -> dict:
  """Reads a JSON object this module wrote, checking it has `required` keys.

  Only outside damage (a disk or copy error, a hand edit) can spoil these
  atomically written files; it becomes one CheckpointError naming the file and
  `fix` rather than a JSONDecodeError traceback.
  """
  try:
    with open(path) as f:
      obj = json.load(f)
    problem = None
    if not isinstance(obj, dict):
      problem = f'holds a {type(obj).__name__}, not a JSON object'
    elif any(k not in obj for k in required):
      problem = f'lacks {", ".join(k for k in required if k not in obj)}'
  except OSError as e:
    problem = f'cannot be read ({e.strerror or e})'
  except ValueError as e:  # bad JSON or bad UTF-8
    problem = f'is damaged (not valid JSON: {str(e).splitlines()[0]})'
  if problem is not None:
    raise CheckpointError(f'{path} {problem}; {fix}')
  return obj


def _rebuild_mode(directory: str) -> str:
  """The mode that (re)trains the experts in `directory`: SeqMatch's staged
  experts are built while distilling, the real-data ones in mode=experts."""
  return 'distill' if 'experts_staged' in directory else 'experts'


def _metadata_fix(directory: str) -> str:
  """How to rebuild a damaged metadata.json."""
  return (f'delete it and rerun with --config.mode={_rebuild_mode(directory)}, '
          'which rewrites it and reuses the stored snapshots (delete the '
          'whole directory instead if they may come from other settings)')


def _flatten(item: dict) -> dict[str, np.ndarray]:
  """{'params': {...}, ...} -> {'params/conv0/kernel': array, ...}."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(item)[0]:
    out['/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)] = (
        np.asarray(leaf))
  return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
  item: dict = {}
  for name, value in flat.items():
    node = item
    *parents, leaf = name.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return item


def _to_numpy(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)


class TrajectoryStore:
  """Read access to a directory of expert trajectories.

  Example:
    store = TrajectoryStore('runs/c10/experts')
    start, target = store.load(7, 12), store.load(7, 14)
  """

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    meta_path = os.path.join(self.path, 'metadata.json')
    if not os.path.exists(meta_path):
      raise CheckpointError(
          f'No expert trajectories at {self.path} (metadata.json missing): run '
          'with --config.mode=experts first, or point --config.experts.dir at '
          'an existing expert directory.')
    self.metadata = _read_json(meta_path, _metadata_fix(self.path),
                               required=('epochs',))
    self.epochs = int(self.metadata['epochs'])

  def expert_dir(self, expert: int) -> str:
    return os.path.join(self.path, f'expert_{expert:04d}')

  def progress_path(self, expert: int) -> str:
    return os.path.join(self.expert_dir(expert), 'progress.json')

  def progress(self, expert: int) -> dict:
    """The expert's snapshot records; damage is an error, never an empty
    record (that would silently drop a finished expert from `experts()`)."""
    path = self.progress_path(expert)
    if not os.path.exists(path):
      return {'snapshots': {}}
    return _read_json(
        path, f'rerun with --config.mode={_rebuild_mode(self.path)} to '
        f'retrain expert {expert} '
        f'(or delete {self.expert_dir(expert)})', required=('snapshots',))

  def complete_epochs(self, expert: int) -> int:
    """Number of consecutive recorded snapshots from epoch 0 (-1 if none)."""
    snaps = self.progress(expert)['snapshots']
    e = -1
    while str(e + 1) in snaps:
      e += 1
    return e

  def experts(self) -> list[int]:
    """Experts whose whole trajectory (epochs + 1 snapshots) is recorded."""
    out = []
    for name in sorted(os.listdir(self.path)):
      if name.startswith('expert_'):
        i = int(name.split('_')[1])
        if self.complete_epochs(i) >= self.epochs:
          out.append(i)
    return out

  def snapshot_path(self, expert: int, epoch: int) -> str:
    return os.path.join(self.expert_dir(expert), f'epoch_{epoch:04d}.npz')

  def read_snapshot(self, expert: int, epoch: int) -> dict:
    """The raw snapshot {'params', 'state'?, 'opt_state'?}, checked against
    its recorded CRC."""
    record = self.progress(expert)['snapshots'].get(str(epoch))
    if record is None:
      raise CheckpointError(
          f'Expert {expert} has no recorded snapshot for epoch {epoch} in '
          f'{self.path}; rerun mode=experts to complete it.')
    path = self.snapshot_path(expert, epoch)
    try:
      with np.load(path, allow_pickle=False) as f:
        item = _unflatten({k: f[k] for k in f.files})
    except Exception as e:  # missing, truncated or garbled file
      raise CheckpointError(
          f'Snapshot {epoch} of expert {expert} ({path}) is unreadable '
          f'({type(e).__name__}); delete that file and rerun mode=experts to '
          'recompute the expert from there.') from e
    if tree_crc32(item) != record['crc']:
      raise CheckpointError(
          f'Snapshot {epoch} of expert {expert} ({path}) fails its checksum; '
          'delete that file and rerun mode=experts to recompute the expert '
          'from there.')
    return item

  def load(self, expert: int, epoch: int, with_state: bool = False):
    """Parameters of `expert` after `epoch` epochs, checked against their CRC."""
    item = self.read_snapshot(expert, epoch)
    return (item['params'], item.get('state', {})) if with_state else item['params']

  def test_accuracy(self, expert: int) -> dict[int, float]:
    snaps = self.progress(expert)['snapshots']
    return {int(k): v['test_acc'] for k, v in snaps.items() if 'test_acc' in v}


@dataclasses.dataclass(frozen=True)
class ExpertSpec:
  num: int
  epochs: int
  lr: float
  momentum: float
  batch_size: int
  augment: str
  per_batch: int  # experts trained together; 0 = per backend
  optimizer: str = 'sgd'  # sgd | gsam (FTD's flat experts)
  rho: float = 0.0  # GSAM's ascent radius (gsam only)
  alpha: float = 0.0  # GSAM's surrogate-gap weight (gsam only)

  def sgd_spec(self) -> training.SGDSpec:
    """The shared loop's spec: torch SGD, with GSAM's two passes when asked."""
    return training.SGDSpec(
        batch_size=self.batch_size, momentum=self.momentum, augment=self.augment,
        gsam=(self.rho, self.alpha) if self.optimizer == 'gsam' else None)

  def record(self) -> dict:
    """What metadata.json says about the optimiser: an SGD expert directory
    must never be reused for GSAM (or for another rho / alpha)."""
    if self.optimizer == 'sgd':
      return dict(optimizer='sgd')
    return dict(optimizer=self.optimizer, rho=self.rho, alpha=self.alpha)


def spec_from_config(config, epochs: int) -> ExpertSpec:
  """Real-data experts (epochs = experts.epochs) and SeqMatch's staged ones
  (experts.staged_epochs) share every other setting, the optimiser included."""
  e = config.experts
  return ExpertSpec(num=e.num, epochs=epochs, lr=e.lr, momentum=e.momentum,
                    batch_size=e.batch_size, augment=config.augment.strategy,
                    per_batch=e.per_batch, optimizer=e.optimizer,
                    rho=float(e.rho), alpha=float(e.alpha))


def resolve_per_batch(per_batch: int, num: int) -> int:
  """Default: 1 on CPU (vmap over models loses there), else 8 per device."""
  if per_batch > 0:
    return min(per_batch, num)
  if jax.default_backend() == 'cpu':
    return 1
  return min(8 * jax.local_device_count(), num)


def _check_metadata(path: str, metadata: dict) -> None:
  """An existing expert directory must describe the same experts."""
  meta_path = os.path.join(path, 'metadata.json')
  if not os.path.exists(meta_path):
    return
  old = _read_json(meta_path, _metadata_fix(path))
  if old.get('format', 1) != FORMAT_VERSION:
    raise CheckpointError(
        f'Expert directory {path} was written in storage format '
        f'{old.get("format", 1)} (this version reads {FORMAT_VERSION}); delete it '
        'to retrain the experts, or use another --config.experts.dir.')
  keys = ('dataset', 'image_shape', 'num_classes', 'model', 'zca', 'epochs',
          'lr', 'momentum', 'batch_size', 'augment', 'start', 'seed', 'val_size',
          'stage_lrs', 'stages_crc', 'optimizer', 'rho', 'alpha')
  # Directories written before the optimiser was recorded hold SGD experts.
  old = dict({'optimizer': 'sgd'}, **old)
  diff = [k for k in keys if old.get(k) != metadata.get(k)]
  if diff:
    raise CheckpointError(
        f'Expert directory {path} holds experts with different settings '
        f'({", ".join(f"{k}: {old.get(k)!r} != {metadata.get(k)!r}" for k in diff)}); '
        'use another --config.experts.dir or delete it.')


def train_experts(network: Network, spec: ExpertSpec, path: str,
                  images: jax.Array, labels: jax.Array,
                  test_images: jax.Array, test_labels: jax.Array,
                  key: jax.Array, metadata: dict,
                  init_fn: InitFn | None = None,
                  expert_ids: Sequence[int] | None = None,
                  should_stop: Callable[[], bool] = lambda: False,
                  writer=None, mesh=None, progress: bool = True) -> TrajectoryStore:
  """Trains (or finishes training) `spec.num` experts, saving every epoch.

  Args:
    init_fn: (expert index, key) -> (params, state) for the starting weights;
      default a fresh `network.init`. SeqMatch passes networks pre-trained on
      the earlier synthetic subsets.
    expert_ids: train only these; in a multi-process run each process passes
      its `parallel.process_share` and the others train the rest.
    should_stop: polled between epochs; when true, returns after saving.
    mesh: with several devices, a vmapped group is sharded over them (this
      process's own devices: `parallel.model_mesh`).
  Returns:
    The store over `path`.
  """
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  metadata = dict(metadata, format=FORMAT_VERSION, epochs=spec.epochs,
                  num_experts=spec.num, lr=spec.lr, momentum=spec.momentum,
                  batch_size=spec.batch_size, augment=spec.augment,
                  **spec.record())
  _check_metadata(path, metadata)
  parallel.main_only(lambda: _write_json(os.path.join(path, 'metadata.json'),
                                         metadata), f'expert metadata {path}')
  store = TrajectoryStore(path)
  sgd = spec.sgd_spec()
  keep_opt = spec.momentum != 0.0
  init_fn = init_fn or (lambda i, k: network.init(k))
  ids = list(range(spec.num)) if expert_ids is None else list(expert_ids)
  for i in ids:
    _drop_damaged(store, i)
  todo = [i for i in ids if store.complete_epochs(i) < spec.epochs]
  group = resolve_per_batch(spec.per_batch, spec.num)
  epoch_fn = _epoch_fn(network, sgd, group, mesh)
  acc_fn = jax.jit(lambda p, s: training.predict_accuracy(
      network, p, s, test_images, test_labels))
  lr = jnp.float32(spec.lr)
  bar = tqdm.tqdm(total=len(ids) * spec.epochs, disable=not progress or not todo,
                  initial=sum(max(store.complete_epochs(i), 0) for i in ids),
                  desc='expert epochs', dynamic_ncols=True)

  for g0 in range(0, len(todo), group):
    members = todo[g0:g0 + group]
    params, state, opt_state, epoch = _resume_group(
        store, members, network, sgd, key, init_fn, keep_opt)
    while epoch < spec.epochs:
      if should_stop():
        bar.close()
        return store
      t0 = time.time()
      keys = jnp.stack([jax.random.fold_in(_train_key(key, i), epoch) for i in members])
      params, state, opt_state, loss = epoch_fn(
          params, state, opt_state, images, labels, keys, lr)
      epoch += 1
      accs = []
      for j, i in enumerate(members):
        p, s, o = jax.tree.map(lambda a, j=j: a[j], (params, state, opt_state))
        acc = float(acc_fn(p, s))
        accs.append(acc)
        _save_snapshot(store, i, epoch, p, s, o if keep_opt else None,
                       test_acc=acc, loss=float(loss[j]))
      logging.info('experts %s epoch %d/%d: test acc %s (%.1fs)', members, epoch,
                   spec.epochs, ' '.join(f'{a:.3f}' for a in accs), time.time() - t0)
      if writer is not None:
        for j, i in enumerate(members):
          writer.add_scalar(f'experts/test_acc/{i}', accs[j], epoch)
      bar.update(len(members))
      bar.set_postfix(test_acc=f'{np.mean(accs):.3f}')
  bar.close()
  return store


def _train_key(key: jax.Array, expert: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(key, expert), 1)


def _init_key(key: jax.Array, expert: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(key, expert), 0)


def _epoch_fn(network: Network, sgd: training.SGDSpec, group: int, mesh=None):
  """One epoch for a group of experts: vmapped (sharded over `mesh`) when the
  group has several, else one compiled single-expert program."""
  def one(params, state, opt_state, key, images, labels, lr):
    return training.run_epoch(network, sgd, params, state, opt_state, images,
                              labels, key, lr)
  mapped = parallel.map_models(one, 4, 'vmap' if group > 1 else 'sequential', mesh)
  return lambda p, s, o, images, labels, keys, lr: mapped(p, s, o, keys, images,
                                                          labels, lr)


def _indexed_leaves(tree) -> dict:
  """Leaves by index: Orbax restores plain containers, not optax's tuples."""
  return {f'{i:04d}': np.asarray(leaf) for i, leaf in enumerate(jax.tree.leaves(tree))}


def _snapshot_bytes(store: TrajectoryStore, expert: int, epoch: int) -> int:
  """Size of a snapshot's file (-1 if missing): a cheap check for truncation."""
  path = store.snapshot_path(expert, epoch)
  return os.path.getsize(path) if os.path.exists(path) else -1


def _drop_damaged(store: TrajectoryStore, expert: int) -> None:
  """Forgets every snapshot from the first one whose file changed size (a
  truncated or missing file) on, so training recomputes them. Costs a `stat`
  per file; the CRC in `load` catches damage that keeps the size."""
  try:
    snaps = store.progress(expert)['snapshots']
  except CheckpointError as err:  # training is the fix: start the expert over
    try:
      os.remove(store.progress_path(expert))
    except OSError:
      raise err from None  # not even removable: the user has to look
    logging.warning('%s was damaged: retraining expert %d from scratch',
                    store.progress_path(expert), expert)
    _forget_from(store, expert, 0)
    return
  for e in range(store.complete_epochs(expert) + 1):
    if snaps[str(e)].get('bytes') != _snapshot_bytes(store, expert, e):
      logging.warning('expert %d snapshot %d is damaged: recomputing from there',
                      expert, e)
      _forget_from(store, expert, e)
      return


def _save_snapshot(store: TrajectoryStore, expert: int, epoch: int, params, state,
                   opt_state, **stats) -> None:
  item = {'params': _to_numpy(params)}
  if state:
    item['state'] = _to_numpy(state)
  if opt_state is not None:
    item['opt_state'] = _indexed_leaves(opt_state)
  path = store.snapshot_path(expert, epoch)
  files.write_npz(path, **_flatten(item))  # a stale file is replaced whole
  progress = store.progress(expert)
  progress['snapshots'][str(epoch)] = dict(
      crc=tree_crc32(item), bytes=_snapshot_bytes(store, expert, epoch), **stats)
  _write_json(os.path.join(store.expert_dir(expert), 'progress.json'), progress)


def _restore_valid(store: TrajectoryStore, expert: int, keep_opt: bool):
  """Latest snapshot that reads and passes its checksum; drops the rest."""
  e = store.complete_epochs(expert)
  while e >= 0:
    try:
      item = store.read_snapshot(expert, e)
      if not keep_opt or 'opt_state' in item:
        return e, item
      logging.warning('expert %d snapshot %d lacks optimizer state: recomputing',
                      expert, e)
    except CheckpointError as err:  # damaged: recompute from the previous one
      logging.warning('%s', err)
    _forget_from(store, expert, e)
    e -= 1
  return -1, None


def _forget_from(store: TrajectoryStore, expert: int, epoch: int) -> None:
  progress = store.progress(expert)
  progress['snapshots'] = {k: v for k, v in progress['snapshots'].items()
                           if int(k) < epoch}
  _write_json(os.path.join(store.expert_dir(expert), 'progress.json'), progress)
  for name in os.listdir(store.expert_dir(expert)):
    m = _SNAPSHOT_NAME.fullmatch(name)
    # Also temporary files a killed write left behind (only this expert's
    # owner trains it, so none of them is being written now).
    if (m and int(m.group(1)) >= epoch) or name.endswith('.tmp.npz'):
      os.remove(os.path.join(store.expert_dir(expert), name))


def _resume_group(store, members, network, sgd, key, init_fn, keep_opt):
  """Common restart point of a group: the earliest last-valid snapshot."""
  found = [_restore_valid(store, i, keep_opt) for i in members]
  epoch = min(e for e, _ in found)
  items = []
  for i, (e, item) in zip(members, found):
    if epoch < 0:
      params, state = init_fn(i, _init_key(key, i))
      opt = sgd.transform().init(params) if keep_opt else None
      item = {'params': _to_numpy(params), 'state': _to_numpy(state)}
      if keep_opt:
        item['opt_state'] = _indexed_leaves(opt)
      _save_snapshot(store, i, 0, params, state, opt)
    elif e > epoch:
      item = store.read_snapshot(i, epoch)
    items.append(item)
  epoch = max(epoch, 0)
  params = jax.tree.map(lambda *x: jnp.stack(x), *[it['params'] for it in items])
  state = jax.tree.map(lambda *x: jnp.stack(x), *[it.get('state', {}) for it in items])
  if keep_opt:
    structure = jax.tree.structure(sgd.transform().init(items[0]['params']))
    opt_state = jax.tree.unflatten(structure, [
        jnp.stack([it['opt_state'][k] for it in items])
        for k in sorted(items[0]['opt_state'])])
  else:
    opt_state = jax.vmap(sgd.transform().init)(params)
  return params, state, opt_state, epoch
