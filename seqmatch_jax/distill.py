"""The distillation loop for one synthetic subset, generic over the method.

`DistillState` holds everything a run needs to continue bit for bit: the
trainable tree {images, labels, extras, aux}, its optimizer states, the PRNG
key, the iteration and the best tree so far. `make_distill_step` returns the
jitted, pure update around the method's `step`; `StepIO` gives that step its
inputs and the pieces methods build their iteration from (the mean over
trajectories, several matches with a network trained between them, one update
per class). `distill_subset` drives it: draws the method's resources,
evaluates, checkpoints with Orbax and stops cleanly on SIGTERM/SIGINT.
SeqMatch (seqmatch.py) calls it once per subset with the frozen earlier
subsets.
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
from seqmatch_jax.backbones.base import (Backbone, Layout, Source, SubsetPlan,
                                         SynSet, Trainable)
from seqmatch_jax.errors import CheckpointError, Diverged, Interrupted, UserError

# Salts for keys derived from a trajectory's key (the loss itself gets the
# trajectory key unchanged, so one-match methods see the key they always did).
INIT_SALT = 0x7FFFFFF0
NET_SALT = 0x7FFFFFF1
# The checkpoint's tree: 2 = one trainable tree (1: images/extras/aux apart).
STATE_FORMAT = 2


@flax.struct.dataclass
class DistillState:
  trainable: dict  # {'images' (stored form), 'labels', 'extras', 'aux'}
  opt_state: dict  # one optimizer state per learnable group of `trainable`
  key: jax.Array  # raw uint32 key data
  iteration: jax.Array
  best_score: jax.Array  # validation accuracy of the best set (-1: none yet)
  best: dict  # a copy of `trainable` at the best score


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


def init_state(trainable: Trainable, optimizers: dict, key: jax.Array) -> DistillState:
  """The state at iteration 0 of `backbone.init`'s (trainable, optimizers)."""
  opt_state = {g: tx.init(trainable[g]) for g, tx in optimizers.items()}
  return DistillState(
      trainable=trainable, opt_state=opt_state, key=jax.random.key_data(key),
      iteration=jnp.zeros((), jnp.int32), best_score=jnp.full((), -1.0, jnp.float32),
      # Own buffers: the step may donate the state, and one buffer must not
      # be donated twice.
      best=jax.tree.map(jnp.copy, trainable))


def join_labels(frozen, labels):
  """The frozen subsets' labels then the trainable subset's (no frozen
  subsets: its own, whatever their form: integers or soft labels)."""
  if frozen.shape[0] == 0:
    return labels
  xp = np if isinstance(labels, np.ndarray) and isinstance(frozen, np.ndarray) else jnp
  return xp.concatenate([frozen, labels])


