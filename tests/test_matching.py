"""Unrolled student and matching loss: meta-gradient vs finite differences,
remat equivalence, the zero-step identity, one trace per configuration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmatch_jax import distill, matching, training
from tests import helpers


def _problem(key, n_per_class=2, num_classes=2, dtype=jnp.float32):
  net = helpers.tiny_convnet(width=4, depth=1, num_classes=num_classes)
  k1, k2, k3 = jax.random.split(key, 3)
  params, _ = net.init(k1)
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  target = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(k2, p.shape, dtype),
                        params)
  n = n_per_class * num_classes
  images = jax.random.normal(k3, (n, 8, 8, 1), dtype)
  labels = jnp.repeat(jnp.arange(num_classes), n_per_class)
  return net, params, target, images, labels


def test_batch_schedule_is_the_reference_chunk_list():
  idx, mask = training.batch_schedule(jax.random.key(0), 10, 4, num_batches=6)
  idx, mask = np.asarray(idx), np.asarray(mask)
  assert idx.shape == (6, 4) and mask.tolist()[2] == [1, 1, 0, 0]
  for p in range(2):  # each pass of 3 chunks is a permutation of all 10
    chunk = idx[3 * p:3 * p + 3][mask[3 * p:3 * p + 3] > 0]
    assert sorted(chunk.tolist()) == list(range(10))


def test_zero_steps_give_loss_exactly_one():
  net, params, target, images, labels = _problem(jax.random.key(0))
  loss = matching.trajectory_loss(
      images, jnp.float32(0.01), images[:0], labels, params, target,
      jax.random.key(1), network=net, num_steps=0, batch_size=4, augment='',
      remat=True)
  assert float(loss) == 1.0


def test_meta_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    net, params, target, images, labels = _problem(jax.random.key(0),
                                                   dtype=jnp.float64)
    lr = jnp.float64(0.1)
    f = lambda x, a: matching.trajectory_loss(
        x, a, images[:0], labels, params, target, jax.random.key(3), network=net,
        num_steps=3, batch_size=3, augment='', remat=True)
    loss, (g_x, g_lr) = jax.value_and_grad(f, argnums=(0, 1))(images, lr)
    eps = 1e-5
    fd_lr = (f(images, lr + eps) - f(images, lr - eps)) / (2 * eps)
    np.testing.assert_allclose(g_lr, fd_lr, rtol=1e-5)
    for d in range(3):
      v = jax.random.normal(jax.random.key(10 + d), images.shape, jnp.float64)
      fd = (f(images + eps * v, lr) - f(images - eps * v, lr)) / (2 * eps)
      np.testing.assert_allclose(jnp.vdot(g_x, v), fd, rtol=1e-5, atol=1e-10)
    assert float(loss) != 1.0


@pytest.mark.parametrize('augment', ['', 'color_crop_cutout_flip_scale_rotate'])
def test_remat_on_and_off_agree(augment):
  net, params, target, images, labels = _problem(jax.random.key(2))
  grad = lambda remat: matching.meta_gradient(
      net, num_steps=3, batch_size=4, augment=augment, remat=remat)(
          images, jnp.float32(0.05), images[:0], labels, params, target,
          jax.random.key(4))
  (l1, (gx1, gl1)), (l2, (gx2, gl2)) = grad(True), grad(False)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  np.testing.assert_allclose(gx1, gx2, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(gl1, gl2, rtol=1e-4)


def test_distill_step_traces_once():
  net, params, target, images, labels = _problem(jax.random.key(5))
  backbone, plan = helpers.mtt_plan(net, 'flip', iterations=3, syn_steps=2,
                                    expert_epochs=1, max_start_epoch=1,
                                    lr_img=10.0, batch_syn=4)
  step, state, frozen = helpers.step_setup(backbone, plan, images, labels)
  stack = lambda t: jax.tree.map(lambda x: x[None], t)
  for i in range(3):
    shifted = jax.tree.map(lambda x, i=i: x + 0.01 * i, target)
    state, metrics = step(state, frozen, (stack(params), stack(shifted)), None)
    assert np.isfinite(float(metrics['loss']))
  assert step._cache_size() == 1
  assert int(state.iteration) == 3


def test_donated_step_survives_best_set_updates():
  """The state is donated on accelerators; the best tree must never alias
  the trainable one."""
  net, params, target, images, labels = _problem(jax.random.key(6))
  backbone, plan = helpers.mtt_plan(net, '', iterations=3, syn_steps=2,
                                    expert_epochs=1, max_start_epoch=1,
                                    lr_img=10.0, batch_syn=4)
  step, state, frozen = helpers.step_setup(backbone, plan, jnp.array(images),
                                           labels, donate=True)
  stack = lambda t: jax.tree.map(lambda x: x[None], t)
  state, _ = step(state, frozen, (stack(params), stack(target)), None)
  state = distill._evaluate(backbone, state, lambda imgs, labs, lr, it: 0.5,
                            frozen, None, 1, plan, None, 'distill')
  assert float(state.best_score) == 0.5
  state, metrics = step(state, frozen, (stack(params), stack(target)), None)
  assert np.isfinite(float(metrics['loss'])) and int(state.iteration) == 2
  assert np.all(np.isfinite(np.asarray(state.best['images'])))
