"""The distillation loop for one synthetic subset (MTT backbone).

`DistillState` holds everything a run needs to continue bit for bit: the
trainable images, the learnable step size, both optimizer states, the PRNG key,
the iteration and the best set so far. `make_distill_step` returns the jitted,
pure update; `distill_subset` drives it: samples expert windows from a
`TrajectoryStore`, evaluates, checkpoints with Orbax and stops cleanly on
SIGTERM/SIGINT. SeqMatch (seqmatch.py) calls it once per subset with the frozen
earlier subsets.
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

from seqmatch_jax import matching
from seqmatch_jax import parallel
from seqmatch_jax.errors import CheckpointError, UserError
from seqmatch_jax.experts import TrajectoryStore
from seqmatch_jax.models import Network


class Diverged(UserError):
  """The matching loss became NaN or inf."""


class Interrupted(Exception):
  """SIGTERM/SIGINT arrived; state was saved and the run can resume."""


@dataclasses.dataclass(frozen=True)
class SubsetPlan:
  """Distillation hyperparameters of one subset (paper Table 4 column)."""
  index: int  # 0-based subset index k-1
  ipc: int
  iterations: int
  syn_steps: int
  expert_epochs: int
  max_start_epoch: int
  lr_teacher: float
  lr_img: float
  lr_lr: float
  batch_syn: int  # 0 = the subset's size
  min_syn_lr: float = 1e-6


@flax.struct.dataclass
class DistillState:
  images: jax.Array  # the trainable subset, model space
  syn_lr: jax.Array  # scalar, learnable student step size
  opt_images: Any
  opt_lr: Any
  key: jax.Array  # raw uint32 key data
  iteration: jax.Array
  best_score: jax.Array  # validation accuracy of the best set (-1: none yet)
  best_images: jax.Array
  best_lr: jax.Array


def optimizers(plan: SubsetPlan) -> tuple[optax.GradientTransformation, ...]:
  """SGD with momentum 0.5 for the pixels and for the step size (reference)."""
  return (optax.sgd(plan.lr_img, momentum=0.5), optax.sgd(plan.lr_lr, momentum=0.5))


def init_state(images: jax.Array, plan: SubsetPlan, key: jax.Array) -> DistillState:
  tx_img, tx_lr = optimizers(plan)
  syn_lr = jnp.asarray(plan.lr_teacher, jnp.float32)
  return DistillState(
      images=images, syn_lr=syn_lr, opt_images=tx_img.init(images),
      opt_lr=tx_lr.init(syn_lr), key=jax.random.key_data(key),
      iteration=jnp.zeros((), jnp.int32), best_score=jnp.full((), -1.0, jnp.float32),
      best_images=jnp.copy(images), best_lr=jnp.copy(syn_lr))  # own buffers: the
  # step donates the state, and one buffer must not be donated twice.


def make_distill_step(network: Network, plan: SubsetPlan, *, augment: str,
                      remat: bool, batch_syn: int, mesh=None,
                      donate: bool | None = None) -> Callable:
  """Jitted `(state, frozen, labels, starts, targets) -> (state, metrics)`.

  `starts`/`targets` hold T expert windows stacked on a leading axis. With a
  mesh of D devices they are split over `data` (T/D per device, run in turn
  with `lax.map`) and the meta-gradients averaged across devices with `pmean`:
  the result is the mean of T single-trajectory meta-gradients. The state is
  donated (default: on accelerators, where it saves a copy of the set).
  """
  tx_img, tx_lr = optimizers(plan)
  grad_fn = matching.meta_gradient(network, num_steps=plan.syn_steps,
                                   batch_size=batch_syn, augment=augment,
                                   remat=remat)

  def local(images, syn_lr, frozen, labels, starts, targets, keys):
    def one(args):
      s, t, k = args
      loss, (g_img, g_lr) = grad_fn(images, syn_lr, frozen, labels, s, t, k)
      return loss, g_img, g_lr
    losses, g_img, g_lr = jax.lax.map(one, (starts, targets, keys))
    out = (jnp.mean(losses), jnp.mean(g_img, 0), jnp.mean(g_lr, 0))
    if mesh is not None and mesh.size > 1:
      out = jax.lax.pmean(out, parallel.DATA)
    return out

  if mesh is not None and mesh.size > 1:
    rep = P()
    local = jax.shard_map(
        local, mesh=mesh, in_specs=(rep, rep, rep, rep, P(parallel.DATA),
                                    P(parallel.DATA), P(parallel.DATA)),
        out_specs=(rep, rep, rep), check_vma=False)

  def step(state: DistillState, frozen, labels, starts, targets):
    num = jax.tree.leaves(starts)[0].shape[0]
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.iteration)
    keys = jax.random.key_data(jax.random.split(key, num))
    keys = jax.vmap(jax.random.wrap_key_data)(keys)
    loss, g_img, g_lr = local(state.images, state.syn_lr, frozen, labels,
                              starts, targets, keys)
    upd, opt_images = tx_img.update(g_img, state.opt_images)
    images = optax.apply_updates(state.images, upd)
    upd, opt_lr = tx_lr.update(g_lr, state.opt_lr)
    # Projection keeps the step size positive (the reference lets it go
    # negative or explode, MTT issues 16/24/31) without changing its dynamics
    # while it is positive.
    syn_lr = jnp.maximum(optax.apply_updates(state.syn_lr, upd), plan.min_syn_lr)
    new = state.replace(images=images, syn_lr=syn_lr, opt_images=opt_images,
                        opt_lr=opt_lr, iteration=state.iteration + 1)
    metrics = dict(loss=loss, syn_lr=syn_lr, grad_norm_images=optax.global_norm(g_img),
                   grad_lr=g_lr)
    return new, metrics

  if donate is None:
    donate = jax.default_backend() != 'cpu'
  # On a mesh everything the step returns is replicated: the next step (and
  # Orbax) then sees the same layout as the restored state.
  out = None if mesh is None else parallel.replicated(mesh)
  return jax.jit(step, donate_argnums=(0,) if donate else (), out_shardings=out)


def sample_picks(experts: list[int], plan: SubsetPlan, seed: int, iteration: int,
                 count: int) -> list[tuple[int, int]]:
  """(expert id, start epoch) per trajectory: a pure function of (seed, subset,
  iteration, count), so a resumed run, on any number of hosts, samples exactly
  what the uninterrupted one did."""
  rng = np.random.default_rng([seed, plan.index, iteration])
  picks = []
  for _ in range(count):
    e = int(rng.choice(experts))
    t = int(rng.integers(0, plan.max_start_epoch))
    picks.append((e, t))
  return picks


def load_windows(store: TrajectoryStore, picks: list[tuple[int, int]],
                 plan: SubsetPlan, mesh=None):
  """Start and target parameters of `picks`, stacked on a leading axis.

  With a mesh they come back as global arrays split over `data`, and each
  process reads from disk only the windows its own devices use.
  """
  def load(rows):
    stack = lambda trees: jax.tree.map(lambda *x: np.stack(x), *trees)
    starts = [store.load(*picks[r]) for r in rows]
    targets = [store.load(picks[r][0], picks[r][1] + plan.expert_epochs)
               for r in rows]
    return stack(starts), stack(targets)
  if mesh is None:
    return load(range(len(picks)))
  return parallel.shard_from_loader(len(picks), mesh, load)


def sample_windows(store: TrajectoryStore, experts: list[int], plan: SubsetPlan,
                   seed: int, iteration: int, count: int, mesh=None):
  """`count` expert windows for `iteration`: (starts, targets, picks)."""
  picks = sample_picks(experts, plan, seed, iteration, count)
  starts, targets = load_windows(store, picks, plan, mesh)
  return starts, targets, picks


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
    raise CheckpointError(
        f'Distillation checkpoint {path}/{step} cannot be restored '
        f'({type(e).__name__}: {str(e).splitlines()[0][:200]}). Move it away to '
        'fall back to the previous one, or start a new workdir.') from e
  return state, mgr


def distill_subset(*, network: Network, plan: SubsetPlan, store: TrajectoryStore,
                   init_images: jax.Array, labels: jax.Array, frozen: jax.Array,
                   frozen_labels: jax.Array, key: jax.Array, seed: int,
                   ckpt_dir: str, augment: str, remat: bool,
                   checkpoint_every: int, eval_every: int,
                   evaluate_fn: Callable[[jax.Array, jax.Array, int], float] | None,
                   trajectories_per_step: int = 0, mesh=None,
                   should_stop: Callable[[], bool] = lambda: False,
                   writer=None, on_eval: Callable | None = None,
                   progress: bool = True, log_name: str = 'distill') -> DistillState:
  """Runs (or resumes) the distillation of one subset; returns the final state.

  Args:
    init_images: starting pixels (model space) of the trainable subset.
    labels: labels of the trainable subset.
    frozen, frozen_labels: earlier subsets (possibly empty), never updated.
    evaluate_fn: (images of the full set so far, lr, iteration) -> validation
      accuracy; called every `eval_every` iterations to keep the best set.
    log_name: TensorBoard prefix (runs sharing a writer keep their curves apart).
  """
  experts = store.experts()
  wanted = int(store.metadata.get('num_experts', len(experts)))
  if len(experts) < wanted:
    raise CheckpointError(
        f'Only {len(experts)} of {wanted} expert trajectories in {store.path} are '
        'complete; rerun mode=experts (or mode=all) to finish them first.')
  experts = experts[:wanted]  # a fixed list: resumed runs sample the same windows
  if plan.max_start_epoch - 1 + plan.expert_epochs > store.epochs:
    raise UserError(
        f'Subset {plan.index + 1}: max_start_epoch {plan.max_start_epoch} + '
        f'expert_epochs {plan.expert_epochs} exceeds the experts\' '
        f'{store.epochs} epochs; lower them or train longer experts.')
  num_devices = 1 if mesh is None else mesh.size
  traj = trajectories_per_step or num_devices
  if traj % num_devices:
    raise UserError(f'distill.trajectories_per_step={traj} must be a multiple '
                    f'of the {num_devices} devices.')
  all_labels = parallel.replicate(jnp.concatenate([frozen_labels, labels]), mesh)
  frozen = parallel.replicate(frozen, mesh)
  batch_syn = plan.batch_syn or int(labels.shape[0])
  step_fn = make_distill_step(network, plan, augment=augment, remat=remat,
                              batch_syn=batch_syn, mesh=mesh)
  fresh = parallel.replicate(init_state(init_images, plan, key), mesh)
  state, mgr = restore_or_init(ckpt_dir, fresh)
  _check_run_record(ckpt_dir, traj, num_devices, resumed=int(state.iteration) > 0)
  start = int(state.iteration)
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

  bar = tqdm.tqdm(total=plan.iterations, initial=start, disable=not progress,
                  desc=f'{log_name} subset {plan.index + 1}', dynamic_ncols=True)
  last_time = time.time()
  for it in range(start, plan.iterations):
    if parallel.any_process(should_stop()):  # every host stops at the same step
      save()
      parallel.barrier(f'{ckpt_dir} stopped at {it}')  # all saved before any exits
      bar.close()
      raise Interrupted(f'stopped at iteration {it} of subset {plan.index + 1}')
    if evaluate_fn is not None and eval_every and it % eval_every == 0 and it > 0:
      state = _evaluate(state, evaluate_fn, frozen, writer, it, plan, on_eval,
                        log_name, mesh)
    starts, targets, _ = sample_windows(store, experts, plan, seed, it, traj, mesh)
    syn_lr_before = float(state.syn_lr)  # host copy: `state` is donated below
    new_state, metrics = step_fn(state, frozen, all_labels, starts, targets)
    loss = float(metrics['loss'])
    if not np.isfinite(loss):
      last = mgr.latest_step()
      bar.close()
      raise Diverged(
          f'Matching loss is {loss} at iteration {it} of subset {plan.index + 1}: '
          f'lr_img ({plan.lr_img}) or the learned syn_lr '
          f'({syn_lr_before:.3g}) is likely too large. Last good checkpoint: '
          f'{os.path.join(ckpt_dir, str(last)) if last is not None else "none"} '
          '(left intact).')
    state = new_state
    now = time.time()
    if writer is not None:
      writer.add_scalar(f'{log_name}/subset{plan.index + 1}/loss', loss, it)
      writer.add_scalar(f'{log_name}/subset{plan.index + 1}/syn_lr', float(metrics['syn_lr']), it)
      writer.add_scalar(f'{log_name}/subset{plan.index + 1}/grad_norm_images',
                        float(metrics['grad_norm_images']), it)
      writer.add_scalar(f'{log_name}/subset{plan.index + 1}/iters_per_s',
                        1.0 / max(now - last_time, 1e-9), it)
    last_time = now
    bar.set_postfix(loss=f'{loss:.4f}', syn_lr=f'{float(metrics["syn_lr"]):.4g}')
    bar.update(1)
    if checkpoint_every and (it + 1) % checkpoint_every == 0:
      save()
  bar.close()
  if evaluate_fn is not None and eval_every:
    state = _evaluate(state, evaluate_fn, frozen, writer, plan.iterations, plan,
                      on_eval, log_name, mesh)
  save(overwrite=evaluate_fn is not None and bool(eval_every))
  return state


def _check_run_record(ckpt_dir: str, traj: int, num_devices: int,
                      resumed: bool) -> None:
  """Records the trajectories per step of a run; a resumed run must keep it.

  The number of devices (hosts x devices per host) may change between a run
  and its resumption: the synthetic state is replicated and the windows are a
  function of (seed, subset, iteration, trajectories per step). What may not
  change is that count itself, since it is the effective batch of the
  meta-gradient; with its default (one per device) a new device count would
  silently change it.
  """
  path = os.path.join(ckpt_dir, 'run.json')
  if resumed and parallel.agree(os.path.exists(path)):
    with open(path) as f:
      old = json.load(f)
    if int(old['trajectories_per_step']) != traj:
      hint = (f'set --config.distill.trajectories_per_step={old["trajectories_per_step"]}'
              if old['trajectories_per_step'] % num_devices == 0 else
              f'run on a device count that divides {old["trajectories_per_step"]}')
      raise UserError(
          f'{ckpt_dir} was distilled with {old["trajectories_per_step"]} '
          f'trajectories per step ({old["devices"]} devices); this run would use '
          f'{traj} ({num_devices} devices), which changes the meta-gradient. To '
          f'continue the same run, {hint}; or start a new workdir.')
    return
  def write():
    os.makedirs(ckpt_dir, exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
      json.dump(dict(trajectories_per_step=traj, devices=num_devices), f)
    os.replace(tmp, path)
  parallel.main_only(write, f'{path}')


def _evaluate(state: DistillState, evaluate_fn, frozen, writer, it: int,
              plan: SubsetPlan, on_eval, log_name: str, mesh=None) -> DistillState:
  """Scores the current set (all subsets so far) and keeps it if it is the best.

  Every process computes the same score (the evaluation gathers its models'
  accuracies from all hosts), so all keep the same best set.
  """
  images = np.concatenate([parallel.fetch(frozen), parallel.fetch(state.images)])
  score = float(evaluate_fn(images, parallel.fetch(state.syn_lr), it))
  logging.info('subset %d iteration %d: validation accuracy %.4f', plan.index + 1,
               it, score)
  if writer is not None:
    writer.add_scalar(f'{log_name}/subset{plan.index + 1}/val_acc', score, it)
  if on_eval is not None:
    on_eval(state, it)
  if score > float(state.best_score):
    best = dict(best_score=np.asarray(score, np.float32),
                best_images=parallel.fetch(state.images),
                best_lr=parallel.fetch(state.syn_lr))
    if mesh is None:
      best = jax.tree.map(jnp.asarray, best)
    state = state.replace(**parallel.replicate(best, mesh))
  return state
