"""The whole job: experts -> SeqMatch distillation -> evaluation, by `mode`.

`run(config, workdir)` is what `main.py` calls and what a notebook can call.
Every stage is resumable from the workdir: rerunning the same command skips
finished work and continues unfinished work where its checkpoint left it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
import zlib
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from seqmatch_jax import backbones
from seqmatch_jax import config_lib
from seqmatch_jax import configuration
from seqmatch_jax import data as data_lib
from seqmatch_jax import evaluate as evaluate_lib
from seqmatch_jax import experts as experts_lib
from seqmatch_jax import files
from seqmatch_jax import parallel
from seqmatch_jax import seqmatch
from seqmatch_jax import synthetic
from seqmatch_jax import visualize
from seqmatch_jax.errors import ConfigError, Interrupted
from seqmatch_jax.models import Network, check_image_size, check_normalization
from seqmatch_jax.models import create_network


@dataclasses.dataclass
class PreparedData:
  """A dataset in model space (normalised / ZCA-whitened), ready to train on."""
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  x_train: jax.Array
  y_train: jax.Array
  x_val: jax.Array
  y_val: jax.Array
  x_test: jax.Array
  y_test: jax.Array
  preprocessor: Any


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> PreparedData:
  ds = data_lib.load_dataset(config.dataset.name, config.dataset.data_dir or None)
  ds, (x_val, y_val) = data_lib.split_validation(ds, config.dataset.val_size,
                                                 config.seed)
  cache = config.dataset.cache_dir or os.path.join(workdir, 'cache')
  pre = data_lib.fit_preprocessor(ds, config.dataset.zca, cache_dir=cache)
  to = lambda x: jnp.asarray(pre.to_model(np.asarray(x, np.float32)), jnp.float32)
  return PreparedData(
      name=ds.name, num_classes=ds.num_classes, image_shape=ds.image_shape,
      class_names=ds.class_names, x_train=to(ds.x_train),
      y_train=jnp.asarray(ds.y_train, jnp.int32), x_val=to(x_val),
      y_val=jnp.asarray(y_val, jnp.int32), x_test=to(ds.x_test),
      y_test=jnp.asarray(ds.y_test, jnp.int32), preprocessor=pre)


class StopFlag:
  """Set by SIGTERM/SIGINT; long loops poll it, save, and stop cleanly.

  The first signal asks for a clean stop: distillation saves its state at the
  next iteration, expert training at the next epoch, an evaluation keeps its
  finished models and stops before the next one; then `Interrupted` (exit
  130). A second signal means "now": one line on stderr and exit 130 at once,
  without a traceback and without saving the current step (what was saved
  stays intact: Orbax finalises a checkpoint by renaming its step directory,
  and our files are written to a temporary name and renamed, so a kill leaves
  the previous version). It is noticed by a watcher thread through the
  signal wakeup fd, so it works even while the main thread is inside a long
  compiled call (where a Python handler would only run after it, and a
  KeyboardInterrupt raised there would surface in a JAX callback).

  That hard exit is for the command line (`exit_on_second=True`, main.py): in
  a notebook it would kill the kernel, so there a second signal raises
  KeyboardInterrupt in the main thread instead.
  """

  def __init__(self, exit_on_second: bool = False):
    self.raised = False
    self.exit_on_second = exit_on_second
    self._signals = 0
    self._lock = threading.Lock()

  def __call__(self) -> bool:
    return self.raised

  def _raise(self, signum: int) -> None:
    with self._lock:
      first, self.raised = not self.raised, True
    if first:
      logging.warning('signal %d: finishing the current step (or model), saving, '
                      'stopping; a second signal stops at once', signum)

  def _count(self, signum: int) -> None:
    with self._lock:
      self._signals += 1
      second = self._signals >= 2
    if second:
      _exit_now(signum)
    self._raise(signum)

  @contextlib.contextmanager
  def installed(self):
    # With exit_on_second, every SIGINT/SIGTERM writes its number to the
    # wakeup fd from the C-level handler, at once; the watcher thread counts
    # them there. The Python-level handler (run by the main thread between
    # bytecodes, possibly much later) then only sets the flag.
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def watch():
      while True:
        try:
          got = os.read(read_fd, 16)
        except OSError:
          return
        if not got:
          return
        for signum in got:
          if signum in (signal.SIGINT, signal.SIGTERM):
            self._count(signum)

    def handler(signum, frame):
      del frame
      if self.raised and not self.exit_on_second:
        raise KeyboardInterrupt  # a library caller's second Ctrl-C
      self._raise(signum)
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    watcher = None
    if self.exit_on_second:
      old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
      watcher = threading.Thread(target=watch, name='stop-watcher', daemon=True)
      watcher.start()
    try:
      yield self
    finally:
      if watcher is not None:
        signal.set_wakeup_fd(old_fd)
      # A stop on the command line ends the process: a second signal while it
      # unwinds and shuts down (e.g. inside an atexit handler of JAX, once the
      # state is saved) still exits at once with its one line, not with a
      # KeyboardInterrupt traceback.
      late = self.exit_on_second and self.raised
      for s, h in old.items():
        signal.signal(s, (lambda signum, frame: _exit_now(signum)) if late else h)
      os.close(write_fd)  # the watcher reads EOF and ends
      if watcher is not None:
        watcher.join(timeout=5)
      os.close(read_fd)


def _exit_now(signum: int) -> None:
  """The second signal: one line, exit 130 now (no save, no traceback)."""
  for bar in list(getattr(tqdm.tqdm, '_instances', ())):
    bar.leave = True
    bar.close()  # end a progress bar's unfinished line
  print(f'second signal ({signum}): stopping now without saving the current '
        'step; rerun the same command to resume from the last save.',
        file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(130)  # pylint: disable=protected-access


def _writer(workdir: str):
  if not parallel.is_main_process():
    return None
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  return SummaryWriter(os.path.join(workdir, 'tensorboard'))


def expert_metadata(config, data: PreparedData) -> dict:
  return dict(dataset=data.name, image_shape=list(data.image_shape),
              num_classes=data.num_classes, zca=bool(config.dataset.zca),
              seed=config.seed, start='init',
              model=dict(name=config.model.name, width=config.model.width,
                         depth=config.model.depth, norm=config.model.norm),
              val_size=config.dataset.val_size)


def experts_dir(config, workdir: str) -> str:
  return os.path.abspath(os.path.expanduser(config.experts.dir or
                                            os.path.join(workdir, 'experts')))


def run(config: ml_collections.ConfigDict, workdir: str, *,
        exit_on_second_signal: bool = False) -> dict | None:
  """Validates, then runs the stages `config.mode` asks for.

  A SIGINT/SIGTERM stops it cleanly (`Interrupted`, see `StopFlag`); with
  `exit_on_second_signal` (the command line) a second one exits the process
  at once with status 130.
  """
  configuration.validate(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))  # Orbax needs absolute paths
  stop = StopFlag(exit_on_second=exit_on_second_signal)
  # Installed before anything slow or distributed: a signal during start-up
  # (data preparation, jax.distributed's connect) is kept, and honoured at the
  # first safe point, instead of killing or being swallowed.
  with stop.installed():
    return _run_stages(config, workdir, stop)


def _run_stages(config, workdir: str, stop: StopFlag) -> dict | None:
  parallel.maybe_initialize_distributed(
      config.parallel.distributed, config.parallel.coordinator_address,
      config.parallel.num_processes, config.parallel.process_id)
  if not parallel.is_main_process():
    logging.set_verbosity(logging.WARNING)  # process 0 alone logs progress
  os.makedirs(workdir, exist_ok=True)
  data = prepare_data(config, workdir)
  check_image_size(config.model.name, data.image_shape, config.model.depth)
  check_networks(config, data)
  check_data(config, data)
  if config.mode in ('all', 'distill'):
    for tag, cfg in distillation_runs(config):
      seqmatch.check_finished_work(cfg, os.path.join(workdir, tag))
  # Only now is the run known to start: a refused run leaves config.json alone.
  parallel.main_only(lambda: write_config(config, workdir), 'config.json')
  network = network_for(config, config.model.name, data.num_classes,
                        data.image_shape)
  key = jax.random.key(config.seed)
  writer = _writer(workdir)
  results = None
  try:
    needs_experts = backbones.backbone_class(config.backbone.name).needs_experts
    if config.mode in ('all', 'experts') and needs_experts:
      train_real_experts(config, workdir, data, network, key, stop, writer)
    elif config.mode == 'experts':
      logging.info('backbone %s trains no experts: nothing to do',
                   config.backbone.name)
    if config.mode in ('all', 'distill'):
      distill(config, workdir, data, network, key, stop, writer)
    if config.mode in ('all', 'evaluate'):
      results = evaluate(config, workdir, data, key, stop)
  finally:
    if writer is not None:
      writer.close()
  return results


def check_networks(config, data: PreparedData) -> None:
  """Refuses, before any training, a distillation model or evaluation
  architecture whose instance norm would see 1x1 maps on these images (it
  would train at chance; `models.check_normalization`)."""
  shape = tuple(data.image_shape)
  check_normalization(
      network_for(config, config.model.name, data.num_classes, shape),
      f'model.name={config.model.name}',
      'Set --config.model.norm=batch (or layer, none), or use larger images.')
  if config.mode not in ('all', 'evaluate'):
    return
  for arch in config.eval.architectures:
    if arch != config.model.name:
      check_normalization(
          network_for(config, arch, data.num_classes, shape),
          f'eval.architectures has {arch}',
          'Set --config.eval.cross_arch_norm=batch (or layer, none) for the '
          'cross-architecture networks, or leave it out of eval.architectures.')


def check_data(config, data: PreparedData) -> None:
  """Every condition on the data that a later stage would otherwise find
  only after hours of expert training: enough real images per class for
  the initial set and for the random-real baseline."""
  counts = np.bincount(np.asarray(data.y_train), minlength=data.num_classes)
  needs = []
  if config.mode in ('all', 'distill'):
    need, why = seqmatch.real_images_needed(config)
    if need:
      needs.append((need, why))
  if config.mode in ('all', 'evaluate') and 'random_real' in config.eval.baselines:
    needs.append((config.ipc, f'the random_real baseline takes ipc={config.ipc}'))
  for need, why in needs:
    short = np.flatnonzero(counts < need)
    if len(short):
      c = int(short[0])
      split = (f' after the {config.dataset.val_size} validation images'
               if config.dataset.val_size else '')
      raise ConfigError(
          f'Class {c} has {counts[c]} training images{split}, but {why} '
          f'({need} per class; {len(short)} class'
          f'{"es" if len(short) > 1 else ""} short); lower ipc'
          f'{" or dataset.val_size" if config.dataset.val_size else ""}, or '
          'use distill.pix_init=noise.')


def train_real_experts(config, workdir, data, network, key, stop, writer):
  spec = experts_lib.spec_from_config(config, config.experts.epochs)
  path = experts_dir(config, workdir)
  logging.info('training %d experts x %d epochs (%s) in %s', spec.num, spec.epochs,
               spec.optimizer, path)
  store = experts_lib.train_experts(
      network, spec, path, data.x_train, data.y_train, data.x_test, data.y_test,
      jax.random.fold_in(key, 0), expert_metadata(config, data),
      expert_ids=parallel.process_share(spec.num), should_stop=stop,
      writer=writer, mesh=parallel.model_mesh(config.parallel.num_devices),
      progress=parallel.is_main_process())
  parallel.barrier(f'experts {path}')  # every host's share is on disk
  if parallel.agree(len(store.experts()) < spec.num):
    raise Interrupted('stopped while training experts')
  accs = [store.test_accuracy(i).get(spec.epochs, float('nan')) for i in store.experts()]
  logging.info('experts done: final test accuracy %.4f ± %.4f', np.mean(accs),
               np.std(accs))
  return store


def _context(config, workdir, data, network, key, stop, writer, mesh, tag=''):
  def on_eval(k, images_model, labels, it):
    if not parallel.is_main_process():
      return
    path = os.path.join(workdir, tag, 'images', f'subset{k + 1}_it{it:06d}.png')
    try:  # a progress picture is not worth stopping (or desynchronising) a run
      os.makedirs(os.path.dirname(path), exist_ok=True)
      visualize.save_grid(path, data.preprocessor.to_pixels(images_model), labels,
                          data.num_classes)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('could not write %s: %s', path, e)
  return seqmatch.Context(
      workdir=workdir, network=network, x_train=data.x_train,
      y_train=data.y_train, x_test=data.x_test, y_test=data.y_test,
      x_val=data.x_val, y_val=data.y_val, num_classes=data.num_classes,
      experts_dir=experts_dir(config, workdir),
      expert_metadata=expert_metadata(config, data), key=jax.random.fold_in(key, 1),
      mesh=mesh, model_mesh=parallel.model_mesh(config.parallel.num_devices),
      should_stop=stop, writer=writer, on_eval=on_eval,
      progress=parallel.is_main_process(), preprocessor=data.preprocessor)


def plain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same run with the plain backbone: one subset, its scalar settings."""
  return config_lib.clear_subsets(ml_collections.ConfigDict(config.to_dict()))


