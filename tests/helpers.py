"""Small shared fixtures: tiny networks and digits in model space."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from seqmatch_jax import data as data_lib
from seqmatch_jax.models import create_network


@functools.lru_cache(maxsize=None)
def digits_model_space(val_size: int = 0):
  ds = data_lib.load_dataset('digits')
  ds, (xv, yv) = data_lib.split_validation(ds, val_size, 0)
  pre = data_lib.fit_preprocessor(ds, zca=False)
  to = lambda x: jnp.asarray(pre.to_model(np.asarray(x, np.float32)))
  return (to(ds.x_train), jnp.asarray(ds.y_train), to(ds.x_test),
          jnp.asarray(ds.y_test), to(xv), jnp.asarray(yv))


def tiny_convnet(width: int = 8, depth: int = 2, image_shape=(8, 8, 1),
                 num_classes: int = 10, conv_impl: str = 'auto'):
  return create_network('convnet', num_classes, image_shape, width=width,
                        depth=depth, norm='instance', conv_impl=conv_impl)
