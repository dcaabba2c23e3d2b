"""Pure computations behind the paper's analyses (Figures 1, 2 and 4).

* Instance-wise loss curves (Figures 1 and 4): a fresh network trains on a
  synthetic set (staged for SeqMatch) in "epochs" of a fixed number of SGD
  iterations, and after every epoch the loss of every real instance is recorded.
* The easy / hard split of those curves: k-means with two clusters.
* The coupling norm of Eq. 4, ||R(s_i, f_θ0)||_1, the entrywise l1 norm of the
  Jacobian of the parameter gradient with respect to the image (Figure 2),
  exactly (forward-over-reverse, chunks of input dimensions) or by sampling
  input dimensions, and the per-class S+ / S- split it induces.

No plotting and no file I/O here (see `seqmatch_jax.analyze`): everything is a
function of arrays and PRNG keys, so it can be tested and reused.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

from seqmatch_jax import augment as augment_lib
from seqmatch_jax import training
from seqmatch_jax.errors import DataError
from seqmatch_jax.models import Network


# ----------------------------------------------------------- loss curves (Fig. 1)


def instance_losses(network: Network, params, state, x: jax.Array, y: jax.Array,
                    chunk: int = 512) -> jax.Array:
  """Per-example cross-entropy in eval mode, in fixed-size chunks (bounded
  memory for a large real training set). Returns [N]."""
  n = x.shape[0]
  chunk = min(chunk, n)
  num = -(-n // chunk)
  pad = num * chunk - n
  xp = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
  yp = jnp.pad(y, (0, pad))

  def body(args):
    xc, yc = args
    logits, _ = network.apply(params, state, xc, train=False)
    return training.cross_entropy(logits, yc)

  losses = jax.lax.map(body, (xp.reshape((num, chunk) + x.shape[1:]),
                              yp.reshape(num, chunk)))
  return losses.reshape(-1)[:n]


def split_epochs(total: int, num_stages: int) -> list[int]:
  """Epochs per stage: equal, remainder to the earliest (as subset sizes)."""
  if total < num_stages:
    raise DataError(f'{total} loss epochs cannot cover {num_stages} stages; pass '
                    f'--loss_epochs={num_stages} or more.')
  base, extra = divmod(total, num_stages)
  return [base + (1 if k < extra else 0) for k in range(num_stages)]


@functools.lru_cache(maxsize=32)
def _epoch_fn(network: Network, spec: training.SGDSpec, iterations: int):
  """Jitted (params, state, opt_state, x, y, key, lr, x_real, y_real) ->
  (params, state, opt_state, real losses [N]): one epoch of `iterations` SGD
  steps (the paper's 20), batches drawn as the shuffled loader does, then the
  loss of every real instance. One compile per set shape, whatever the epochs.
  """
  tx = spec.transform()
  grad_fn = jax.value_and_grad(functools.partial(training.masked_loss, network),
                               has_aux=True)

  def run(params, state, opt_state, x, y, key, lr, x_real, y_real):
    perm_key, aug_key = jax.random.split(key)
    idx, mask = training.batch_schedule(perm_key, x.shape[0],
                                        min(spec.batch_size, x.shape[0]), iterations)

    def step(carry, inputs):
      params, state, opt_state = carry
      i, m, k = inputs
      xb = x[i]
      if spec.augment:
        xb = augment_lib.augment(k, xb, spec.augment)
      (_, state), grads = grad_fn(params, state, xb, y[i], m)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
      return (params, state, opt_state), None

    (params, state, opt_state), _ = jax.lax.scan(
        step, (params, state, opt_state),
        (idx, mask, jax.random.split(aug_key, iterations)))
    return params, state, opt_state, instance_losses(network, params, state,
                                                     x_real, y_real)

  return jax.jit(run)


def loss_curves(network: Network, spec: training.SGDSpec, key: jax.Array,
                stages: Sequence[tuple[jax.Array, jax.Array]], lrs: Sequence[float],
                epochs_per_stage: Sequence[int], iterations: int,
                x_real: jax.Array, y_real: jax.Array) -> np.ndarray:
  """Loss of every real instance at initialisation and after every epoch of
  training a fresh network (init from `key`) on stages[0], then stages[1], ...
  (weights carried, stage k with lrs[k]). Within a stage, as the evaluation
  protocol's `train_schedule`: a fresh momentum buffer, and with
  `spec.decay_at_half` lr x0.1 and a momentum restart at half the stage.
  Returns [1 + sum(epochs), N].
  """
  if len(stages) != len(epochs_per_stage) or len(lrs) < len(stages):
    raise DataError(f'{len(stages)} stages need as many epoch counts and lrs.')
  run = _epoch_fn(network, spec, int(iterations))
  tx = spec.transform()
  params, state = network.init(jax.random.fold_in(key, 0))
  rows = [np.asarray(instance_losses(network, params, state, x_real, y_real))]
  for k, ((x, y), epochs) in enumerate(zip(stages, epochs_per_stage)):
    opt_state = tx.init(params)
    stage_key = jax.random.fold_in(key, k + 1)
    for e in range(int(epochs)):
      lr = float(lrs[k])
      if spec.decay_at_half and e >= epochs // 2:
        lr *= 0.1
        if e == epochs // 2:
          opt_state = tx.init(params)
      params, state, opt_state, losses = run(
          params, state, opt_state, x, y, jax.random.fold_in(stage_key, e),
          jnp.float32(lr), x_real, y_real)
      rows.append(np.asarray(losses))
  return np.stack(rows)


def easy_hard_split(curves: np.ndarray, seed: int = 0) -> np.ndarray:
  """k-means (2 clusters) on per-instance loss curves [N, T]; True = hard, the
  cluster whose centre has the larger mean loss (the paper's Figure 1 split)."""
  from sklearn.cluster import KMeans  # pylint: disable=g-import-not-at-top
  curves = np.asarray(curves, np.float64)
  if curves.ndim != 2 or curves.shape[0] < 2:
    raise DataError(f'k-means needs at least 2 loss curves, got shape {curves.shape}; '
                    'raise --max_instances.')
  if not np.all(np.isfinite(curves)):
    raise DataError('instance losses contain NaN or inf (training diverged); '
                    'lower the learning rate or check the synthetic set.')
  if np.ptp(curves, axis=0).max() == 0:  # one point: no split to find
    return np.zeros(curves.shape[0], bool)
  km = KMeans(n_clusters=2, n_init=10, random_state=seed).fit(curves)
  hard = int(np.argmax(km.cluster_centers_.mean(axis=1)))
  return km.labels_ == hard


# ------------------------------------------------------ coupling norm (Fig. 2)


def _flat_grad_fn(network: Network, params, state):
  """x, y -> the flat parameter gradient of one image's loss, ∇_θ ℓ(f_θ(x), y).
  Train mode, as the student steps of matching compute it."""
  flat, unravel = ravel_pytree(params)

  def grad(x, y):
    def loss(p):
      logits, _ = network.apply(unravel(p), state, x[None], train=True)
      return training.cross_entropy(logits, y[None])[0]
    return jax.grad(loss)(flat)

  return grad


@functools.partial(jax.jit, static_argnames=('network', 'chunk'))
def r_norms(network: Network, params, state, images: jax.Array, labels: jax.Array,
            columns: jax.Array | None = None, chunk: int = 64) -> jax.Array:
  """||R(s_i, f_θ)||_1 per image (Eq. 4): the entrywise l1 norm of
  d∇_θ ℓ(f_θ(s_i), y_i) / ds_i, a [P, d] matrix (P parameters, d = H*W*C).

  The norm is a sum of column norms, column j being the JVP along the input
  basis vector e_j, so it is computed forward-over-reverse: one linearisation
  of the gradient per image, then its JVPs vmapped over `chunk` basis vectors
  at a time. With `columns` (input-dimension indices), only those columns are
  summed and scaled by d / len(columns): an unbiased estimator costing
  len(columns) JVPs instead of d. Returns [N].

  `network` must be forward-differentiable: build it with conv_impl='xla' (the
  CPU 'im2col' convolution is a custom_vjp, which has no JVP). The parameters
  are the same for every conv_impl.
  """
  grad = _flat_grad_fn(network, params, state)
  shape = images.shape[1:]
  d = int(np.prod(shape))
  cols = jnp.arange(d) if columns is None else jnp.asarray(columns, jnp.int32)
  m = cols.shape[0]
  chunk = min(chunk, m)
  num = -(-m // chunk)
  cols = jnp.pad(cols, (0, num * chunk - m), constant_values=-1)  # -1: zero tangent
  cols = cols.reshape(num, chunk)
  scale = d / m

  def one_image(args):
    x, y = args
    _, jvp = jax.linearize(lambda xi: grad(xi, y), x)

    def block(idx):
      tangents = jax.nn.one_hot(idx, d, dtype=x.dtype).reshape((chunk,) + shape)
      return jnp.sum(jnp.abs(jax.vmap(jvp)(tangents)))

    return jnp.sum(jax.lax.map(block, cols)) * scale

  return jax.lax.map(one_image, (images, labels))


def sample_columns(key: jax.Array, image_shape: Sequence[int], num: int) -> jax.Array:
  """`num` distinct input dimensions, uniformly: the estimator's columns."""
  d = int(np.prod(image_shape))
  return jax.random.choice(key, d, (min(num, d),), replace=False)


def split_by_norm(norms: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-class halves by norm: (S+ mask, S- mask). S+ holds the floor(n/2)
  largest-norm images of each class, S- as many smallest; an odd class leaves
  its median image out, so both halves have equal size class by class."""
  norms = np.asarray(norms)
  labels = np.asarray(labels)
  plus = np.zeros(len(labels), bool)
  minus = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    order = idx[np.argsort(-norms[idx], kind='stable')]
    half = len(idx) // 2
    if half == 0:
      raise DataError(f'class {c} has one synthetic image: S+/S- needs ipc >= 2.')
    plus[order[:half]] = True
    minus[order[len(idx) - half:]] = True
  return plus, minus


def restage(subset: np.ndarray | None, keep: np.ndarray,
            lrs: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
  """Subset ids and per-subset lrs of the kept images, renumbered 0..K'-1 so
  that no stage is empty (S+ may miss a subset entirely)."""
  lrs = np.atleast_1d(np.asarray(lrs, np.float32))
  if subset is None:
    return None, lrs[:1]
  ids = np.asarray(subset)[keep]
  present = np.unique(ids)
  remap = {int(k): i for i, k in enumerate(present)}
  new = np.asarray([remap[int(k)] for k in ids], np.int32)
  full = np.broadcast_to(lrs, (int(np.max(subset)) + 1,))
  return new, full[present]


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float] | None:
  """Least-squares line y = slope x + intercept, with r; None when x is constant
  or there are fewer than two points."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if len(x) < 2 or np.ptp(x) == 0:
    return None
  slope, intercept = np.polyfit(x, y, 1)
  r = float(np.corrcoef(x, y)[0, 1]) if np.ptp(y) > 0 else 0.0
  return dict(slope=float(slope), intercept=float(intercept), r=r)