class StepIO:
  """What a method's `step` gets inside the jitted iteration: the frozen
  subsets, this device's trajectories (resources and keys), the source's
  data, and the helpers an iteration is made of. With a mesh the step runs
  once per device on its share of the trajectories; the helpers average
  gradients across devices, so every device applies the same update."""

  def __init__(self, *, frozen: dict, resources: Any, keys: jax.Array, data: Any,
               optimizers: dict, layout: Layout, param, sharded: bool):
    self.frozen = frozen  # {'images', 'labels'} of the earlier subsets
    self.resources = resources  # this device's trajectories' resources
    self.keys = keys  # one key per trajectory
    self.data = data
    self.optimizers = optimizers
    self.layout = layout
    self.param = param
    self.sharded = sharded

  def synset(self, trainable: Trainable) -> SynSet:
    """The matched set: the frozen subsets (no gradient) then `trainable`."""
    frozen = jax.tree.map(jax.lax.stop_gradient, self.frozen)
    return SynSet(jnp.concatenate([frozen['images'], trainable['images']]),
                  join_labels(frozen['labels'], trainable['labels']),
                  trainable['extras'], self.layout, self.param)

  def init_each(self, fn: Callable[[Any, jax.Array], Any]) -> Any:
    """`fn(resource, key)` per trajectory (e.g. a fresh network), stacked."""
    return jax.lax.map(lambda a: fn(a[0], jax.random.fold_in(a[1], INIT_SALT)),
                       (self.resources, self.keys))

  def mean_grads(self, fn: Callable, trainable: Trainable, inners: Any,
                 keys: jax.Array, *args) -> tuple[jax.Array, dict]:
    """(loss, gradients of the learnable groups): `fn(trainable, inner, key,
    *args)` averaged over the trajectories (and the devices)."""
    learn = {g: trainable[g] for g in self.optimizers}
    grad_fn = jax.value_and_grad(
        lambda p, inner, k: fn(dict(trainable, **p), inner, k, *args))

    def one(a):
      return grad_fn(learn, a[0], a[1])
    losses, grads = jax.lax.map(one, (inners, keys))
    out = (jnp.mean(losses), jax.tree.map(lambda g: jnp.mean(g, 0), grads))
    if self.sharded:
      out = jax.lax.pmean(out, parallel.DATA)
    return out

  def update(self, trainable: Trainable, opt_state: dict,
             grads: dict) -> tuple[Trainable, dict]:
    """One optimizer step on every learnable group."""
    trainable, opt_state = dict(trainable), dict(opt_state)
    for g, tx in self.optimizers.items():
      upd, opt_state[g] = tx.update(grads[g], opt_state[g])
      trainable[g] = optax.apply_updates(trainable[g], upd)
    return trainable, opt_state

  def match(self, fn: Callable, trainable: Trainable, opt_state: dict, inners: Any,
            keys: jax.Array, per_class: bool = False):
    """One image update on `fn` summed over classes, or (`per_class`) one
    update per class in turn, `fn(trainable, inner, key, c)` being class c's
    loss. Returns (trainable, opt_state, loss, gradients of the last update)."""
    if not per_class:
      loss, grads = self.mean_grads(fn, trainable, inners, keys)
      return (*self.update(trainable, opt_state, grads), loss, grads)

    def one_class(carry, c):
      loss, grads = self.mean_grads(fn, carry[0], inners, keys, c)
      return self.update(*carry, grads), (loss, grads)
    (trainable, opt_state), (losses, grads) = jax.lax.scan(
        one_class, (trainable, opt_state), jnp.arange(self.layout.num_classes))
    return trainable, opt_state, jnp.sum(losses), jax.tree.map(lambda g: g[-1], grads)

  def matches(self, count: int, fn: Callable, trainable: Trainable, opt_state: dict,
              inners: Any, train: Callable | None = None, per_class: bool = False):
    """`count` matches (`match`); between two, `train(inner, syn, key)`
    updates each trajectory's inner state (e.g. trains its network on `syn`,
    the current set under stop_gradient). Match m of a trajectory uses
    fold_in(key, m); with one match the key itself. Returns (trainable,
    opt_state, mean loss, gradients of the last update)."""
    keys = self.keys
    losses = []
    if count > 1:
      def match_then_train(carry, m):
        (t, o), inners = carry
        mkeys = jax.vmap(lambda k: jax.random.fold_in(k, m))(keys)
        t, o, loss, _ = self.match(fn, t, o, inners, mkeys, per_class)
        syn = self.synset(jax.tree.map(jax.lax.stop_gradient, t))
        inners = jax.lax.map(lambda a: train(
            a[0], syn, jax.random.fold_in(a[1], NET_SALT)), (inners, mkeys))
        return ((t, o), inners), loss
      ((trainable, opt_state), inners), scanned = jax.lax.scan(
          match_then_train, ((trainable, opt_state), inners), jnp.arange(count - 1))
      losses = [scanned]
      keys = jax.vmap(lambda k: jax.random.fold_in(k, count - 1))(keys)
    trainable, opt_state, loss, grads = self.match(fn, trainable, opt_state, inners,
                                                   keys, per_class)
    if losses:
      loss = jnp.mean(jnp.concatenate(losses + [loss[None]]))
    return trainable, opt_state, loss, grads

  @staticmethod
  def metrics(loss: jax.Array, grads: dict) -> dict:
    return dict(loss=loss, grad_norm_images=optax.global_norm(grads['images']))


