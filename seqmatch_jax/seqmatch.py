"""Sequential Subset Matching (Du et al., NeurIPS 2023), Algorithm 1, over any
distillation method.

The synthetic set is initialised whole (line 1), then split into K subsets
S_1..S_K distilled one after another (lines 2-12): subset k learns with the
method's loss while S_1..S_{k-1} stay frozen (`stop_gradient`, images and
labels alike) but take part in every loss, and whatever the method needs
before subset k starts (MTT: experts trained from networks that already
learned S_1..S_{k-1}) is prepared first. Each finished subset is written to
`WORKDIR/subsets/subset_k.npz`, so a rerun skips it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from seqmatch_jax import backbones
from seqmatch_jax import distill as distill_lib
from seqmatch_jax import evaluate as evaluate_lib
from seqmatch_jax import experts as experts_lib
from seqmatch_jax import parallel
from seqmatch_jax import parameterization
from seqmatch_jax import synthetic
from seqmatch_jax.backbones.base import Done, Layout, RunInfo, SubsetPlan
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


def run_info(config: ml_collections.ConfigDict,
             image_shape: tuple[int, ...] | None = None) -> RunInfo:
  """What every subset's plan records from outside the method's section."""
  cls = backbones.backbone_class(config.backbone.name)
  common = evaluate_lib.protocol_from_config(config)
  param = parameterization.resolve(config.param.name, config.param.factor,
                                   cls.parameterization)
  side = min(image_shape[:2]) if image_shape else 0
  if side and param.factor > side:
    raise ConfigError(f'param.factor={param.factor} cuts {side}-pixel images '
                      'into empty tiles; use a factor <= the image side (IDC: 2 '
                      'for 32x32 and 28x28, 3 for ImageNet subsets).')
  return RunInfo(
      seed=config.seed, ipc=config.ipc,
      num_subsets=config.seqmatch.num_subsets, augment=config.augment.strategy,
      pix_init=config.distill.pix_init, param=param,
      protocol=cls.protocol(common, config[cls.config_key]),
      eval_lr=float(config.eval.lr),
      experts=experts_lib.spec_from_config(config, config.experts.epochs),
      staged_epochs=config.experts.staged_epochs, zca=bool(config.dataset.zca),
      image_shape=tuple(image_shape) if image_shape else None,
      trajectories=int(config.distill.trajectories_per_step))


def subset_plans(config: ml_collections.ConfigDict,
                 image_shape: tuple[int, ...] | None = None) -> list[SubsetPlan]:
  """One plan per subset: the method's scalars, with each name of its
  `per_subset` sub-dict taken from that tuple when given (the paper's Table 4
  columns), checked and completed by the method's `validate`."""
  cls = backbones.backbone_class(config.backbone.name)
  k = config.seqmatch.num_subsets
  sizes = subset_sizes(config.ipc, k, config.seqmatch.subset_ipc)
  node = config[cls.config_key]
  scalars = {n: v for n, v in node.items() if n != 'per_subset'}
  columns = {}
  for name in backbones.per_subset_names(cls):
    key = f'{cls.config_key}.per_subset.{name}'
    kind = type(scalars[name]) if isinstance(scalars[name], (int, float)) else float
    values = node.per_subset[name]
    _numbers(values if isinstance(values, (tuple, list)) else (values,), key)
    columns[name] = _numbers(_per_subset(values, scalars[name], k, key), key, kind)
  run = run_info(config, image_shape)
  plans = []
  for i in range(k):
    values = dict(scalars, **{n: c[i] for n, c in columns.items()})
    plans.append(SubsetPlan(
        index=i, ipc=sizes[i], ipc_before=sum(sizes[:i]),
        iterations=int(values.pop('iterations')),
        lr_img=float(values.pop('lr_img')), settings=values, run=run))
  return cls.validate(plans)


def single_plan(config: ml_collections.ConfigDict, *, index: int = 0, ipc: int = 1,
                ipc_before: int = 0, image_shape: tuple[int, ...] | None = None,
                **settings) -> SubsetPlan:
  """One subset's plan by hand (experiments, tests, benchmarks): the
  method's scalars from `config` with `settings` (e.g. syn_steps=2),
  checked and completed by its `validate`."""
  cls = backbones.backbone_class(config.backbone.name)
  values = dict(config[cls.config_key].to_dict(), **settings)
  values.pop('per_subset', None)
  plan = SubsetPlan(index=index, ipc=ipc, ipc_before=ipc_before,
                    iterations=int(values.pop('iterations')),
                    lr_img=float(values.pop('lr_img')), settings=values,
                    run=run_info(config, image_shape))
  return cls.validate([plan])[0]


