"""Sequential Subset Matching (Du et al., NeurIPS 2023), Algorithm 1, over any
backbone.

The synthetic set is initialised whole (line 1), then split into K subsets
S_1..S_K distilled one after another (lines 2-12): subset k learns with the
backbone's loss while S_1..S_{k-1} stay frozen (`stop_gradient`) but take part
in every loss, and whatever the backbone needs before subset k starts (MTT:
experts trained from networks that already learned S_1..S_{k-1}) is prepared
first. Each finished subset is written to `WORKDIR/subsets/subset_k.npz`, so a
rerun skips it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from seqmatch_jax import distill as distill_lib
from seqmatch_jax import evaluate as evaluate_lib
from seqmatch_jax import parallel
from seqmatch_jax import synthetic
from seqmatch_jax.backbones import base as backbones
from seqmatch_jax.errors import ConfigError
from seqmatch_jax.models import Network


def subset_sizes(ipc: int, num_subsets: int, explicit=()) -> list[int]:
  """Images per class of each subset: equal split, remainder to the earliest
  (50 / 3 -> 17, 17, 16), or an explicit list that must sum to ipc."""
  if num_subsets < 1:
    raise ConfigError(f'seqmatch.num_subsets must be >= 1, got {num_subsets}.')
  if explicit:
    sizes = _numbers(explicit, 'seqmatch.subset_ipc', int)
    if len(sizes) != num_subsets or sum(sizes) != ipc or min(sizes) < 1:
      raise ConfigError(
          f'seqmatch.subset_ipc={tuple(sizes)} must have {num_subsets} positive '
          f'entries summing to ipc={ipc}.')
    return sizes
  if num_subsets > ipc:
    raise ConfigError(
        f'seqmatch.num_subsets={num_subsets} exceeds ipc={ipc}: every subset '
        'needs at least one image per class; lower num_subsets or raise ipc.')
  base, extra = divmod(ipc, num_subsets)
  return [base + (1 if k < extra else 0) for k in range(num_subsets)]


def _numbers(values, key: str, kind=float) -> list:
  out = []
  for v in values:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      raise ConfigError(f'{key} must hold numbers, got {tuple(values)!r} '
                        f"(e.g. --config.{key}='(20,10)').")
    out.append(kind(v))
  return out


def _per_subset(values, scalar, k: int, key: str) -> list:
  if not isinstance(values, (tuple, list)):
    raise ConfigError(f'{key} must be a tuple with one value per subset, got '
                      f"{values!r} (e.g. --config.{key}='(20,10)').")
  if not values:
    return [scalar] * k
  values = list(values)
  if len(values) == 1:
    return values * k
  if len(values) != k:
    raise ConfigError(f'{key} has {len(values)} entries for {k} subsets; give '
                      'one per subset or a single value.')
  return values


def subset_plans(config: ml_collections.ConfigDict) -> list[backbones.SubsetPlan]:
  """One plan per subset: the backbone's scalars, with each name the backbone
  lists in `per_subset` taken from its `per_subset` tuple when given (the
  paper's Table 4 columns)."""
  cls = backbones.backbone_class(config.backbone.name)
  k = config.seqmatch.num_subsets
  sizes = subset_sizes(config.ipc, k, config.seqmatch.subset_ipc)
  node = config[cls.config_key]
  scalars = {n: v for n, v in node.items() if n != 'per_subset'}
  columns = {}
  for name in cls.per_subset:
    key = f'{cls.config_key}.per_subset.{name}'
    kind = type(scalars[name]) if isinstance(scalars[name], (int, float)) else float
    values = node.per_subset[name]
    _numbers(values if isinstance(values, (tuple, list)) else (values,), key)
    columns[name] = _numbers(_per_subset(values, scalars[name], k, key), key, kind)
  plans = []
  for i in range(k):
    values = dict(scalars, **{n: c[i] for n, c in columns.items()})
    plans.append(backbones.SubsetPlan(
        index=i, ipc=sizes[i], ipc_before=sum(sizes[:i]),
        iterations=int(values.pop('iterations')),
        lr_img=float(values.pop('lr_img')), settings=values))
  return plans


def subset_layout(sizes: list[int], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(labels, subset id) of the whole set: subset-major, class-blocked within."""
  labels = np.concatenate([np.repeat(np.arange(num_classes), n) for n in sizes])
  subset = np.concatenate([np.full(n * num_classes, k) for k, n in enumerate(sizes)])
  return labels.astype(np.int32), subset.astype(np.int32)


def initial_images(key: jax.Array, x_train, y_train, sizes: list[int],
                   num_classes: int, pix_init: str) -> np.ndarray:
  """The whole synthetic set at iteration 0 (Algorithm 1 line 1), laid out as
  `subset_layout`: distinct random real images of each class, or noise."""
  ipc = sum(sizes)
  x_train = np.asarray(x_train)
  y_train = np.asarray(y_train)
  if pix_init == 'noise':
    shape = (ipc * num_classes,) + x_train.shape[1:]
    return np.asarray(jax.random.normal(key, shape), np.float32)
  if pix_init != 'real':
    raise ConfigError(f"distill.pix_init must be 'real' or 'noise', got {pix_init!r}.")
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).astype(np.uint64))
  per_class = []
  for c in range(num_classes):
    pool = np.flatnonzero(y_train == c)
    if len(pool) < ipc:
      raise ConfigError(f'Class {c} has {len(pool)} training images, fewer than '
                        f'ipc={ipc}; lower ipc or use distill.pix_init=noise.')
    per_class.append(x_train[rng.choice(pool, ipc, replace=False)])
  blocks, offset = [], 0
  for n in sizes:
    blocks += [per_class[c][offset:offset + n] for c in range(num_classes)]
    offset += n
  return np.concatenate(blocks).astype(np.float32)


def real_images_needed(config: ml_collections.ConfigDict) -> tuple[int, str]:
  """(real training images each class must have, why) for the initial set;
  (0, '') when it starts from noise."""
  if config.distill.pix_init != 'real':
    return 0, ''
  if config.backbone.name == 'idc':
    f = config.idc.factor
    return (config.ipc * f * f, f"IDC's mix init takes ipc x factor^2 = "
            f'{config.ipc} x {f}^2')
  return config.ipc, f'the initial set takes ipc={config.ipc} distinct images'


# Keys whose values define a subset's result; `iterations` may change (a run
# can be continued for longer), so may checkpointing, remat and the final
# evaluation's settings (it is recomputed on every run).
RECORDED_KEYS = ('backbone.name', 'ipc', 'seqmatch.num_subsets', 'seed',
                 'augment.strategy', 'model.name', 'model.width', 'model.depth',
                 'model.norm', 'dataset.name', 'dataset.zca', 'dataset.val_size',
                 'distill.pix_init', 'distill.eval_every', 'distill.eval_models',
                 'distill.eval_epochs')
_UNRECORDED_SETTINGS = ('iterations', 'remat')


def subset_record(config: ml_collections.ConfigDict,
                  plan: backbones.SubsetPlan) -> dict:
  """The settings that define subset `plan.index`: recorded with its
  checkpoint and its finished file, compared on every rerun."""
  node = backbones.backbone_class(config.backbone.name).config_key
  record = {}
  for dotted in RECORDED_KEYS:
    value = config
    for part in dotted.split('.'):
      value = value[part]
    record[dotted] = list(value) if isinstance(value, tuple) else value
  record['images per class of this subset'] = plan.ipc
  record[f'{node}.lr_img'] = plan.lr_img
  for name, value in sorted(plan.settings.items()):
    if name not in _UNRECORDED_SETTINGS:
      record[f'{node}.{name}'] = value
  return record


def redo_hint(root: str, index: int, num_subsets: int) -> str:
  """What to delete to redo subset `index` (0-based) and the later subsets,
  which were distilled on top of it."""
  later = f'_{{{index + 1}..{num_subsets}}}' if index + 1 < num_subsets else \
      f'_{index + 1}'
  return (f'{os.path.join(root, "subsets", "subset" + later + ".npz")} and the '
          f'folders {os.path.join(root, "distill", "subset" + later)} (later '
          'subsets build on it)')


def check_finished_work(config: ml_collections.ConfigDict, root: str) -> None:
  """Before a run starts: every subset already begun or finished under `root`
  must have been made with this config's settings."""
  plans = subset_plans(config)
  for plan in plans:
    new = subset_record(config, plan)
    redo = redo_hint(root, plan.index, len(plans))
    path = os.path.join(root, 'subsets', f'subset_{plan.index + 1}.npz')
    if parallel.agree(os.path.exists(path)):
      distill_lib.check_record(synthetic.load_subset(path)[3], new, path, redo)
    ckpt = os.path.join(root, 'distill', f'subset_{plan.index + 1}')
    if not parallel.agree(os.path.isdir(ckpt) and any(
        name.isdigit() for name in os.listdir(ckpt))):
      continue  # no checkpoint: nothing would be continued
    distill_lib.check_record(distill_lib.read_run_record(ckpt).get('settings'),
                             new, ckpt, redo)


@dataclasses.dataclass
class Context:
  """What the subset loop (and a backbone's `prepare`) needs from the pipeline."""
  config: ml_collections.ConfigDict
  workdir: str
  network: Network
  x_train: jax.Array
  y_train: jax.Array
  x_test: jax.Array
  y_test: jax.Array
  x_val: jax.Array | None
  y_val: jax.Array | None
  num_classes: int
  experts_dir: str
  expert_metadata: dict
  key: jax.Array
  mesh: Any = None
  should_stop: Callable[[], bool] = lambda: False
  writer: Any = None
  # (subset index, model-space images so far, their labels, it) -> None
  on_eval: Callable | None = None
  progress: bool = True
  preprocessor: Any = None  # pixels <-> model space (backbones storing pixels)


def distill_all(ctx: Context, tag: str = '') -> synthetic.SyntheticSet:
  """Algorithm 1: initialise the whole set, then for each subset in order
  prepare -> distil -> save (finished subsets are read back from disk)."""
  config = ctx.config
  backbone = backbones.create(config, ctx.network)
  plans = subset_plans(config)
  sizes = [p.ipc for p in plans]
  labels, subset = subset_layout(sizes, ctx.num_classes)
  init = backbone.initial_images(jax.random.fold_in(ctx.key, 1), ctx, sizes)
  root = os.path.join(ctx.workdir, tag) if tag else ctx.workdir
  done = backbones.Done(init[:0], labels[:0], subset[:0], [])
  emas = []  # each subset's own image EMA (backbones that keep one: FTD)
  for plan in plans:
    k = plan.index
    mine = subset == k
    path = os.path.join(root, 'subsets', f'subset_{k + 1}.npz')
    record = subset_record(config, plan)
    if parallel.agree(os.path.exists(path)):
      images, lr = _finished_subset(path, init[mine], labels[mine], record)
      ema = synthetic.load_subset_ema(path)
    else:
      source = backbone.prepare(ctx, plan, done)
      images, lr, ema = _distill_one(ctx, backbone, plan, source, done,
                                     init[mine], labels, subset, root, tag,
                                     record)
      parallel.main_only(lambda: synthetic.save_subset(
          path, images, lr, labels[mine], record, ema), f'subset {tag} {k + 1}')
    emas.append(ema)
    done = backbones.Done(np.concatenate([done.images, images]),
                          labels[subset <= k], subset[subset <= k], done.lrs + [lr])
  ema = (np.concatenate(emas) if emas and all(e is not None for e in emas)
         else None)
  # What evaluation trains on (IDC: the decoded set; others: as stored).
  images, labels_d, subset_d = backbone.decode(done.images, labels, subset,
                                               ctx.preprocessor)
  if ema is not None:
    ema = backbone.decode(ema, labels, subset, ctx.preprocessor)[0]
  stored = None if labels_d is labels else done.images
  return synthetic.SyntheticSet(images, labels_d, subset_d,
                                np.asarray(done.lrs, np.float32), backbone.name,
                                ema, stored=stored, stored_labels=labels,
                                stored_subset=subset)


def _finished_subset(path: str, init, labels, record) -> tuple[np.ndarray, float]:
  images, lr, stored_labels, stored_record = synthetic.load_subset(path)
  distill_lib.check_record(stored_record, record, path)
  if images.shape != init.shape or not np.array_equal(stored_labels, labels):
    raise ConfigError(
        f'{path} holds a subset of another shape or labelling than this config '
        'asks for (ipc, num_subsets or subset_ipc changed?); use a new workdir '
        'or delete the subsets/ and distill/ folders.')
  logging.info('subset already distilled (%s)', path)
  return images, lr


def _distill_one(ctx: Context, backbone, plan, source, done: backbones.Done,
                 init, labels, subset, root: str, tag: str,
                 record: dict) -> tuple[np.ndarray, float, np.ndarray | None]:
  """Distils subset `plan.index` with the earlier ones frozen; returns its
  images (the best on the validation split when there is one), lr, and its
  image EMA if the backbone keeps one (the EMA at that same best iterate)."""
  config = ctx.config
  k = plan.index
  evaluate_fn = None
  if ctx.x_val is not None and len(ctx.x_val) and config.distill.eval_every:
    evaluate_fn = _val_evaluator(ctx, backbone, labels[subset <= k],
                                 subset[subset <= k], done.lrs)
  on_eval = None
  if ctx.on_eval is not None:
    def on_eval(st, it):
      images = np.concatenate([done.images, parallel.fetch(st.images)])
      images, labs, _ = backbone.decode(images, labels[subset <= k],
                                        subset[subset <= k], ctx.preprocessor)
      ctx.on_eval(k, images, labs, it)
  options = distill_lib.LoopOptions(
      ckpt_dir=os.path.join(root, 'distill', f'subset_{k + 1}'), seed=config.seed,
      checkpoint_every=config.distill.checkpoint_every,
      eval_every=config.distill.eval_every,
      trajectories_per_step=config.distill.trajectories_per_step,
      progress=ctx.progress, log_name=f'distill_{tag}' if tag else 'distill',
      record=record)
  state = distill_lib.distill_subset(
      backbone, plan, source, init_images=jnp.asarray(init),
      labels=jnp.asarray(labels[subset == k]), frozen=jnp.asarray(done.images),
      frozen_labels=jnp.asarray(done.labels), key=jax.random.fold_in(ctx.key, 100 + k),
      options=options, evaluate_fn=evaluate_fn, mesh=ctx.mesh,
      should_stop=ctx.should_stop, writer=ctx.writer, on_eval=on_eval)
  use_best = evaluate_fn is not None and float(state.best_score) >= 0
  images = parallel.fetch(state.best_images if use_best else state.images)
  lr = backbone.eval_lr(state.best_extras if use_best else state.extras)
  ema = state.aux.get('best_ema' if use_best else 'ema')
  return images, lr, None if ema is None else parallel.fetch(ema)


def _val_evaluator(ctx: Context, backbone, labels, subset, prev_lrs):
  """Staged validation accuracy of the set so far (selects the best iterate)."""
  config = ctx.config

  def evaluate_fn(images, lr, it):
    lrs = np.asarray(list(prev_lrs) + [float(lr)], np.float32)
    images, labs, subs = backbone.decode(images, labels, subset, ctx.preprocessor)
    r = evaluate_lib.evaluate_synthetic(
        images, labs, lrs, config, jax.random.fold_in(ctx.key, 300 + it),
        x_eval=ctx.x_val, y_eval=ctx.y_val, num_classes=ctx.num_classes,
        subset=subs, num_models=config.distill.eval_models,
        epochs=config.distill.eval_epochs, mesh=ctx.mesh,
        should_stop=ctx.should_stop)  # a stop abandons it (distill_subset saves)
    return r['mean'] / 100.0
  return evaluate_fn
