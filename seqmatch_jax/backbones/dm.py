"""DM: distribution matching (Zhao & Bilen, WACV 2023) as a method.

Each iteration draws a fresh random network (never trained, no gradient to
it) and matches, per class, the mean embedding (the flattened features the
classifier would read) of a real batch and of the class's synthetic images,
both under one siamese DSA transform; the loss is the squared distance summed
over classes and the images take one SGD(1.0, momentum 0.5) step on it
(official code: VICO-UoE/DatasetCondensation `main_DM.py`). Under SeqMatch the frozen earlier subsets are part
of every class mean; nothing else changes between subsets.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from seqmatch_jax import augment as augment_lib
from seqmatch_jax.backbones import base
from seqmatch_jax import real_data
from seqmatch_jax.errors import ConfigError

# DC/DM's DSA: torch's affine_grid default (align_corners=False).
DSA = augment_lib.DSAParams(align_corners=False)


def refuse_zca(plan, key: str, name: str) -> None:
  """DM, DC and DSA never ran on ZCA-whitened data (their lr_img assumes
  mean/std normalisation): refused unless `<key>.allow_zca`."""
  if plan.run.zca and not plan.allow_zca:
    raise ConfigError(
        f'backbone {name} runs on mean/std-normalised images in its official code '
        f'(no ZCA), and this config whitens them (dataset.zca=True, the MTT '
        f'row). Use the config\'s own row, e.g. '
        f'--config=configs/cifar10.py:backbone={name}, or set '
        f'--config.dataset.zca=False; --config.{key}.allow_zca=True keeps ZCA.')


class DM(base.Backbone):
  name = 'dm'
  title = 'DM'
  config_key = 'dm'

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """The official DM defaults."""
    c = ml_collections.ConfigDict()
    c.iterations = 20000
    c.lr_img = 1.0
    c.batch_real = 256  # real images per class per iteration
    # The official DM normalises with mean/std; its lr_img assumes it.
    c.allow_zca = False
    c.per_subset = ml_collections.ConfigDict({'iterations': (), 'lr_img': ()})
    return c

  @classmethod
  def validate(cls, plans):
    plans = super().validate(plans)
    if plans[0].batch_real < 1:
      raise ConfigError(f'dm.batch_real must be positive, got {plans[0].batch_real}.')
    refuse_zca(plans[0], 'dm', 'dm')
    return base.one_trajectory(plans)

  @classmethod
  def protocol(cls, common, settings):
    """The official DM evaluation (DatasetCondensation `main_DM.py`,
    `utils.evaluate_synset`): the common SGD schedule and DSA, with DC's
    interpolation (align_corners=False)."""
    del settings
    return dataclasses.replace(common, align_corners=False)

  def loss(self, plan, syn, inner, key, data):
    params, state = jax.lax.stop_gradient(inner)
    real, mask, aug_keys = real_data.class_batches(key, data, plan.batch_real)
    by_class = syn.by_class()
    embed = lambda x: self.network.embed(params, state, x)

    def one_class(c):
      r, s = augment_lib.augment_shared(aug_keys[c], (real[c], by_class[c]),
                                        plan.run.augment, DSA)
      m = mask[c][:, None]
      mean_real = jnp.sum(embed(r) * m, 0) / jnp.sum(m)
      mean_syn = jnp.mean(embed(s), 0)
      return jnp.sum(jnp.square(jax.lax.stop_gradient(mean_real) - mean_syn))

    return real_data.over_classes(one_class, real.shape[0])

  def step(self, plan, trainable, opt_state, io):
    """One update on a fresh random network per trajectory (never trained)."""
    inners = io.init_each(lambda resource, key: self.network.init(key))
    loss_fn = lambda t, inner, key: self.loss(plan, io.synset(t), inner, key, io.data)
    trainable, opt_state, loss, grads = io.matches(1, loss_fn, trainable, opt_state,
                                                   inners)
    return trainable, opt_state, io.metrics(loss, grads)