def subset_layout(sizes: list[int], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(labels, subset id) of the whole set: subset-major, class-blocked within."""
  labels = np.concatenate([np.repeat(np.arange(num_classes), n) for n in sizes])
  subset = np.concatenate([np.full(n * num_classes, k) for k, n in enumerate(sizes)])
  return labels.astype(np.int32), subset.astype(np.int32)


def initial_images(key: jax.Array, x_train, y_train, sizes: list[int],
                   num_classes: int, pix_init: str,
                   param: parameterization.Parameterization,
                   to_pixels: Callable | None = None) -> np.ndarray:
  """The whole stored set at iteration 0 (Algorithm 1 line 1), laid out as
  `subset_layout`: per class, distinct random real images (factor^2 per
  stored image for multi-formation, IDC's mix init), or noise; in the
  parameterisation's space (pixel space: `to_pixels`, clipped to [0, 1])."""
  ipc = sum(sizes)
  shape = (ipc * num_classes,) + tuple(np.shape(x_train)[1:])
  if pix_init == 'noise':
    z = np.asarray(jax.random.normal(key, shape), np.float32)
    # Pixel space: IDC's N(0.5, 1/4^2) clamped to [0, 1].
    return np.clip(z / 4 + 0.5, 0.0, 1.0) if param.space == 'pixels' else z
  if pix_init != 'real':
    raise ConfigError(f"distill.pix_init must be 'real' or 'noise', got {pix_init!r}.")
  x_train = np.asarray(x_train)
  y_train = np.asarray(y_train)
  need = param.real_images_needed(ipc)
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).astype(np.uint64))
  per_class = []
  for c in range(num_classes):
    pool = np.flatnonzero(y_train == c)
    if len(pool) < need:
      raise ConfigError(f'Class {c} has {len(pool)} training images, fewer than '
                        f'the {need} the initial set takes; lower ipc (or '
                        'param.factor), or use distill.pix_init=noise.')
    real = x_train[rng.choice(pool, need, replace=False)]
    if param.space == 'pixels':
      real = np.clip(np.asarray(to_pixels(real), np.float32), 0.0, 1.0)
    per_class.append(param.init_from_real(real))
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
  param = run_info(config).param
  if param.factor > 1:
    return (param.real_images_needed(config.ipc),
            f'the multi-formation init takes ipc x factor^2 = {config.ipc} x '
            f'{param.factor}^2')
  return config.ipc, f'the initial set takes ipc={config.ipc} distinct images'


# Keys whose values define a subset's result; `iterations` may change (a run
# can be continued for longer), so may checkpointing, remat and the final
# evaluation's settings (it is recomputed on every run). Settings that train
# the networks of subsets k >= 2 are recorded by the methods that use them,
# in their resolved plans.
RECORDED_KEYS = ('backbone.name', 'ipc', 'seqmatch.num_subsets', 'seed',
                 'augment.strategy', 'model.name', 'model.width', 'model.depth',
                 'model.norm', 'dataset.name', 'dataset.zca', 'dataset.val_size',
                 'distill.pix_init', 'distill.eval_every', 'distill.eval_models',
                 'distill.eval_epochs')
_UNRECORDED_SETTINGS = ('iterations', 'remat')


def subset_record(config: ml_collections.ConfigDict, plan: SubsetPlan) -> dict:
  """The settings that define subset `plan.index`: recorded with its
  checkpoint and its finished file, compared on every rerun."""
  node = backbones.backbone_class(config.backbone.name).config_key
  record = {}
  for dotted in RECORDED_KEYS:
    value = config
    for part in dotted.split('.'):
      value = value[part]
    record[dotted] = value
  record['images per class of this subset'] = plan.ipc
  param = plan.run.param
  if param.name != 'identity' or param.space != 'model':
    record['parameterization'] = [param.name, param.factor, param.space]
  record[f'{node}.lr_img'] = plan.lr_img
  for name, value in sorted(plan.settings.items()):
    if name not in _UNRECORDED_SETTINGS:
      record[f'{node}.{name}'] = value
  return json.loads(json.dumps(record, default=_jsonable))  # as read back


