"""Real images by class, for the methods that compare real and synthetic
batches class by class inside their step (DM, DC/DSA, IDC)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from seqmatch_jax.errors import ConfigError


class RealImagesByClass:
  """A `base.Source`: `data` holds the real training images, an index table
  [C, max class size] of each class's rows, and each class's count; nothing
  is sampled on the host."""

  def __init__(self, x_train, y_train, num_classes: int):
    y = np.asarray(y_train)
    rows = [np.flatnonzero(y == c) for c in range(num_classes)]
    if min(len(r) for r in rows) == 0:
      raise ConfigError('Every class needs real training images; class '
                        f'{[c for c, r in enumerate(rows) if not len(r)][0]} has none.')
    width = max(len(r) for r in rows)
    index = np.zeros((num_classes, width), np.int32)
    for c, r in enumerate(rows):
      index[c, :len(r)] = r
    self.data = dict(x=x_train, index=jnp.asarray(index),
                     count=jnp.asarray([len(r) for r in rows], jnp.int32))

  def sample(self, iteration: int, count: int, mesh=None):
    del iteration, count, mesh
    return None


def sample_class_batches(key: jax.Array, data: dict, batch: int):
  """Per class, `batch` distinct random real images (all of a class that has
  fewer: the rest is masked, as the official code takes what there is).
  Returns (images [C, batch, H, W, ch], mask [C, batch])."""
  index, count = data['index'], data['count']
  batch = min(batch, index.shape[1])
  u = jax.random.uniform(key, index.shape)
  u = jnp.where(jnp.arange(index.shape[1])[None] < count[:, None], u, 2.0)
  rows = jnp.take_along_axis(index, jnp.argsort(u, axis=1)[:, :batch], 1)
  mask = (jnp.arange(batch)[None] < count[:, None]).astype(jnp.float32)
  return data['x'][rows], mask


def class_batches(key: jax.Array, data: dict, batch: int):
  """(real [C, B, ...], its mask [C, B], one augmentation key per class)
  for one match."""
  real_key, aug_key = jax.random.split(key)
  real, mask = sample_class_batches(real_key, data, batch)
  return real, mask, jax.random.split(aug_key, real.shape[0])


def over_classes(one_class, num_classes: int) -> jax.Array:
  """`one_class(c)` summed over every class (in turn: all classes at once
  would hold C real batches' activations)."""
  return jnp.sum(jax.lax.map(one_class, jnp.arange(num_classes)))
