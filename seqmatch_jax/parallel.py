"""The device mesh: one `data` axis over devices, built from the config.

Distillation shards expert trajectories over it (each device unrolls its own
trajectory; meta-gradients are averaged with `pmean`); experts and evaluation
shard models over it. On one device everything reduces to plain `jit`.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from seqmatch_jax.errors import CheckpointError, ConfigError, Interrupted

DATA = 'data'


def maybe_initialize_distributed(mode: str, coordinator_address: str = '',
                                 num_processes: int = 0,
                                 process_id: int = -1) -> None:
  """`jax.distributed.initialize()` in a SLURM job or TPU pod ('auto'), or
  when asked ('yes', or an explicit coordinator address).

  With `coordinator_address` (and `num_processes`, `process_id`) the
  processes are named explicitly, e.g. two processes on one machine; without
  it JAX detects the cluster (SLURM, TPU pod, Open MPI, ...). Safe to call
  twice (a notebook rerunning `pipeline.run`).
  """
  if mode not in ('auto', 'yes', 'no'):
    raise ConfigError(f"parallel.distributed must be auto|yes|no, got {mode!r}")
  if mode == 'no':
    return
  # A SLURM *step* with several tasks (srun); a batch shell with
  # SLURM_NTASKS > 1 that runs python directly is one process.
  in_slurm_step = ('SLURM_STEP_ID' in os.environ and
                   int(os.environ.get('SLURM_STEP_NUM_TASKS', '1')) > 1)
  in_cluster = (in_slurm_step or 'TPU_WORKER_HOSTNAMES' in os.environ or
                bool(coordinator_address))
  if not (mode == 'yes' or in_cluster) or distributed_is_initialized():
    return
  explicit = {}
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(
          f'parallel.coordinator_address={coordinator_address!r} needs '
          'parallel.num_processes >= 1 and 0 <= parallel.process_id < '
          f'num_processes (got {num_processes}, {process_id}).')
    explicit = dict(coordinator_address=coordinator_address,
                    num_processes=num_processes, process_id=process_id)
  # JAX's preemption service installs its own C-level SIGTERM handler when
  # it starts, which would swallow a SIGTERM meant for our stop flag
  # (pipeline.StopFlag); stops are agreed by our own collective instead.
  jax.config.update('jax_enable_preemption_service', False)
  try:
    jax.distributed.initialize(**explicit)
  except (RuntimeError, ValueError) as e:
    raise ConfigError(
        f'jax.distributed.initialize failed ({str(e).splitlines()[0][:200]}). '
        'Outside a SLURM job or TPU pod set parallel.coordinator_address, '
        'parallel.num_processes and parallel.process_id, or set '
        'parallel.distributed=no for a single process.') from e
  logging.info('jax.distributed: process %d of %d, %d global devices (%d local)',
               jax.process_index(), jax.process_count(), jax.device_count(),
               jax.local_device_count())


def distributed_is_initialized() -> bool:
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    return distributed.global_state.client is not None
  except (ImportError, AttributeError):
    return False


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (0 = all of them).

  Across several processes the mesh must hold every device: each process
  drives its own devices and all take part in every step.
  """
  devices = jax.devices()
  n = len(devices) if num_devices <= 0 else num_devices
  if n > len(devices):
    raise ConfigError(f'parallel.num_devices={n} but only {len(devices)} devices '
                      'are visible; lower it or set 0 for all.')
  if jax.process_count() > 1 and n != len(devices):
    raise ConfigError(f'parallel.num_devices={n} with {jax.process_count()} '
                      f'processes: a multi-process run uses all {len(devices)} '
                      'devices; set parallel.num_devices=0.')
  return Mesh(np.asarray(devices[:n]), (DATA,))


def model_mesh(num_devices: int = 0) -> Mesh:
  """The mesh for independent models (experts, evaluation networks).

  Each process trains its own share of the models (`process_share`) on its
  own devices, so across processes this is the local devices only.
  """
  if jax.process_count() > 1:
    return Mesh(np.asarray(jax.local_devices()), (DATA,))
  return make_mesh(num_devices)


