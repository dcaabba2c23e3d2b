"""Supervised training of networks: the one SGD loop experts and evaluation share.

Everything here is a pure function of (params, state, data, key). An epoch is one
`lax.scan` over minibatches; a whole evaluation schedule (hundreds of epochs on a
tiny synthetic set) is one `lax.scan` over epochs, so it compiles once and runs
without returning to Python. Several models train together with `vmap` (fast on
GPUs) or one after another (faster on CPU: BUILD_NOTES.md, "Several devices
and processes").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

from seqmatch_jax import augment as augment_lib
from seqmatch_jax.models import Network

Params = Any
State = Any


@dataclasses.dataclass(frozen=True)
class SGDSpec:
  """How a network is trained: torch-style SGD (coupled weight decay)."""
  batch_size: int
  momentum: float = 0.0
  weight_decay: float = 0.0
  augment: str = ''  # DSA strategy; '' = none
  decay_at_half: bool = False  # lr x0.1 (and momentum reset) at epochs // 2
  align_corners: bool = True  # DSA's affine sampling (MTT: True, DC/DM: False)
  augment_style: str = 'dsa'  # 'dsa' | 'idc' (augment.DSAParams.style)
  # lr x0.2 at epochs 2E//3 and 5E//6, momentum kept (IDC's MultiStepLR).
  multistep: bool = False
  cutmix: float = 0.0  # probability per batch of CutMix (IDC: 0.5); 0 = off
  # Fewer images than one batch: compute only the real rows (see run_epoch).
  trim_short_batch: bool = False
  # (rho, alpha): GSAM (FTD's flat experts) instead of plain SGD; None = SGD.
  gsam: tuple[float, float] | None = None

  def dsa(self) -> augment_lib.DSAParams:
    return augment_lib.DSAParams(align_corners=self.align_corners,
                                 style=self.augment_style)

  def transform(self) -> optax.GradientTransformation:
    """Weight decay then momentum; the lr is applied by the caller (traced)."""
    parts = []
    if self.weight_decay:
      parts.append(optax.add_decayed_weights(self.weight_decay))
    parts.append(optax.trace(decay=self.momentum))
    return optax.chain(*parts)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy with integer labels [n], or with soft
  labels [n, C]: logits whose softmax is the target (DATM's SoftCrossEntropy,
  -sum softmax(y) log_softmax(out))."""
  if jnp.issubdtype(labels.dtype, jnp.integer):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return optax.softmax_cross_entropy(logits, jax.nn.softmax(labels, axis=-1))


def batch_schedule(key: jax.Array, num_examples: int, batch_size: int,
                   num_batches: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Minibatch indices and validity masks, as PyTorch's shuffled loader.

  A fresh permutation is cut into chunks of `batch_size`; the last chunk may be
  short (drop_last=False), so it is padded and masked to keep shapes static.
  When `num_batches` exceeds one pass, further permutations follow, exactly as
  the MTT reference refills its chunk list when it runs out.

  Returns:
    (indices, mask), both of shape [num_batches, batch_size].
  """
  chunks = -(-num_examples // batch_size)
  num_batches = chunks if num_batches is None else num_batches
  passes = max(1, -(-num_batches // chunks))
  pad = chunks * batch_size - num_examples
  keys = jax.random.split(key, passes)
  perms = jax.vmap(lambda k: jax.random.permutation(k, num_examples))(keys)
  perms = jnp.pad(perms, ((0, 0), (0, pad)))
  valid = jnp.pad(jnp.ones((passes, num_examples), jnp.float32), ((0, 0), (0, pad)))
  indices = perms.reshape(passes * chunks, batch_size)[:num_batches]
  mask = valid.reshape(passes * chunks, batch_size)[:num_batches]
  return indices.astype(jnp.int32), mask


def masked_loss(network: Network, params: Params, state: State, x: jax.Array,
                y: jax.Array, mask: jax.Array, train: bool = True):
  logits, new_state = network.apply(params, state, x, train=train)
  loss = jnp.sum(cross_entropy(logits, y) * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  return loss, new_state


_CUTMIX_SALT = 0x43555458  # CutMix's key from the step's augmentation key


def mixed_loss(network: Network, params: Params, state: State, x: jax.Array,
               y: jax.Array, y_mix: jax.Array, ratio: jax.Array, mask: jax.Array,
               train: bool = True):
  """CutMix's loss: ratio * CE(y) + (1 - ratio) * CE(y_mix), masked mean."""
  logits, new_state = network.apply(params, state, x, train=train)
  ce = ratio * cross_entropy(logits, y) + (1.0 - ratio) * cross_entropy(logits, y_mix)
  return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0), new_state


