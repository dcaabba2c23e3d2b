"""Sequential Subset Matching (Du et al., NeurIPS 2023, Algorithm 1) over MTT.

The synthetic set is K subsets S_1..S_K distilled one after another. Subset k
is trained by trajectory matching while S_1..S_{k-1} stay frozen
(`stop_gradient`) but take part in every student step; its experts start from
networks already trained, in stages, on S_1..S_{k-1} (Algorithm 1 line 9, as
the official code realises it, REFERENCE.md). Each finished subset is written
to `WORKDIR/subsets/subset_k.npz`, so a rerun skips it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from seqmatch_jax import distill as distill_lib
from seqmatch_jax import evaluate as evaluate_lib
from seqmatch_jax import experts as experts_lib
from seqmatch_jax import parallel
from seqmatch_jax.errors import ConfigError
from seqmatch_jax.models import Network


def subset_sizes(ipc: int, num_subsets: int, explicit=()) -> list[int]:
  """Images per class of each subset: equal split, remainder to the earliest
  (50 / 3 -> 17, 17, 16), or an explicit list that must sum to ipc."""
  if num_subsets < 1:
    raise ConfigError(f'seqmatch.num_subsets must be >= 1, got {num_subsets}.')
  if explicit:
    sizes = [int(v) for v in explicit]
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


def _per_subset(values, scalar, k: int, name: str) -> list:
  if not values:
    return [scalar] * k
  values = list(values)
  if len(values) == 1:
    return values * k
  if len(values) != k:
    raise ConfigError(f'seqmatch.{name} has {len(values)} entries for '
                      f'{k} subsets; give one per subset or a single value.')
  return values


def subset_schedule(config: ml_collections.ConfigDict) -> list[distill_lib.SubsetPlan]:
  """One `SubsetPlan` per subset, from the distill.* scalars and the per-subset
  seqmatch.* lists (paper Table 4)."""
  k = config.seqmatch.num_subsets
  sizes = subset_sizes(config.ipc, k, config.seqmatch.subset_ipc)
  d, s = config.distill, config.seqmatch
  cols = dict(
      iterations=_per_subset(s.iterations, d.iterations, k, 'iterations'),
      syn_steps=_per_subset(s.syn_steps, d.syn_steps, k, 'syn_steps'),
      expert_epochs=_per_subset(s.expert_epochs, d.expert_epochs, k, 'expert_epochs'),
      max_start_epoch=_per_subset(s.max_start_epoch, d.max_start_epoch, k,
                                  'max_start_epoch'),
      lr_teacher=_per_subset(s.lr_teacher, d.lr_teacher, k, 'lr_teacher'),
      lr_img=_per_subset(s.lr_img, d.lr_img, k, 'lr_img'),
      lr_lr=_per_subset(s.lr_lr, d.lr_lr, k, 'lr_lr'))
  return [distill_lib.SubsetPlan(
      index=i, ipc=sizes[i], iterations=int(cols['iterations'][i]),
      syn_steps=int(cols['syn_steps'][i]),
      expert_epochs=int(cols['expert_epochs'][i]),
      max_start_epoch=int(cols['max_start_epoch'][i]),
      lr_teacher=float(cols['lr_teacher'][i]), lr_img=float(cols['lr_img'][i]),
      lr_lr=float(cols['lr_lr'][i]),
      batch_syn=d.batch_syn, min_syn_lr=d.min_syn_lr) for i in range(k)]


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


@functools.lru_cache(maxsize=8)
def _staged_trainer(network: Network, protocol: evaluate_lib.Protocol):
  """Jitted (key, lrs, stages) -> (params, state) after training in stages."""
  return jax.jit(lambda key, lrs, stages: evaluate_lib.train_stages(
      network, protocol, key, lrs, stages)[:2])


def staged_init_fn(network: Network, protocol: evaluate_lib.Protocol,
                   stages: list[tuple[jax.Array, jax.Array]],
                   lrs: list[float]) -> experts_lib.InitFn:
  """Starting weights of subset k's experts: a fresh network trained on S_1,
  then S_1 ∪ S_2, ... S_1..S_{k-1} with the evaluation protocol and each
  stage's learned lr (the staged evaluation, carried into the experts)."""
  trainer = _staged_trainer(network, protocol)
  lrs = jnp.asarray(lrs, jnp.float32)
  return lambda i, key: trainer(key, lrs, tuple(stages))


@dataclasses.dataclass
class SyntheticSet:
  images: np.ndarray  # model space, all subsets, subset-major
  labels: np.ndarray
  subset: np.ndarray
  lrs: list[float]  # learned step size of each subset


@dataclasses.dataclass
class Context:
  """What the subset loop needs from the pipeline."""
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
  on_eval: Callable | None = None  # (subset index, images so far, it) -> None
  progress: bool = True