def process_share(num: int) -> list[int]:
  """Indices of `num` independent models this process handles (round robin)."""
  return list(range(jax.process_index(), num, jax.process_count()))


def is_multiprocess() -> bool:
  return distributed_is_initialized() and jax.process_count() > 1


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sharded(mesh: Mesh) -> NamedSharding:
  """Leading axis split over `data`."""
  return NamedSharding(mesh, P(DATA))


def is_main_process() -> bool:
  """Only process 0 writes logs, images and results."""
  return jax.process_index() == 0


def replicate(tree: Any, mesh: Mesh | None) -> Any:
  """Puts identical host values on every device of `mesh` as global arrays.

  Every process must pass the same values (they are, by construction: same
  config, same seed, same files). Without a mesh, returns `tree` unchanged.
  """
  if mesh is None:
    return tree
  sharding = replicated(mesh)
  if not is_multiprocess():
    return jax.device_put(tree, sharding)
  # Process 0's values everywhere: hosts that computed "the same" values
  # (e.g. a ZCA fit on another CPU type) may differ in the last bits, and a
  # replicated array must be identical on every device.
  tree = multihost_utils.broadcast_one_to_all(jax.tree.map(np.asarray, tree))

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(one, tree)


def shard_from_loader(num: int, mesh: Mesh, load: Callable[[list[int]], Any]) -> Any:
  """A global pytree with leading axis `num` split over `data`, built from
  `load(indices) -> pytree of arrays [len(indices), ...]`.

  Each process calls `load` only for the rows its own devices hold, so a host
  reads just its share (e.g. of the expert windows of a distillation step).
  """
  sharding = sharded(mesh)
  wanted = sorted({i for index in sharding.addressable_devices_indices_map(
      (num,)).values() for i in range(num)[index[0]]})
  try:
    loaded, error = load(wanted), None
  except Exception as e:  # pylint: disable=broad-except
    loaded, error = None, e
  # A read that fails on one host must stop all of them (the others would
  # wait in the step's all-reduce forever).
  _raise_on_every_process(error, CheckpointError(
      'Another process failed to read its expert windows (its log has the '
      'error); stopping here too.'))
  position = {i: j for j, i in enumerate(wanted)}

  def one(leaf):
    leaf = np.asarray(leaf)
    shape = (num,) + leaf.shape[1:]
    return jax.make_array_from_callback(
        shape, sharding,
        lambda index: leaf[[position[i] for i in range(num)[index[0]]]])
  return jax.tree.map(one, loaded)


def fetch(x: Any) -> Any:
  """Host numpy copy of (replicated) arrays, also when other processes hold
  some of their devices."""
  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      if not a.is_fully_replicated:
        raise ValueError('fetch() needs a replicated array across processes')
      return np.asarray(a.addressable_data(0))
    return np.asarray(a)
  return jax.tree.map(one, x)


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any (e.g. a stop signal that
  reached one host): all hosts then take the same branch."""
  if not is_multiprocess():
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def agree_array(value: np.ndarray) -> np.ndarray:
  """Process 0's array (same shape and dtype everywhere) on every process,
  e.g. progress read from a shared file."""
  if not is_multiprocess():
    return np.asarray(value)
  return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))


def allgather(value: np.ndarray) -> np.ndarray:
  """[processes, ...]: every process's `value` (same shape everywhere)."""
  if not is_multiprocess():
    return np.asarray(value)[None]
  return np.asarray(multihost_utils.process_allgather(np.asarray(value)))


def agree(value: int) -> int:
  """Process 0's integer on every process: decisions read from a shared
  filesystem (a file exists, the latest checkpoint step) are made once, since
  hosts' NFS caches may disagree even after a barrier."""
  if not is_multiprocess():
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def main_only(fn: Callable[[], Any], what: str) -> None:
  """Runs `fn` (a write) on process 0 only; if it fails, every process stops
  with the error instead of the others waiting for it at the next barrier."""
  error = None
  if is_main_process():
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      error = e
  _raise_on_every_process(error, ConfigError(
      f'process 0 failed to write {what} (its log has the error); stopping '
      'here too.'))
  barrier(what)