def sgd_step(network: Network, spec: SGDSpec, params: Params, state: State,
             opt_state: Any, x: jax.Array, y: jax.Array, mask: jax.Array,
             key: jax.Array, lr: jax.Array, keep: int = 0):
  """One minibatch step of `spec`: augmentation, CutMix, (GSAM), SGD.
  `keep` > 0: only the first `keep` rows are real (the rest is padding), and
  the network sees only them (after the augmentation draw for the whole
  batch, so its randomness does not change). Returns (params, state,
  opt_state, loss at w)."""
  if keep:  # the padded batch's draws for its real rows, padding not augmented
    x, y, mask = x[:keep], y[:keep], mask[:keep]
  if spec.augment:
    x = augment_lib.augment(key, x, spec.augment, spec.dsa(),
                            draw_rows=spec.batch_size if keep else None)
  if spec.cutmix:
    x, partner, ratio = augment_lib.cutmix(jax.random.fold_in(key, _CUTMIX_SALT),
                                           x, spec.cutmix, valid=mask)
    loss_fn = lambda p: mixed_loss(network, p, state, x, y, y[partner], ratio, mask)
  else:
    loss_fn = lambda p: masked_loss(network, p, state, x, y, mask)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, new_state), grads = grad_fn(params)
  if spec.gsam is not None:
    # The second pass reads the first pass's input state and its new
    # state is dropped (GSAM freezes BatchNorm statistics there).
    grads = gsam_direction(lambda p: grad_fn(p)[1], params, grads, *spec.gsam)
  updates, opt_state = spec.transform().update(grads, opt_state, params)
  params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
  return params, new_state, opt_state, loss


def _vdot(a: Params, b: Params) -> jax.Array:
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def gsam_direction(loss_grad, params: Params, grads: Params, rho: float,
                   alpha: float) -> Params:
  """GSAM's descent direction (Zhuang et al., ICLR 2022) in FTD's setting.

  Why a second gradient: GSAM steps with the gradient at the adaptive ascent
  point w + e, minus alpha times the part of g = grad(w) orthogonal to it,
  which lowers the surrogate gap (flatter minima, FTD's point). With the
  official GSAM's adaptive mode: n = ||w * g||_2 over all parameters,
  e = rho w^2 g / (n + 1e-12) (w squared, |w| only in the norm).
  `loss_grad(params) -> grads` is the minibatch gradient, evaluated at w + e
  on the same (augmented) batch.
  """
  n = optax.global_norm(jax.tree.map(lambda w, g: jnp.abs(w) * g, params, grads))
  e = jax.tree.map(lambda w, g: rho * w * w * g / (n + 1e-12), params, grads)
  g_p = loss_grad(jax.tree.map(jnp.add, params, e))
  norm_g, norm_p = optax.global_norm(grads), optax.global_norm(g_p)
  cos = _vdot(grads, g_p) / (norm_p * norm_g + 1e-12)
  scale = cos * norm_g / (norm_p + 1e-12)
  # g_perp = g - cos ||g|| g_p / ||g_p||;  d = g_p - alpha g_perp
  return jax.tree.map(lambda g, gp: gp - alpha * (g - scale * gp), grads, g_p)