def distill_all(ctx: Context, tag: str = '') -> SyntheticSet:
  """Distils S_1..S_K in order (resuming finished subsets from disk)."""
  config = ctx.config
  plans = subset_schedule(config)
  sizes = [p.ipc for p in plans]
  labels, subset = subset_layout(sizes, ctx.num_classes)
  init = initial_images(jax.random.fold_in(ctx.key, 1), ctx.x_train, ctx.y_train,
                        sizes, ctx.num_classes, config.distill.pix_init)
  root = os.path.join(ctx.workdir, tag) if tag else ctx.workdir
  os.makedirs(os.path.join(root, 'subsets'), exist_ok=True)
  done_images, lrs = [], []
  protocol = evaluate_lib.protocol_from_config(config)
  for plan in plans:
    k = plan.index
    mine = subset == k
    frozen = subset < k
    out_path = os.path.join(root, 'subsets', f'subset_{k + 1}.npz')
    if parallel.agree(os.path.exists(out_path)):
      with np.load(out_path) as f:
        if (f['images_model'].shape != init[mine].shape or
            not np.array_equal(f['labels'], labels[mine])):
          raise ConfigError(
              f'{out_path} holds a subset of another shape or labelling than '
              'this config asks for (ipc, num_subsets or subset_ipc changed?); '
              'use a new workdir or delete the subsets/ and distill/ folders.')
        done_images.append(f['images_model'])
        lrs.append(float(f['lr']))
      logging.info('subset %d already distilled (%s)', k + 1, out_path)
      continue
    store = _experts_for(ctx, k, done_images, labels, subset, lrs, protocol)
    frozen_images = (np.concatenate(done_images) if done_images
                     else np.zeros((0,) + init.shape[1:], np.float32))
    evaluate_fn = None
    if ctx.x_val is not None and len(ctx.x_val) and config.distill.eval_every:
      evaluate_fn = _val_evaluator(ctx, labels[subset <= k], subset[subset <= k],
                                   lrs)
    state = distill_lib.distill_subset(
        network=ctx.network, plan=plan, store=store,
        init_images=jnp.asarray(init[mine]), labels=jnp.asarray(labels[mine]),
        frozen=jnp.asarray(frozen_images), frozen_labels=jnp.asarray(labels[frozen]),
        key=jax.random.fold_in(ctx.key, 100 + k), seed=config.seed,
        ckpt_dir=os.path.join(root, 'distill', f'subset_{k + 1}'),
        augment=config.augment.strategy, remat=config.distill.remat,
        checkpoint_every=config.distill.checkpoint_every,
        eval_every=config.distill.eval_every, evaluate_fn=evaluate_fn,
        trajectories_per_step=config.distill.trajectories_per_step,
        mesh=ctx.mesh, should_stop=ctx.should_stop, writer=ctx.writer,
        on_eval=(None if ctx.on_eval is None else
                 lambda st, it, k=k, fi=frozen_images: ctx.on_eval(
                     k, np.concatenate([fi, parallel.fetch(st.images)]), it)),
        progress=ctx.progress, log_name=f'distill_{tag}' if tag else 'distill')
    use_best = evaluate_fn is not None and float(state.best_score) >= 0
    images = parallel.fetch(state.best_images if use_best else state.images)
    lr = float(parallel.fetch(state.best_lr if use_best else state.syn_lr))
    parallel.main_only(lambda: _save_npz(out_path, images_model=images,
                                         lr=np.float32(lr), labels=labels[mine]),
                       f'subset {tag} {k + 1}')
    done_images.append(images)
    lrs.append(lr)
  return SyntheticSet(np.concatenate(done_images), labels, subset, lrs)


def _save_npz(path: str, **arrays) -> None:
  tmp = path + '.tmp.npz'
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def _experts_for(ctx: Context, k: int, done_images, labels, subset, lrs,
                 protocol) -> experts_lib.TrajectoryStore:
  """Subset 1 uses the real-data experts; subset k >= 2 gets its own staged set,
  built (or finished) here."""
  if k == 0:
    return experts_lib.TrajectoryStore(ctx.experts_dir)
  config = ctx.config
  stages = evaluate_lib.stage_sets(np.concatenate(done_images), labels[subset < k],
                                   subset[subset < k])
  spec = experts_lib.ExpertSpec(
      num=config.experts.num, epochs=config.experts.staged_epochs,
      lr=config.experts.lr, momentum=config.experts.momentum,
      batch_size=config.experts.batch_size, augment=config.augment.strategy,
      per_batch=config.experts.per_batch)
  meta = dict(ctx.expert_metadata, start=f'staged on subsets 1..{k}',
              stage_lrs=[float(v) for v in lrs[:k]],
              stages_crc=experts_lib.tree_crc32(done_images))
  path = os.path.join(ctx.workdir, 'experts_staged', f'subset_{k + 1}')
  logging.info('building %d staged experts for subset %d in %s', spec.num, k + 1, path)
  store = experts_lib.train_experts(
      ctx.network, spec, path, ctx.x_train, ctx.y_train, ctx.x_test, ctx.y_test,
      jax.random.fold_in(ctx.key, 200 + k), meta,
      init_fn=staged_init_fn(ctx.network, protocol, stages, lrs[:k]),
      expert_ids=parallel.process_share(spec.num),
      should_stop=ctx.should_stop, writer=ctx.writer,
      mesh=parallel.model_mesh(config.parallel.num_devices),
      progress=ctx.progress)
  parallel.barrier(f'staged experts {ctx.workdir} {k + 1}')
  if parallel.agree(len(store.experts()) < spec.num):
    raise distill_lib.Interrupted(f'stopped while training staged experts for '
                                  f'subset {k + 1}')
  return store


def _val_evaluator(ctx: Context, labels, subset, prev_lrs):
  """Staged validation accuracy of the set so far (selects the best iterate)."""
  config = ctx.config

  def evaluate_fn(images, syn_lr, it):
    lrs = np.asarray(list(prev_lrs) + [float(syn_lr)], np.float32)
    r = evaluate_lib.evaluate_synthetic(
        images, labels, lrs, config, jax.random.fold_in(ctx.key, 300 + it),
        x_eval=ctx.x_val, y_eval=ctx.y_val, num_classes=ctx.num_classes,
        subset=subset, num_models=config.distill.eval_models,
        epochs=config.distill.eval_epochs, mesh=ctx.mesh)
    return r['mean'] / 100.0
  return evaluate_fn