def set_names(config) -> tuple[str, str]:
  """(this run's set, the plain-backbone comparison), as results name them."""
  title = backbones.backbone_class(config.backbone.name).title
  k = config.seqmatch.num_subsets
  return (f'SeqMatch-{title} (K={k})' if k > 1 else title), title


def distillation_runs(config) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(folder tag, config) of this run and of its plain-backbone comparison."""
  runs = [('', config)]
  if config.seqmatch.compare_backbone and config.seqmatch.num_subsets > 1:
    runs.append((config.backbone.name, plain_config(config)))
  return runs


def write_config(config, workdir: str) -> None:
  """config.json; an earlier, different one is kept as config.previous-N.json."""
  path = os.path.join(workdir, 'config.json')
  text = config.to_json_best_effort(indent=1, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
    n = 1
    while os.path.exists(os.path.join(workdir, f'config.previous-{n}.json')):
      n += 1
    os.replace(path, os.path.join(workdir, f'config.previous-{n}.json'))
  files.write_text(path, text)


def distill(config, workdir, data, network, key, stop, writer):
  mesh = parallel.make_mesh(config.parallel.num_devices)
  for tag, cfg in distillation_runs(config):
    out = os.path.join(workdir, tag, 'synthetic.npz')
    if parallel.agree(os.path.exists(out)):
      logging.info('%s exists: distillation done', out)
      continue
    syn = seqmatch.distill_all(_context(cfg, workdir, data, network, key, stop,
                                        writer, mesh, tag), cfg, tag=tag)
    def write(out=out, syn=syn, cfg=cfg):
      synthetic.save(out, syn, data.preprocessor, cfg)
      visualize.save_grid(out.replace('.npz', '.png'),
                          data.preprocessor.to_pixels(syn.images), syn.labels,
                          data.num_classes)
      logging.info('wrote %s (%d images, lr %s)', out, len(syn.labels), syn.lrs)
    parallel.main_only(write, f'synthetic set {out}')


def kept_version(raw: dict, ema: dict) -> dict:
  """Which of a set's raw and EMA images is kept: the higher mean test
  accuracy, on the first architecture evaluated. Both stay in synthetic.npz;
  this is a report of the two rows (test accuracy), not a selection that
  feeds back into anything."""
  arch = next(iter(raw))
  better = ema[arch]['mean'] > raw[arch]['mean']
  return dict(kept='EMA' if better else 'raw', architecture=arch,
              raw=raw[arch]['mean'], ema=ema[arch]['mean'])


PROGRESS_FILE = 'eval_progress.json'


def _file_id(path: str) -> dict:
  """What identifies a set's file: its path, size and contents (CRC-32)."""
  crc = 0
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      crc = zlib.crc32(chunk, crc)
  return dict(path=os.path.abspath(path), size=os.path.getsize(path), crc32=crc)