def _jsonable(value):
  if dataclasses.is_dataclass(value):
    return dataclasses.asdict(value)
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f'not recordable: {value!r}')


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
      distill_lib.check_record(synthetic.load_subset(path).record, new, path, redo)
    ckpt = os.path.join(root, 'distill', f'subset_{plan.index + 1}')
    if not parallel.agree(os.path.isdir(ckpt) and any(
        name.isdigit() for name in os.listdir(ckpt))):
      continue  # no checkpoint: nothing would be continued
    distill_lib.check_record(distill_lib.read_run_record(ckpt).get('settings'),
                             new, ckpt, redo)


@dataclasses.dataclass
class Context:
  """What the subset loop (and a method's `prepare`) gets from the pipeline:
  data, places and services, never the config (methods read their plans)."""
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
  mesh: Any = None  # distillation (trajectories)
  model_mesh: Any = None  # experts and evaluation models
  should_stop: Callable[[], bool] = lambda: False
  writer: Any = None
  # (subset index, model-space images so far, their labels, it) -> None
  on_eval: Callable | None = None
  progress: bool = True
  preprocessor: Any = None  # pixels <-> model space


def distill_all(ctx: Context, config: ml_collections.ConfigDict,
                tag: str = '') -> synthetic.SyntheticSet:
  """Algorithm 1: initialise the whole set, then for each subset in order
  prepare -> distil -> save (finished subsets are read back from disk)."""
  backbone = backbones.create(config, ctx.network)
  plans = subset_plans(config, tuple(ctx.network.image_shape))
  param = plans[0].run.param
  sizes = [p.ipc for p in plans]
  classes, subset = subset_layout(sizes, ctx.num_classes)
  init = initial_images(jax.random.fold_in(ctx.key, 1), ctx.x_train, ctx.y_train,
                        sizes, ctx.num_classes, config.distill.pix_init, param,
                        ctx.preprocessor.to_pixels if ctx.preprocessor else None)
  root = os.path.join(ctx.workdir, tag) if tag else ctx.workdir
  done = Done(init[:0], classes[:0], subset[:0], [])
  emas = []  # each subset's own image EMA (methods that keep one: FTD)
  for plan in plans:
    k = plan.index
    mine = subset == k
    path = os.path.join(root, 'subsets', f'subset_{k + 1}.npz')
    record = subset_record(config, plan)
    if parallel.agree(os.path.exists(path)):
      finished = _finished_subset(path, init[mine], classes[mine], record)
    else:
      source = backbone.prepare(ctx, plan, done)
      finished = _distill_one(ctx, config, backbone, plan, source, done,
                              init[mine], classes, subset, root, tag, record)
      parallel.main_only(lambda: synthetic.save_subset(path, finished, record),
                         f'subset {tag} {k + 1}')
    emas.append(finished.ema)
    labels = (finished.labels if finished.soft_labels is None
              else finished.soft_labels)
    done = Done(np.concatenate([done.images, finished.images]),
                np.concatenate([done.labels, labels]) if len(done.labels)
                else labels,
                subset[subset <= k], done.lrs + [finished.lr])
  ema = (np.concatenate(emas) if emas and all(e is not None for e in emas)
         else None)
  return _as_set(done, classes, ema, param, backbone.name, ctx.preprocessor)


def _as_set(done: Done, classes, ema, param, name: str,
            preprocessor) -> synthetic.SyntheticSet:
  """The finished set as evaluation trains on it (decoded, model space)."""
  to_model = preprocessor.to_model if preprocessor is not None else None
  soft = None if np.ndim(done.labels) == 1 else np.asarray(done.labels, np.float32)
  images, labels_d, subset_d = param.decode_set(done.images, classes, done.subset,
                                                to_model)
  soft_d = None if soft is None else _decoded_soft(param, soft, done.subset)
  if ema is not None:
    ema = param.decode_set(ema, classes, done.subset, to_model)[0]
  stored = None if (param.factor == 1 and param.space == 'model') else done.images
  return synthetic.SyntheticSet(
      images, labels_d, subset_d, np.asarray(done.lrs, np.float32), name, ema,
      stored=stored, stored_labels=classes, stored_subset=done.subset,
      soft_labels=soft_d)


def _decoded_soft(param, soft: np.ndarray, subset: np.ndarray) -> np.ndarray:
  """Soft labels in the decoded order (subset by subset, crop-major)."""
  return np.concatenate([param.decode_labels(soft[subset == j])
                         for j in range(int(subset.max()) + 1)])


