"""Trajectory matching (the MTT backbone) as pure functions.

`unroll_student` trains a student from an expert snapshot on the synthetic set
for `num_steps` SGD steps with a learnable step size; `match_loss` compares where
it lands with where the expert went. Their composition is differentiated w.r.t.
the synthetic pixels and the step size (`meta_gradient`). The unroll is one
`lax.scan`; with `remat` every step is a `jax.checkpoint`, so memory holds one
step's activations plus the parameter trajectory instead of every activation
(flat in `num_steps`; BUILD_NOTES.md, "Distillation iteration", measured it
also the fastest).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from seqmatch_jax import augment as augment_lib
from seqmatch_jax import training
from seqmatch_jax.models import Network

Params = Any


def unroll_student(network: Network, params_start: Params, images: jax.Array,
                   labels: jax.Array, syn_lr: jax.Array, key: jax.Array, *,
                   num_steps: int, batch_size: int, augment: str = '',
                   remat: bool = True, state: Any = None) -> Params:
  """θ <- θ - syn_lr ∇θ CE(f_θ(aug(x_b)), y_b) for `num_steps` minibatches.

  Minibatches are consecutive chunks of fresh permutations of `images` (the
  reference's chunk list, refilled when used up); a chunk shorter than
  `batch_size` is masked, never dropped. Each step draws its own DSA
  parameters from `key`.
  """
  state = {} if state is None else state
  perm_key, aug_key = jax.random.split(key)
  idx, mask = training.batch_schedule(perm_key, images.shape[0], batch_size,
                                      num_batches=num_steps)
  aug_keys = jax.random.split(aug_key, num_steps)

  def step(params, inputs):
    i, m, k = inputs
    x = images[i]
    if augment:
      x = augment_lib.augment(k, x, augment)
    grads = jax.grad(lambda p: training.masked_loss(
        network, p, state, x, labels[i], m)[0])(params)
    return jax.tree.map(lambda p, g: p - syn_lr * g, params, grads), None

  if remat:
    step = jax.checkpoint(step)
  params_end, _ = jax.lax.scan(step, params_start, (idx, mask, aug_keys),
                               length=num_steps)
  return params_end


def squared_distance(a: Params, b: Params) -> jax.Array:
  return sum(jnp.sum(jnp.square(x - y)) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def match_loss(params_end: Params, params_start: Params,
               params_target: Params) -> jax.Array:
  """||θ_N - θ*||² / ||θ_start - θ*||² summed over every parameter."""
  return squared_distance(params_end, params_target) / squared_distance(
      params_start, params_target)


def trajectory_loss(syn_images: jax.Array, syn_lr: jax.Array,
                    frozen_images: jax.Array, labels: jax.Array,
                    params_start: Params, params_target: Params, key: jax.Array,
                    *, network: Network, num_steps: int, batch_size: int,
                    augment: str, remat: bool, state: Any = None) -> jax.Array:
  """Matching loss of a student trained on frozen ∪ trainable images.

  `frozen_images` (SeqMatch's earlier subsets, possibly empty) come first and
  get `stop_gradient`; `labels` covers both, in that order.
  """
  images = jnp.concatenate([jax.lax.stop_gradient(frozen_images), syn_images])
  params_end = unroll_student(network, params_start, images, labels, syn_lr, key,
                              num_steps=num_steps, batch_size=batch_size,
                              augment=augment, remat=remat, state=state)
  return match_loss(params_end, params_start, params_target)


def meta_gradient(network: Network, *, num_steps: int, batch_size: int,
                  augment: str, remat: bool):
  """value_and_grad of `trajectory_loss` w.r.t. (syn_images, syn_lr)."""
  loss = functools.partial(trajectory_loss, network=network, num_steps=num_steps,
                           batch_size=batch_size, augment=augment, remat=remat)
  return jax.value_and_grad(loss, argnums=(0, 1))