def make_distill_step(backbone: Backbone, plan: SubsetPlan, optimizers: dict,
                      layout: Layout, *, trajectories: int, mesh=None,
                      donate: bool | None = None) -> Callable:
  """Jitted `(state, frozen, resources, data) -> (state, metrics)`.

  `frozen` holds the earlier subsets ({'images', 'labels'}); `resources` (or
  None) the iteration's T = `trajectories` resources stacked on a leading
  axis; each trajectory also gets its own key. With a mesh of D devices they
  are split over `data` (T/D per device, run in turn with `lax.map`) and the
  gradients averaged across devices with `pmean`: the result is the mean of T
  single-trajectory gradients, and every device applies the same update. The
  state is donated (default: on accelerators, where it saves a copy).
  """
  sharded = mesh is not None and mesh.size > 1

  def iterate(trainable, opt_state, frozen, resources, keys, data):
    io = StepIO(frozen=frozen, resources=resources, keys=keys, data=data,
                optimizers=optimizers, layout=layout, param=plan.run.param,
                sharded=sharded)
    return backbone.step(plan, trainable, opt_state, io)

  if sharded:
    rep = P()
    iterate = jax.shard_map(
        iterate, mesh=mesh,
        in_specs=(rep, rep, rep, P(parallel.DATA), P(parallel.DATA), rep),
        out_specs=(rep, rep, rep), check_vma=False)

  def step(state: DistillState, frozen, resources, data):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.iteration)
    keys = jax.random.key_data(jax.random.split(key, trajectories))
    keys = jax.vmap(jax.random.wrap_key_data)(keys)
    trainable, opt_state, metrics = iterate(state.trainable, state.opt_state,
                                            frozen, resources, keys, data)
    new = state.replace(trainable=trainable, opt_state=opt_state,
                        iteration=state.iteration + 1)
    return new, dict(metrics, **trainable['extras'])

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


def restore_or_init(path: str, fresh: DistillState, placed: bool = True
                    ) -> tuple[DistillState, ocp.CheckpointManager]:
  """Latest checkpoint under `path` if any (a damaged one is an error: it is
  never silently replaced by a fresh start that would lose work).

  `placed=False`: `fresh` lives on the default device without a sharding
  (no mesh), and so does the restored state. Orbax returns arrays committed
  to a device, and a jitted step called with them is another program (its
  parameters carry shardings): the same process would compile the step again
  (a notebook or test rerunning a resumed subset)."""
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
  if not placed:
    state = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), state)
  return state, mgr