def _raise_on_every_process(error: Exception | None, elsewhere: Exception) -> None:
  """If any process has an `error`, every process raises: its own error where
  it happened, `elsewhere` on the others."""
  if any_process(error is not None):
    raise error if error is not None else elsewhere


def barrier(name: str) -> None:
  """Waits for every process (e.g. until process 0 has written a file)."""
  if is_multiprocess():
    multihost_utils.sync_global_devices(name)


def resolve_model_parallel(mode: str) -> str:
  """'auto' -> one model after another on CPU (vmap over models loses there:
  BUILD_NOTES.md, "Several devices and processes"), vmapped (and sharded
  over devices) elsewhere."""
  if mode not in ('auto', 'vmap', 'sequential'):
    raise ConfigError(f'model parallelism must be auto|vmap|sequential, got {mode!r}')
  if mode == 'auto':
    return 'sequential' if jax.default_backend() == 'cpu' else 'vmap'
  return mode


def map_models(fn: Callable, num_mapped: int, mode: str,
               mesh: Mesh | None = None, progress: str = '') -> Callable:
  """Maps jitted `fn` over the leading (model) axis of its first `num_mapped`
  arguments; the remaining arguments are shared by every model.

  'vmap' batches the models in one program and, on a mesh of several devices,
  shards them over `data` (padding the count to a multiple of the devices);
  'sequential' runs one compiled single-model program per model. Both give the
  same numbers for the same per-model inputs. With `progress` (a label), the
  one-by-one mode shows a bar over models on process 0.

  The returned callable also takes two keywords, so that a long evaluation can
  stop between models without losing the finished ones:
    should_stop: `() -> bool`, called before each model program (once before
      the single program in 'vmap' mode); when true, raises `Interrupted`.
      Across processes the caller makes it a collective decision.
    on_model: `(i, output of model i)`, called as each model finishes.
  """
  mode = resolve_model_parallel(mode)
  if mode == 'sequential':
    one = jax.jit(fn)

    def in_turn(*args, should_stop: Callable[[], bool] | None = None,
                on_model: Callable[[int, Any], None] | None = None):
      mapped, shared = args[:num_mapped], args[num_mapped:]
      n = jax.tree.leaves(mapped)[0].shape[0]
      bar = None
      if progress and n > 1 and is_main_process():
        bar = tqdm.tqdm(total=n, desc=progress, leave=False, dynamic_ncols=True)
      outs = []
      try:
        for i in range(n):
          if should_stop is not None and should_stop():
            raise Interrupted(f'stopped after {i} of {n} models')
          out = jax.block_until_ready(
              one(*jax.tree.map(lambda a, i=i: a[i], mapped), *shared))
          outs.append(out)
          if on_model is not None:
            on_model(i, out)
          if bar is not None:
            bar.update(1)
      finally:
        if bar is not None:
          bar.close()
      return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return in_turn

  in_axes = (0,) * num_mapped

  def batched(*args):
    return jax.vmap(fn, in_axes=in_axes + (None,) * (len(args) - num_mapped))(*args)
  jitted = jax.jit(batched)
  devices = 1 if mesh is None else mesh.size

  def call(*args):
    if devices == 1:
      return jitted(*args)
    mapped, shared = args[:num_mapped], args[num_mapped:]
    n = jax.tree.leaves(mapped)[0].shape[0]
    pad = -n % devices
    if pad:
      mapped = jax.tree.map(
          lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]), mapped)
    mapped = jax.device_put(mapped, sharded(mesh))
    shared = jax.device_put(shared, replicated(mesh))
    out = jitted(*mapped, *shared)
    return jax.tree.map(lambda a: a[:n], out)

  def all_at_once(*args, should_stop: Callable[[], bool] | None = None,
                  on_model: Callable[[int, Any], None] | None = None):
    # One program: a stop can only apply before it (or, by the caller, after).
    if should_stop is not None and should_stop():
      raise Interrupted('stopped before the models started')
    out = call(*args)
    if on_model is not None:
      n = jax.tree.leaves(args[:num_mapped])[0].shape[0]
      for i in range(n):
        on_model(i, jax.tree.map(lambda a, i=i: a[i], out))
    return out
  return all_at_once
