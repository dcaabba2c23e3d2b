"""The device mesh: one `data` axis over devices, built from the config.

Distillation shards expert trajectories over it (each device unrolls its own
trajectory; meta-gradients are averaged with `pmean`); experts and evaluation
shard models over it. On one device everything reduces to plain `jit`.
"""

from __future__ import annotations

import os
from typing import Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from seqmatch_jax.errors import ConfigError

DATA = 'data'


def maybe_initialize_distributed(mode: str) -> None:
  """`jax.distributed.initialize()` on SLURM/TPU pods ('auto') or when asked."""
  if mode not in ('auto', 'yes', 'no'):
    raise ConfigError(f"parallel.distributed must be auto|yes|no, got {mode!r}")
  if mode == 'no':
    return
  in_cluster = (int(os.environ.get('SLURM_NTASKS', '1')) > 1 or
                'TPU_WORKER_HOSTNAMES' in os.environ or
                'JAX_COORDINATOR_ADDRESS' in os.environ)
  if mode == 'yes' or in_cluster:
    jax.distributed.initialize()
    logging.info('jax.distributed: process %d of %d, %d global devices',
                 jax.process_index(), jax.process_count(), jax.device_count())


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (0 = all of them)."""
  devices = jax.devices()
  n = len(devices) if num_devices <= 0 else num_devices
  if n > len(devices):
    raise ConfigError(f'parallel.num_devices={n} but only {len(devices)} devices '
                      'are visible; lower it or set 0 for all.')
  return Mesh(np.asarray(devices[:n]), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sharded(mesh: Mesh) -> NamedSharding:
  """Leading axis split over `data`."""
  return NamedSharding(mesh, P(DATA))


def is_main_process() -> bool:
  """Only process 0 writes logs, images and results."""
  return jax.process_index() == 0


def resolve_model_parallel(mode: str) -> str:
  """'auto' -> one model after another on CPU (vmap over models loses there,
  PERF_NOTES.md section 3), vmapped (and sharded over devices) elsewhere."""
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
  """
  mode = resolve_model_parallel(mode)
  if mode == 'sequential':
    one = jax.jit(fn)

    def in_turn(*args):
      mapped, shared = args[:num_mapped], args[num_mapped:]
      n = jax.tree.leaves(mapped)[0].shape[0]
      models = range(n)
      if progress and n > 1 and is_main_process():
        models = tqdm.tqdm(models, desc=progress, leave=False, dynamic_ncols=True)
      outs = [jax.block_until_ready(
          one(*jax.tree.map(lambda a, i=i: a[i], mapped), *shared)) for i in models]
      return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return in_turn

  in_axes = (0,) * num_mapped

  def batched(*args):
    return jax.vmap(fn, in_axes=in_axes + (None,) * (len(args) - num_mapped))(*args)
  if mesh is None or mesh.size == 1:
    return jax.jit(batched)
  jitted = jax.jit(batched)
  devices = mesh.size

  def sharded_call(*args):
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
  return sharded_call