def evaluation_protocol(config) -> evaluate_lib.Protocol:
  """How the final evaluation trains networks: the method's own protocol
  (`eval.protocol=backbone`), or the common one for every set."""
  if config.eval.protocol == 'common':
    return evaluate_lib.protocol_from_config(config)
  return seqmatch.run_info(config).protocol


def protocol_name(config) -> str:
  """Whose evaluation protocol a run's rows use, e.g. 'DM (official)'."""
  if config.eval.protocol == 'common':
    return 'common (eval.*)'
  return f'{backbones.backbone_class(config.backbone.name).title} (official)'


def architecture_norm(config, name: str) -> str:
  """The normalisation evaluation architecture `name` runs with: the
  distillation model's own, or `eval.cross_arch_norm` for the others
  (default: model.norm, and none for AlexNet, as in the literature's
  cross-architecture tables)."""
  if name == config.model.name:
    return config.model.norm
  if config.eval.cross_arch_norm:
    return config.eval.cross_arch_norm
  return 'none' if name == 'alexnet' else config.model.norm


def network_for(config, name: str, num_classes: int, image_shape) -> Network:
  """The distillation model itself, or a cross-architecture one (its norm:
  `architecture_norm`)."""
  norm = architecture_norm(config, name)
  return create_network(name, num_classes, tuple(image_shape),
                        width=config.model.width, depth=config.model.depth,
                        norm=norm, conv_impl=config.model.conv_impl)


