"""The distillation loop for one synthetic subset, generic over the backbone.

`DistillState` holds everything a run needs to continue bit for bit: the
trainable images, the backbone's learnable extras (MTT's step size), both
optimizer states, the backbone's auxiliary state, the PRNG key, the iteration
and the best set so far. `make_distill_step` returns the jitted, pure update;
`distill_subset` drives it: draws the backbone's resources, evaluates,
checkpoints with Orbax and stops cleanly on SIGTERM/SIGINT. SeqMatch
(seqmatch.py) calls it once per subset with the frozen earlier subsets.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

from absl import logging
import flax
import jax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from seqmatch_jax import files
from seqmatch_jax import hostmem
from seqmatch_jax import parallel
from seqmatch_jax.backbones.base import Backbone, Source, SubsetPlan
from seqmatch_jax.errors import CheckpointError, Diverged, Interrupted, UserError

# Salts for keys derived from a trajectory's key (the loss itself gets the
# trajectory key unchanged, so one-match backbones see the key they always did).
_INIT_SALT = 0x7FFFFFF0
_NET_SALT = 0x7FFFFFF1


@flax.struct.dataclass
class DistillState:
  # The trainable subset in the backbone's stored form (model space; IDC:
  # [0,1] pixel tiles).
  images: jax.Array
  extras: dict  # backbone's learnable scalars, e.g. {'syn_lr': ...}
  opt_images: Any
  opt_extras: Any
  aux: dict  # backbone's other state (e.g. an image EMA)
  key: jax.Array  # raw uint32 key data
  iteration: jax.Array
  best_score: jax.Array  # validation accuracy of the best set (-1: none yet)
  best_images: jax.Array
  best_extras: dict


@dataclasses.dataclass(frozen=True)
class LoopOptions:
  """How `distill_subset` runs, apart from what it distils."""
  ckpt_dir: str
  seed: int = 0
  checkpoint_every: int = 100
  eval_every: int = 0
  trajectories_per_step: int = 0  # 0 = one per device
  progress: bool = True
  log_name: str = 'distill'  # TensorBoard prefix: runs sharing a writer stay apart
  record: dict | None = None  # settings that define the subset (checked on resume)


def init_state(backbone: Backbone, plan: SubsetPlan, images: jax.Array,
               key: jax.Array) -> DistillState:
  tx_img, tx_ext = backbone.optimizers(plan)
  extras = backbone.init_extras(plan)
  return DistillState(
      images=images, extras=extras, opt_images=tx_img.init(images),
      opt_extras=tx_ext.init(extras), aux=backbone.init_aux(plan, images),
      key=jax.random.key_data(key), iteration=jnp.zeros((), jnp.int32),
      best_score=jnp.full((), -1.0, jnp.float32),
      # Own buffers: the step donates the state, and one buffer must not be
      # donated twice.
      best_images=jnp.copy(images), best_extras=jax.tree.map(jnp.copy, extras))


def make_distill_step(backbone: Backbone, plan: SubsetPlan, *, trajectories: int,
                      mesh=None, donate: bool | None = None) -> Callable:
  """Jitted `(state, frozen, labels, resources, data) -> (state, metrics)`.

  `resources` (or None) hold the iteration's T = `trajectories` resources
  stacked on a leading axis; each trajectory also gets its own key. With a
  mesh of D devices they are split over `data` (T/D per device, run in turn
  with `lax.map`) and the gradients averaged across devices with `pmean`: the
  result is the mean of T single-trajectory gradients, and every device
  applies the same update. `labels` cover frozen then trainable images. The
  state is donated (default: on accelerators, where it saves a copy).
  """
  tx_img, tx_ext = backbone.optimizers(plan)
  matches = backbone.matches(plan)
  per_class = backbone.step_per_class(plan)
  num_classes = backbone.network.num_classes
  sharded = mesh is not None and mesh.size > 1

  def loss_fn(images, extras, frozen, labels, inner, key, data, class_index):
    images_all = jnp.concatenate([jax.lax.stop_gradient(frozen), images])
    return backbone.loss(plan, images_all, labels, extras, inner, key, data,
                         class_index)
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1))

  def mean_grads(images, extras, frozen, labels, inners, keys, data,
                 class_index=None):
    def one(args):
      inner, k = args
      loss, (g_img, g_ext) = grad_fn(images, extras, frozen, labels, inner, k,
                                     data, class_index)
      return loss, g_img, g_ext
    losses, g_img, g_ext = jax.lax.map(one, (inners, keys))
    out = (jnp.mean(losses), jnp.mean(g_img, 0),
           jax.tree.map(lambda g: jnp.mean(g, 0), g_ext))
    if sharded:
      out = jax.lax.pmean(out, parallel.DATA)
    return out

  def update(opt, g_img, g_ext):
    images, extras, opt_images, opt_extras = opt
    upd, opt_images = tx_img.update(g_img, opt_images)
    images = optax.apply_updates(images, upd)
    upd, opt_extras = tx_ext.update(g_ext, opt_extras)
    extras = backbone.project_extras(optax.apply_updates(extras, upd), plan)
    return images, extras, opt_images, opt_extras

  def match(opt, inners, keys, frozen, labels, data):
    """One image update: on the loss summed over classes, or one per class."""
    if not per_class:
      loss, g_img, g_ext = mean_grads(opt[0], opt[1], frozen, labels, inners,
                                      keys, data)
      return update(opt, g_img, g_ext), loss, g_img
    def one_class(opt, c):
      loss, g_img, g_ext = mean_grads(opt[0], opt[1], frozen, labels, inners,
                                      keys, data, c)
      return update(opt, g_img, g_ext), (loss, g_img)
    opt, (losses, g_img) = jax.lax.scan(one_class, opt, jnp.arange(num_classes))
    return opt, jnp.sum(losses), g_img[-1]

  def initial_inners(resources, keys, data):
    if type(backbone).init_inner is Backbone.init_inner:
      return resources  # the resource is the trajectory's state (MTT's window)
    return jax.lax.map(lambda a: backbone.init_inner(
        plan, a[0], jax.random.fold_in(a[1], _INIT_SALT), data), (resources, keys))

  def iterate(images, extras, opt_images, opt_extras, frozen, labels, resources,
              keys, data):
    inners = initial_inners(resources, keys, data)
    opt = (images, extras, opt_images, opt_extras)

    def match_then_train(carry, m):
      opt, inners = carry
      mkeys = jax.vmap(lambda k: jax.random.fold_in(k, m))(keys)
      opt, loss, _ = match(opt, inners, mkeys, frozen, labels, data)
      all_images = jax.lax.stop_gradient(jnp.concatenate([frozen, opt[0]]))
      inners = jax.lax.map(lambda a: backbone.net_update(
          plan, a[0], all_images, labels, jax.random.fold_in(a[1], _NET_SALT), data),
          (inners, mkeys))
      return (opt, inners), loss

    losses = []
    if matches > 1:
      (opt, inners), losses = jax.lax.scan(match_then_train, (opt, inners),
                                           jnp.arange(matches - 1))
      losses = [losses]
      keys = jax.vmap(lambda k: jax.random.fold_in(k, matches - 1))(keys)
    opt, loss, g_img = match(opt, inners, keys, frozen, labels, data)
    if losses:
      loss = jnp.mean(jnp.concatenate(losses + [loss[None]]))
    return opt, loss, g_img

  if sharded:
    rep = P()
    iterate = jax.shard_map(
        iterate, mesh=mesh,
        in_specs=(rep, rep, rep, rep, rep, rep, P(parallel.DATA), P(parallel.DATA),
                  rep),
        out_specs=(rep, rep, rep), check_vma=False)

  def step(state: DistillState, frozen, labels, resources, data):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.iteration)
    keys = jax.random.key_data(jax.random.split(key, trajectories))
    keys = jax.vmap(jax.random.wrap_key_data)(keys)
    (images, extras, opt_images, opt_extras), loss, g_img = iterate(
        state.images, state.extras, state.opt_images, state.opt_extras, frozen,
        labels, resources, keys, data)
    new = state.replace(images=images, extras=extras, opt_images=opt_images,
                        opt_extras=opt_extras, iteration=state.iteration + 1)
    new = backbone.post_step(plan, new)
    metrics = dict(loss=loss, grad_norm_images=optax.global_norm(g_img), **extras)
    return new, metrics

  if donate is None:
    donate = jax.default_backend() != 'cpu'
  # On a mesh everything the step returns is replicated: the next step (and
  # Orbax) then sees the same layout as the restored state.
  out = None if mesh is None else parallel.replicated(mesh)
  return jax.jit(step, donate_argnums=(0,) if donate else (), out_shardings=out)


def _checkpoint_manager(path: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(path, options=options)


def restore_or_init(path: str, fresh: DistillState) -> tuple[DistillState, ocp.CheckpointManager]:
  """Latest checkpoint under `path` if any (a damaged one is an error: it is
  never silently replaced by a fresh start that would lose work)."""
  mgr = _checkpoint_manager(os.path.abspath(path))
  # Process 0 decides which step every process restores (-1: none).
  step = parallel.agree(-1 if mgr.latest_step() is None else mgr.latest_step())
  if step < 0:
    return fresh, mgr
  try:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
    state = mgr.restore(step, args=ocp.args.StandardRestore(abstract))
  except Exception as e:
    # The library's own text (TensorStore / pybind) names C++ internals, not
    # the fix: the type is enough to tell a damaged file from a missing one.
    raise CheckpointError(
        f'Distillation checkpoint {path}/{step} cannot be restored: its files '
        f'are damaged or incomplete ({type(e).__name__}). Move the folder '
        f'{path}/{step} away to fall back to the previous checkpoint, or start '
        'a new workdir.') from e
  return state, mgr


def distill_subset(backbone: Backbone, plan: SubsetPlan, source: Source, *,
                   init_images: jax.Array, labels: jax.Array, frozen: jax.Array,
                   frozen_labels: jax.Array, key: jax.Array, options: LoopOptions,
                   evaluate_fn: Callable[[np.ndarray, float, int], float] | None = None,
                   mesh=None, should_stop: Callable[[], bool] = lambda: False,
                   writer=None, on_eval: Callable | None = None) -> DistillState:
  """Runs (or resumes) the distillation of one subset; returns the final state.

  Args:
    source: the subset's resources (`backbone.prepare`).
    init_images: starting images of the trainable subset (the backbone's stored form).
    labels: labels of the trainable subset.
    frozen, frozen_labels: earlier subsets (possibly empty), never updated.
    evaluate_fn: (images of the full set so far, lr, iteration) -> validation
      accuracy; called every `options.eval_every` iterations to keep the best.
      It may raise `Interrupted` (a stop during the evaluation): the state as
      of that iteration is then saved and the rerun redoes the evaluation.
  """
  num_devices = 1 if mesh is None else mesh.size
  traj = options.trajectories_per_step or num_devices
  if traj % num_devices:
    raise UserError(f'distill.trajectories_per_step={traj} must be a multiple '
                    f'of the {num_devices} devices.')
  all_labels = parallel.replicate(jnp.concatenate([frozen_labels, labels]), mesh)
  frozen = parallel.replicate(frozen, mesh)
  data = parallel.replicate(source.data, mesh)
  step_fn = make_distill_step(backbone, plan, trajectories=traj, mesh=mesh)
  fresh = parallel.replicate(init_state(backbone, plan, init_images, key), mesh)
  ckpt_dir = options.ckpt_dir
  state, mgr = restore_or_init(ckpt_dir, fresh)
  _check_run_record(ckpt_dir, traj, num_devices, resumed=int(state.iteration) > 0,
                    record=options.record)
  start = int(state.iteration)
  name = f'{options.log_name}/subset{plan.index + 1}'
  if start:
    logging.info('subset %d: resuming at iteration %d', plan.index + 1, start)

  def save(overwrite: bool = False):
    step = int(state.iteration)
    if step in mgr.all_steps():
      if not overwrite:
        return
      mgr.delete(step)  # the final evaluation changed best_*: keep it
    mgr.save(step, args=ocp.args.StandardSave(state), force=True)
    mgr.wait_until_finished()

  evaluating = evaluate_fn is not None and bool(options.eval_every)
  bar = tqdm.tqdm(total=plan.iterations, initial=start, disable=not options.progress,
                  desc=f'{options.log_name} subset {plan.index + 1}',
                  dynamic_ncols=True)
  last_time = time.time()

  def stop(it: int, during: str = '') -> None:
    save()  # the state as of the top of iteration `it` (before any evaluation)
    parallel.barrier(f'{ckpt_dir} stopped at {it}')  # all saved before any exits
    bar.close()
    raise Interrupted(f'stopped at iteration {it} of subset {plan.index + 1}{during}')

  def evaluate(it: int) -> DistillState:
    # The evaluation polls the stop between its models (all hosts agree). A
    # stop abandons it: the rerun resumes from the saved state of iteration
    # `it` and redoes this evaluation (same key), so it stays bit for bit.
    try:
      return _evaluate(backbone, state, evaluate_fn, frozen, writer, it, plan,
                       on_eval, name, mesh)
    except Interrupted:
      stop(it, ' (during its validation evaluation)')
      raise  # not reached: stop() raises

  for it in range(start, plan.iterations):
    if parallel.any_process(should_stop()):  # every host stops at the same step
      stop(it)
    if evaluating and it % options.eval_every == 0 and it > 0:
      state = evaluate(it)
    resources = source.sample(it, traj, mesh)
    extras_before = {k: float(parallel.fetch(v)) for k, v in state.extras.items()}
    new_state, metrics = step_fn(state, frozen, all_labels, resources, data)  # donates
    loss = float(metrics['loss'])
    if not np.isfinite(loss):
      last = mgr.latest_step()
      bar.close()
      extras = ''.join(f' or the learned {k} ({v:.3g})' for k, v in extras_before.items())
      raise Diverged(
          f'Matching loss is {loss} at iteration {it} of subset {plan.index + 1}: '
          f'lr_img ({plan.lr_img}){extras} is likely too large. Last good '
          'checkpoint: '
          f'{os.path.join(ckpt_dir, str(last)) if last is not None else "none"} '
          '(left intact).')
    state = new_state
    if it == start:  # the step was compiled in this call: return its scratch
      hostmem.release_freed_memory()
    now = time.time()
    values = {k: float(v) for k, v in metrics.items()}
    if writer is not None:
      for k, v in values.items():
        writer.add_scalar(f'{name}/{k}', v, it)
      writer.add_scalar(f'{name}/iters_per_s', 1.0 / max(now - last_time, 1e-9), it)
    last_time = now
    bar.set_postfix({k: f'{v:.4g}' for k, v in values.items()
                     if k != 'grad_norm_images'})
    bar.update(1)
    if options.checkpoint_every and (it + 1) % options.checkpoint_every == 0:
      save()
  bar.close()
  if evaluating:
    state = evaluate(plan.iterations)
  save(overwrite=evaluating)
  return state


def check_record(old: dict | None, new: dict, where: str,
                 redo: str | None = None) -> None:
  """Refuses to continue work made under other settings (naming them, and
  `redo`: what to delete to redo it with the new ones; default `where`)."""
  if old is None:
    return
  diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  if diff:
    changes = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff)
    raise UserError(
        f'{where} was made with other settings ({changes}). Either restore '
        'them (the per-subset value may come from <backbone>.per_subset.*), or '
        f'use a new --workdir, or delete {redo or where} to redo it with the '
        'new ones.')


def read_run_record(ckpt_dir: str) -> dict:
  """The record a run wrote beside its checkpoints ({} when there is none)."""
  path = os.path.join(ckpt_dir, 'run.json')
  if not parallel.agree(os.path.exists(path)):
    return {}
  try:
    with open(path) as f:
      old = json.load(f)
    int(old['trajectories_per_step'])
    return old
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointError(
        f'{path} is damaged ({type(e).__name__}); delete the folder {ckpt_dir} '
        'to distil that subset again from its start, or start a new workdir.') from e


def _check_run_record(ckpt_dir: str, traj: int, num_devices: int,
                      resumed: bool, record: dict | None = None) -> None:
  """Records the trajectories per step of a run; a resumed run must keep it.

  The number of devices (hosts x devices per host) may change between a run
  and its resumption: the synthetic state is replicated and the resources are
  a function of (seed, subset, iteration, trajectories per step). What may
  not change is that count itself, since it is the effective batch of the
  gradient; with its default (one per device) a new device count would
  silently change it.
  """
  path = os.path.join(ckpt_dir, 'run.json')
  old = read_run_record(ckpt_dir) if resumed else {}
  if old:
    if record is not None:
      check_record(old.get('settings'), record, ckpt_dir)
    old_traj = int(old['trajectories_per_step'])
    if old_traj != traj:
      hint = (f'set --config.distill.trajectories_per_step={old_traj}'
              if old_traj % num_devices == 0 else
              f'run on a device count that divides {old_traj}')
      raise UserError(
          f'{ckpt_dir} was distilled with {old_traj} trajectories per step '
          f'({old.get("devices")} devices); this run would use {traj} '
          f'({num_devices} devices), which changes the gradient. To continue '
          f'the same run, {hint}; or start a new workdir.')
    return
  parallel.main_only(lambda: files.write_json(
      path, dict(trajectories_per_step=traj, devices=num_devices,
                 settings=record)), path)


def _evaluate(backbone: Backbone, state: DistillState, evaluate_fn, frozen, writer,
              it: int, plan: SubsetPlan, on_eval, name: str, mesh=None) -> DistillState:
  """Scores the current set (all subsets so far) and keeps it if it is the best.

  Every process computes the same score (the evaluation gathers its models'
  accuracies from all hosts), so all keep the same best set.
  """
  images = np.concatenate([parallel.fetch(frozen), parallel.fetch(state.images)])
  score = float(evaluate_fn(images, backbone.eval_lr(state.extras), it))
  logging.info('subset %d iteration %d: validation accuracy %.4f', plan.index + 1,
               it, score)
  if writer is not None:
    writer.add_scalar(f'{name}/val_acc', score, it)
  if on_eval is not None:
    on_eval(state, it)
  if score > float(state.best_score):
    best = dict(best_score=np.asarray(score, np.float32),
                best_images=parallel.fetch(state.images),
                best_extras=parallel.fetch(state.extras))
    if mesh is None:
      best = jax.tree.map(jnp.asarray, best)
    state = state.replace(**parallel.replicate(best, mesh))
    state = backbone.keep_best(plan, state)
  return state