def run_epoch(network: Network, spec: SGDSpec, params: Params, state: State,
              opt_state: Any, images: jax.Array, labels: jax.Array,
              key: jax.Array, lr: jax.Array) -> tuple[Params, State, Any, jax.Array]:
  """One pass over (images, labels); returns the new weights and the mean loss
  (at w, before any GSAM ascent)."""
  perm_key, aug_key = jax.random.split(key)
  idx, mask = batch_schedule(perm_key, images.shape[0], spec.batch_size)
  aug_keys = jax.random.split(aug_key, idx.shape[0])
  # Fewer images than one batch (evaluation on a distilled set): the batch is
  # the n images then masked padding. With `trim_short_batch` the network sees
  # only the n rows (2.56x less work at n=100, batch 256), as PyTorch's loader
  # gives the reference a batch of n: for per-sample nets the same loss and
  # gradient up to float summation order; for BatchNorm nets also the
  # reference's batch statistics (the padded batch counts padding in them).
  # The augmentation still uses the padded batch's draws for the n rows, so
  # its randomness is unchanged. False: the padded computation (older runs).
  n = images.shape[0]
  keep = n if spec.trim_short_batch and n < spec.batch_size else 0

  def step(carry, inputs):
    i, m, k = inputs
    if keep:
      i = i[:keep]  # gather only the rows the network will see
    params, state, opt_state, loss = sgd_step(network, spec, *carry, images[i],
                                              labels[i], m, k, lr, keep)
    return (params, state, opt_state), loss

  (params, state, opt_state), losses = jax.lax.scan(
      step, (params, state, opt_state), (idx, mask, aug_keys))
  return params, state, opt_state, jnp.mean(losses)


def epoch_lr(spec: SGDSpec, lr: jax.Array, epoch: jax.Array, epochs: int) -> jax.Array:
  """The step size of `epoch` (0-based) under `spec`'s schedule."""
  if spec.decay_at_half:
    return jnp.where(epoch >= epochs // 2, lr * 0.1, lr)
  if spec.multistep:
    return lr * jnp.where(epoch >= 2 * epochs // 3, 0.2, 1.0) * jnp.where(
        epoch >= 5 * epochs // 6, 0.2, 1.0)
  return lr


def train_schedule(network: Network, spec: SGDSpec, params: Params, state: State,
                   images: jax.Array, labels: jax.Array, key: jax.Array,
                   lr: jax.Array, epochs: int) -> tuple[Params, State]:
  """`epochs` epochs as one scan, with the evaluation protocol's lr decay.

  With `spec.decay_at_half` the lr drops x0.1 from epoch `epochs // 2` on and the
  momentum buffer restarts there, as the reference builds a new optimizer then.
  With `spec.multistep` it drops x0.2 at epochs 2E//3 and 5E//6 (momentum
  kept), as IDC's MultiStepLR.
  """
  tx = spec.transform()

  def epoch(carry, e):
    params, state, opt_state = carry
    if spec.decay_at_half:
      opt_state = jax.tree.map(
          lambda t: jnp.where(e == epochs // 2, jnp.zeros_like(t), t), opt_state)
    lr_e = epoch_lr(spec, lr, e, epochs)
    params, state, opt_state, loss = run_epoch(
        network, spec, params, state, opt_state, images, labels,
        jax.random.fold_in(key, e), lr_e)
    return (params, state, opt_state), loss

  (params, state, _), _ = jax.lax.scan(
      epoch, (params, state, tx.init(params)), jnp.arange(epochs))
  return params, state


def predict_accuracy(network: Network, params: Params, state: State,
                     images: jax.Array, labels: jax.Array,
                     chunk: int = 1000) -> jax.Array:
  """Top-1 accuracy in eval mode, in fixed-size chunks to bound memory."""
  n = images.shape[0]
  chunk = min(chunk, n)
  num = -(-n // chunk)
  pad = num * chunk - n
  x = jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))
  y = jnp.pad(labels, (0, pad))
  valid = jnp.arange(num * chunk) < n

  def body(args):
    xc, yc, vc = args
    logits, _ = network.apply(params, state, xc, train=False)
    return jnp.sum((jnp.argmax(logits, -1) == yc) & vc)

  correct = jax.lax.map(body, (x.reshape((num, chunk) + x.shape[1:]),
                               y.reshape(num, chunk), valid.reshape(num, chunk)))
  return jnp.sum(correct) / n