def distill_subset(backbone: Backbone, plan: SubsetPlan, source: Source, *,
                   trainable: Trainable, optimizers: dict, frozen: dict,
                   layout: Layout, key: jax.Array, options: LoopOptions,
                   evaluate_fn: Callable | None = None,
                   mesh=None, should_stop: Callable[[], bool] = lambda: False,
                   writer=None, on_eval: Callable | None = None) -> DistillState:
  """Runs (or resumes) the distillation of one subset; returns the final state.

  Args:
    source: the subset's resources (`backbone.prepare`).
    trainable, optimizers: `backbone.init`'s, at iteration 0.
    frozen: {'images', 'labels'} of the earlier subsets (possibly empty),
      never updated.
    layout: class and subset of every stored image, frozen ones first.
    evaluate_fn: (stored images of the full set so far, their labels, lr,
      iteration) -> validation accuracy; called every `options.eval_every`
      iterations to keep the best. It may raise `Interrupted` (a stop during
      the evaluation): the state as of that iteration is then saved and the
      rerun redoes the evaluation.
  """
  num_devices = 1 if mesh is None else mesh.size
  traj = options.trajectories_per_step or num_devices
  if traj % num_devices and traj != 1:
    raise UserError(f'distill.trajectories_per_step={traj} must be 1 or a '
                    f'multiple of the {num_devices} devices.')
  # One trajectory on several devices (the official single-network loop of
  # DM, DC, DSA and IDC): every device runs the same replicated step, which
  # is the one-device result; no trajectory is split and nothing averaged.
  step_mesh = mesh if traj % num_devices == 0 else None
  frozen = parallel.replicate(frozen, mesh)
  data = parallel.replicate(source.data, mesh)
  step_fn = make_distill_step(backbone, plan, optimizers, layout,
                              trajectories=traj, mesh=step_mesh)
  fresh = parallel.replicate(init_state(trainable, optimizers, key), mesh)
  ckpt_dir = options.ckpt_dir
  _check_state_format(ckpt_dir)
  state, mgr = restore_or_init(ckpt_dir, fresh, placed=mesh is not None)
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
      mgr.delete(step)  # the final evaluation changed the best: keep it
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
    resources = source.sample(it, traj, step_mesh)
    if step_mesh is None and mesh is not None:
      resources = parallel.replicate(resources, mesh)
    extras_before = {k: float(parallel.fetch(v))
                     for k, v in state.trainable['extras'].items()}
    new_state, metrics = step_fn(state, frozen, resources, data)  # donates
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
                 settings=record, state_format=STATE_FORMAT)), path)


def _check_state_format(ckpt_dir: str) -> None:
  """A checkpoint of another state layout (an older version of this program)
  cannot be continued: say so before Orbax fails on the tree."""
  path = os.path.join(ckpt_dir, 'run.json')
  if not parallel.agree(os.path.exists(path) and any(
      n.isdigit() for n in os.listdir(ckpt_dir))):
    return
  old = read_run_record(ckpt_dir)
  if int(old.get('state_format', 1)) != STATE_FORMAT:
    raise CheckpointError(
        f'{ckpt_dir} holds a checkpoint of an older version of this program '
        f'(state format {old.get("state_format", 1)}, now {STATE_FORMAT}); '
        'finish that run with the version that started it, or delete the '
        'folder to distil this subset again.')


def _evaluate(backbone: Backbone, state: DistillState, evaluate_fn, frozen, writer,
              it: int, plan: SubsetPlan, on_eval, name: str, mesh=None) -> DistillState:
  """Scores the current set (all subsets so far) and keeps it if it is the best.

  Every process computes the same score (the evaluation gathers its models'
  accuracies from all hosts), so all keep the same best set. The best is a
  copy of the whole trainable tree (images, labels, extras and aux alike).
  """
  del backbone
  trainable = parallel.fetch(state.trainable)
  frozen = parallel.fetch(frozen)
  images = np.concatenate([frozen['images'], trainable['images']])
  labels = join_labels(frozen['labels'], trainable['labels'])
  score = float(evaluate_fn(images, labels, eval_lr(plan, trainable['extras']), it))
  logging.info('subset %d iteration %d: validation accuracy %.4f', plan.index + 1,
               it, score)
  if writer is not None:
    writer.add_scalar(f'{name}/val_acc', score, it)
  if on_eval is not None:
    on_eval(state, it)
  if score > float(state.best_score):
    best = dict(best_score=np.asarray(score, np.float32), best=trainable)
    if mesh is None:
      best = jax.tree.map(jnp.asarray, best)
    state = state.replace(**parallel.replicate(best, mesh))
  return state


def eval_lr(plan: SubsetPlan, extras: dict) -> float:
  """The step size evaluation trains this subset's stage with: the learned
  `extras['syn_lr']` when the method learns one, else the protocol's lr."""
  if 'syn_lr' in extras:
    return float(parallel.fetch(extras['syn_lr']))
  return float(plan.run.eval_lr)