def _cell_spec(config, source: dict, architecture: str,
               protocol: evaluate_lib.Protocol, lr, num_stages: int) -> dict:
  """Everything that defines one (set, architecture) evaluation's numbers;
  stored progress is reused only for an identical spec."""
  spec = dict(
      source=source, architecture=architecture,
      protocol=dataclasses.asdict(protocol),
      num_models=config.eval.num_models, num_stages=num_stages, seed=config.seed,
      lr=[float(v) for v in np.atleast_1d(np.asarray(lr, np.float64))],
      dataset=dict(name=config.dataset.name, zca=config.dataset.zca,
                   val_size=config.dataset.val_size),
      model=dict(width=config.model.width, depth=config.model.depth,
                 norm=config.model.norm, conv_impl=config.model.conv_impl,
                 name=config.model.name))
  if config.eval.cross_arch_norm and architecture != config.model.name:
    # Only where it applies, and absent by default: earlier progress counts.
    spec['model']['cross_arch_norm'] = config.eval.cross_arch_norm
  return json.loads(json.dumps(spec))  # as it reads back from the file


class EvalProgress:
  """Per-model results of the final evaluation, in WORKDIR/eval_progress.json,
  so that an interrupted evaluation resumes at the model where it stopped.

  Entries are keyed by row and architecture and hold the spec they were
  computed under (`_cell_spec`); an entry whose spec differs (another set
  file, protocol, model count, ...) is ignored and overwritten. Only process 0
  reads and writes the file; every process gets its view (`done`).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, PROGRESS_FILE)
    self.cells: dict[str, dict] = {}
    if parallel.is_main_process() and os.path.exists(self.path):
      try:
        with open(self.path) as f:
          self.cells = dict(json.load(f)['cells'])
      except (OSError, ValueError, KeyError, TypeError) as e:
        logging.warning('ignoring %s (%s): evaluating from scratch', self.path, e)

  def done(self, cell: str, spec: dict) -> np.ndarray:
    """[num_models, num_stages] accuracies stored for `cell` under `spec`
    (NaN: not trained yet), process 0's view on every process."""
    shape = (spec['num_models'], spec['num_stages'])
    accs = np.full(shape, np.nan, np.float32)
    entry = self.cells.get(cell)
    if entry is not None and entry.get('spec') == spec:
      try:
        for i, row in enumerate(entry['accuracies']):
          if row is not None:
            accs[i] = np.asarray(row, np.float32)
      except (ValueError, TypeError, IndexError):
        accs[:] = np.nan
    return parallel.agree_array(accs)

  def record(self, cell: str, spec: dict, accs: np.ndarray) -> None:
    """Stores the finished models (collective: every process calls it)."""
    self.cells[cell] = dict(spec=spec, accuracies=[
        None if np.isnan(row).any() else [float(v) for v in row] for row in accs])
    parallel.main_only(lambda: files.write_json(
        self.path, dict(cells=self.cells), indent=1), self.path)