def _finished_subset(path: str, init, classes, record) -> synthetic.FinishedSubset:
  finished = synthetic.load_subset(path)
  distill_lib.check_record(finished.record, record, path)
  if finished.images.shape != init.shape or not np.array_equal(finished.labels,
                                                                classes):
    raise ConfigError(
        f'{path} holds a subset of another shape or labelling than this config '
        'asks for (ipc, num_subsets or subset_ipc changed?); use a new workdir '
        'or delete the subsets/ and distill/ folders.')
  logging.info('subset already distilled (%s)', path)
  return finished


def _distill_one(ctx: Context, config, backbone, plan: SubsetPlan, source,
                 done: Done, init, classes, subset, root: str, tag: str,
                 record: dict) -> synthetic.FinishedSubset:
  """Distils subset `plan.index` with the earlier ones frozen; returns its
  images (the best on the validation split when there is one), labels, lr,
  and its image EMA if the method keeps one (aux['ema'], at that iterate)."""
  k = plan.index
  evaluate_fn = None
  if ctx.x_val is not None and len(ctx.x_val) and config.distill.eval_every:
    evaluate_fn = _val_evaluator(ctx, config, plan, classes[subset <= k],
                                 subset[subset <= k], done.lrs)
  on_eval = None
  if ctx.on_eval is not None:
    def on_eval(st, it):
      t = parallel.fetch(st.trainable)
      images = np.concatenate([done.images, t['images']])
      images, labs, _ = plan.run.param.decode_set(
          images, classes[subset <= k], subset[subset <= k],
          ctx.preprocessor.to_model if ctx.preprocessor else None)
      ctx.on_eval(k, images, labs, it)
  options = distill_lib.LoopOptions(
      ckpt_dir=os.path.join(root, 'distill', f'subset_{k + 1}'), seed=config.seed,
      checkpoint_every=config.distill.checkpoint_every,
      eval_every=config.distill.eval_every,
      trajectories_per_step=plan.settings.get('trajectories',
                                              config.distill.trajectories_per_step),
      progress=ctx.progress, log_name=f'distill_{tag}' if tag else 'distill',
      record=record)
  trainable, optimizers = backbone.init(plan, source, init, classes[subset == k])
  layout = Layout(classes[subset <= k], subset[subset <= k], ctx.num_classes)
  frozen = dict(images=jnp.asarray(done.images), labels=jnp.asarray(done.labels))
  state = distill_lib.distill_subset(
      backbone, plan, source, trainable=trainable, optimizers=optimizers,
      frozen=frozen, layout=layout, key=jax.random.fold_in(ctx.key, 100 + k),
      options=options, evaluate_fn=evaluate_fn, mesh=ctx.mesh,
      should_stop=ctx.should_stop, writer=ctx.writer, on_eval=on_eval)
  use_best = evaluate_fn is not None and float(state.best_score) >= 0
  t = parallel.fetch(state.best if use_best else state.trainable)
  labels = np.asarray(t['labels'])
  soft = labels if labels.ndim == 2 else None
  return synthetic.FinishedSubset(
      images=np.asarray(t['images']), lr=distill_lib.eval_lr(plan, t['extras']),
      labels=classes[subset == k], record=record, soft_labels=soft,
      ema=None if t['aux'].get('ema') is None else np.asarray(t['aux']['ema']))


def _val_evaluator(ctx: Context, config, plan: SubsetPlan, classes, subset,
                   prev_lrs):
  """Staged validation accuracy of the set so far (selects the best iterate)."""
  protocol = dataclasses.replace(plan.run.protocol,
                                 epochs=config.distill.eval_epochs)
  to_model = ctx.preprocessor.to_model if ctx.preprocessor else None

  def evaluate_fn(images, labels, lr, it):
    lrs = np.asarray(list(prev_lrs) + [float(lr)], np.float32)
    images, labs, subs = plan.run.param.decode_set(images, classes, subset, to_model)
    if np.ndim(labels) == 2:  # soft labels: what evaluation trains on
      labs = _decoded_soft(plan.run.param, np.asarray(labels), subset)
    r = evaluate_lib.evaluate_synthetic(
        images, labs, lrs, ctx.network, protocol,
        jax.random.fold_in(ctx.key, 300 + it), x_eval=ctx.x_val, y_eval=ctx.y_val,
        subset=subs, num_models=config.distill.eval_models, mesh=ctx.mesh,
        should_stop=ctx.should_stop)  # a stop abandons it (distill_subset saves)
    return r['mean'] / 100.0
  return evaluate_fn
