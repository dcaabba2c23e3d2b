"""The device mesh: one `data` axis over devices, built from the config.

Distillation shards expert trajectories over it (each device unrolls its own
trajectory; meta-gradients are averaged with `pmean`); experts and evaluation
shard models over it. On one device everything reduces to plain `jit`.
"""

from __future__ import annotations

import os

from absl import logging
import jax
import numpy as np
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