def evaluate(config, workdir, data: PreparedData, key,
             should_stop=lambda: False) -> dict:
  """Scores each set and baseline per architecture; results.json at the end.

  Resumable: finished models are kept in `EvalProgress`, a stop (`should_stop`)
  takes effect between models and raises `Interrupted`, and a rerun trains
  only the missing models. Model i always uses key i, so the numbers equal an
  uninterrupted evaluation's.
  """
  t0 = time.time()
  mesh = parallel.model_mesh(config.parallel.num_devices)
  eval_key = jax.random.fold_in(key, 2)
  progress = EvalProgress(workdir)
  # (row name, images, labels, lr, subset, epochs, what the images are)
  jobs = []
  ema_rows = []  # sets that also have EMA images
  sets = []
  if config.eval.synthetic:
    sets.append(('synthetic', config.eval.synthetic))
  else:
    name, plain = set_names(config)
    sets.append((name, os.path.join(workdir, 'synthetic.npz')))
    if config.seqmatch.compare_backbone and config.seqmatch.num_subsets > 1:
      sets.append((plain, os.path.join(workdir, config.backbone.name,
                                       'synthetic.npz')))
  for name, path in sets:
    fix = None if config.eval.synthetic else (
        f'delete it and rerun with --config.mode=all (or distill): it is '
        f'rebuilt from {os.path.join(os.path.dirname(path), "subsets")} '
        'without distilling again')
    syn = synthetic.load(path, data.num_classes, data.image_shape,
                         data.preprocessor, config,
                         **({'fix': fix} if fix else {}))
    lr = syn.lrs if syn.lrs is not None else np.float32(config.eval.lr)
    jobs.append((name, syn.images, syn.targets, lr, syn.subset, None,
                 dict(kind='set', **_file_id(path))))
    if syn.ema is not None:
      # An EMA set (FTD) is scored on its own fresh networks, with the same
      # keys and protocol as the raw set (the official code warm-starts it on
      # the network the raw set already trained; we do not).
      ema_rows.append(name)
      jobs.append((f'{name} (EMA)', syn.ema, syn.targets, lr, syn.subset, None,
                   dict(kind='set_ema', **_file_id(path))))
  ipc = config.ipc
  for base in config.eval.baselines:
    if base == 'random_real':
      x, y = evaluate_lib.random_real(data.x_train, data.y_train, ipc,
                                      data.num_classes, config.seed)
      jobs.append((f'random real (ipc {ipc})', x, y, config.eval.lr, None, None,
                   dict(kind='random_real', ipc=ipc)))
    else:
      jobs.append(('whole training set', data.x_train, data.y_train,
                   config.eval.lr, None, config.eval.whole_epochs,
                   dict(kind='whole')))
  rows: dict[str, dict] = {}
  protocol = evaluation_protocol(config)
  for name, x, y, lr, subset, epochs, source in jobs:
    rows[name] = {}
    num_stages = 1 if subset is None else int(np.max(subset)) + 1
    job_protocol = (protocol if epochs is None
                    else dataclasses.replace(protocol, epochs=epochs))
    for arch in config.eval.architectures:
      cell = f'{name} / {arch}'
      spec = _cell_spec(config, source, arch, job_protocol, lr, num_stages)
      done = progress.done(cell, spec)
      finished = int((~np.isnan(done).any(axis=1)).sum())
      if finished == len(done):
        logging.info('%s: all %d models evaluated earlier', cell, finished)
      else:
        logging.info('evaluating %s: %d models%s', cell, len(done),
                     f' ({finished} done earlier)' if finished else '')
      record = lambda accs, cell=cell, spec=spec: progress.record(cell, spec, accs)
      try:
        network = network_for(config, arch, data.num_classes, np.shape(x)[1:])
        r = evaluate_lib.evaluate_synthetic(
            x, y, lr, network, job_protocol, eval_key, x_eval=data.x_test,
            y_eval=data.y_test, num_models=config.eval.num_models, subset=subset,
            mesh=mesh, should_stop=should_stop, done=done, on_progress=record)
      except Interrupted as e:
        kept = progress.cells.get(cell, {}).get('accuracies', [])
        raise Interrupted(
            f'stopped during the evaluation of {cell}; '
            f'{sum(a is not None for a in kept)} of {len(done)} models kept '
            f'in {progress.path}') from e
      rows[name][arch] = dict(r, protocol=evaluate_lib.describe(job_protocol))
      logging.info('%s: %.2f ± %.2f %%', cell, r['mean'], r['std'])
  ema_kept = {name: kept_version(rows[name], rows[f'{name} (EMA)'])
              for name in ema_rows}
  results = dict(rows=rows, config=json.loads(config.to_json_best_effort()),
                 **({'ema_kept': ema_kept} if ema_kept else {}),
                 protocol=dict(name=protocol_name(config),
                               **dataclasses.asdict(protocol)),
                 wall_time_s=time.time() - t0, dataset=data.name,
                 devices=[str(d) for d in jax.devices()])
  if parallel.is_main_process():
    evaluate_lib.write_results(workdir, results)
    summary = '; '.join(f"{n}: {r[a]['mean']:.2f}±{r[a]['std']:.2f}"
                        for n, r in rows.items() for a in r)
    print(f'results ({data.name}, test accuracy %): {summary}')
  return results
