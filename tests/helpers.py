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


def mtt_plan(network, augment: str = 'flip', index: int = 0, ipc: int = 2,
             **settings):
  """(MTT backbone, its SubsetPlan) from the reference defaults plus
  `settings` (e.g. syn_steps=2, lr_img=10.0, batch_syn=4)."""
  from seqmatch_jax import backbones, config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.augment.strategy = augment
  plan = backbones.plan_from_settings(config.mtt, index=index, ipc=ipc, **settings)
  return backbones.create(config, network), plan
