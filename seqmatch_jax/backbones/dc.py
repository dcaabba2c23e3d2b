"""DC (Zhao et al., ICLR 2021) and DSA (Zhao & Bilen, ICML 2021): gradient
matching, as methods.

Each iteration starts a fresh random network. `outer_loop` times: per class,
the gradient of the cross-entropy on a real batch (detached) and on the
class's synthetic images are compared with the "sum over output channels of
1 - cosine" distance on every conv and fc weight (biases and norm parameters
skipped); the images take one SGD(0.1, momentum 0.5) step on the loss summed
over classes; then, except after the last, the network trains `inner_loop`
epochs on the synthetic set (official code: VICO-UoE/DatasetCondensation `main.py`, `utils.py`). DSA is the same with
one siamese DSA transform per class shared by the real and synthetic batch
(and per-sample DSA while the network trains). Under SeqMatch the frozen
earlier subsets are part of every synthetic gradient and of the network's
training set.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from seqmatch_jax import augment as augment_lib
from seqmatch_jax import training
from seqmatch_jax.backbones import base
from seqmatch_jax.backbones import dm
from seqmatch_jax import real_data
from seqmatch_jax.errors import ConfigError

# DC/DM's DSA: torch's affine_grid default (align_corners=False).
DSA_PARAMS = augment_lib.DSAParams(align_corners=False)

# The official (outer_loop, inner_loop) per ipc (`get_loops`).
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15),
         50: (50, 10)}


def official_loops(ipc: int) -> tuple[int, int]:
  """`get_loops` for the official ipcs; others take the row of the largest
  official ipc not above them (the official code refuses them)."""
  return LOOPS[max(i for i in LOOPS if i <= max(ipc, 1))]


def _rows(w: jax.Array) -> jax.Array:
  """A conv (kh, kw, in, out) or dense (in, out) kernel as one row per output
  channel (the official code's (O, I*kh*kw) view)."""
  return jnp.moveaxis(w, -1, 0).reshape(w.shape[-1], -1)


def _norm(x: jax.Array) -> jax.Array:
  """Row norms with a zero (not NaN) gradient at a zero row, as torch's."""
  sq = jnp.sum(jnp.square(x), -1)
  safe = jnp.where(sq > 0, sq, 1.0)
  return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


def channel_cosine_distance(a: jax.Array, b: jax.Array) -> jax.Array:
  """Σ over output channels of 1 - cos between two weight(-gradient) tensors
  (eps 1e-6): DC's 'ours' distance and IDC's 'cos' metric for one tensor."""
  a, b = _rows(a), _rows(b)
  cos = jnp.sum(a * b, -1) / (_norm(a) * _norm(b) + 1e-6)
  return jnp.sum(1.0 - cos)


def gradient_distance(g_real, g_syn) -> jax.Array:
  """Σ over weight tensors Σ over output channels (1 - cos): DC's 'ours'
  distance; 1-D tensors (biases, norm scales and offsets) count zero."""
  total = jnp.zeros((), jnp.float32)
  for a, b in zip(jax.tree.leaves(g_real), jax.tree.leaves(g_syn)):
    if a.ndim < 2:
      continue
    total = total + channel_cosine_distance(a, b)
  return total


class DC(base.Backbone):
  name = 'dc'
  title = 'DC'
  config_key = 'dc'  # DSA shares it
  siamese = False  # DSA: one DSA transform per class for real and synthetic

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """The official DC/DSA defaults."""
    c = ml_collections.ConfigDict()
    c.iterations = 1000
    c.lr_img = 0.1
    c.batch_real = 256  # real images per class per match
    c.outer_loop = 0  # 0 = the official table for the run's ipc
    c.inner_loop = 0  # 0 = the official table for the run's ipc
    c.lr_net = 0.01  # SGD, no momentum, on the synthetic set
    c.batch_train = 256
    # Evaluation epochs; 0 = the official: 300 for DC (no augmentation), the
    # common eval.epochs (1000 in the CIFAR configs) for DSA.
    c.eval_epochs = 0
    c.allow_zca = False  # see dm.refuse_zca
    c.per_subset = ml_collections.ConfigDict(
        {n: () for n in ('iterations', 'lr_img', 'outer_loop', 'inner_loop')})
    return c

  @classmethod
  def validate(cls, plans):
    plans = super().validate(plans)
    outer, inner = official_loops(plans[0].run.ipc)
    out = []
    for p in plans:
      for name in ('outer_loop', 'inner_loop'):
        if getattr(p, name) < 0:
          raise ConfigError(f'dc.{name} of subset {p.index + 1} must be >= 0 '
                            f'(0 = the official table), got {getattr(p, name)}.')
      # 0: the official (outer, inner) loops of the run's ipc (`get_loops`).
      out.append(p.resolved(outer_loop=p.outer_loop or outer,
                            inner_loop=p.inner_loop or inner))
    for name in ('batch_real', 'batch_train', 'lr_net'):
      if getattr(plans[0], name) <= 0:
        raise ConfigError(f'dc.{name} must be positive, got '
                          f'{getattr(plans[0], name)}.')
    if plans[0].eval_epochs < 0:
      raise ConfigError(f'dc.eval_epochs must be >= 0 (0 = the official), got '
                        f'{plans[0].eval_epochs}.')
    dm.refuse_zca(plans[0], 'dc', cls.name)
    return base.one_trajectory(out)

  @classmethod
  def protocol(cls, common, settings):
    """The official evaluation (DatasetCondensation `utils.evaluate_synset`,
    `get_daparam`): DC trains 300 epochs without augmentation, DSA with
    per-sample DSA; both interpolate with align_corners=False."""
    if cls.siamese:
      return dataclasses.replace(common, align_corners=False,
                                 epochs=settings.eval_epochs or common.epochs)
    return dataclasses.replace(common, augment='', align_corners=False,
                               epochs=settings.eval_epochs or 300)

  def loss(self, plan, syn, inner, key, data):
    params, state = inner
    real, mask, aug_keys = real_data.class_batches(key, data, plan.batch_real)
    by_class = syn.by_class()

    def grads(x, y, m):
      return jax.grad(lambda p: training.masked_loss(
          self.network, p, state, x, y, m)[0])(params)

    def one_class(c):
      r, s = real[c], by_class[c]
      if self.siamese:
        r, s = augment_lib.augment_shared(aug_keys[c], (r, s), plan.run.augment,
                                          DSA_PARAMS)
      g_real = jax.lax.stop_gradient(grads(r, jnp.full(r.shape[:1], c), mask[c]))
      g_syn = grads(s, jnp.full(s.shape[:1], c), jnp.ones(s.shape[:1]))
      return gradient_distance(g_real, g_syn)

    return real_data.over_classes(one_class, real.shape[0])

  def train_network(self, plan, inner, syn, key):
    """`inner_loop` epochs on the synthetic set between two matches."""
    params, state = inner
    images, labels = syn.decoded()
    # A loader's batch is at most the set (no padding to batch_train).
    spec = training.SGDSpec(batch_size=min(plan.batch_train, len(images)),
                            augment=plan.run.augment if self.siamese else '',
                            align_corners=False)
    return training.train_schedule(self.network, spec, params, state, images,
                                   labels, key, plan.lr_net, plan.inner_loop)

  def step(self, plan, trainable, opt_state, io):
    """A fresh random network per trajectory; `outer_loop` matches, the
    network trained on the synthetic set between two."""
    inners = io.init_each(lambda resource, key: self.network.init(key))
    loss_fn = lambda t, inner, key: self.loss(plan, io.synset(t), inner, key, io.data)
    train = lambda inner, syn, key: self.train_network(plan, inner, syn, key)
    trainable, opt_state, loss, grads = io.matches(
        plan.outer_loop, loss_fn, trainable, opt_state, inners, train)
    return trainable, opt_state, io.metrics(loss, grads)


class DSA(DC):
  """DC with siamese differentiable augmentation."""
  name = 'dsa'
  title = 'DSA'
  siamese = True
