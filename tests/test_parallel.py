"""Several devices (4 forced CPU devices, see conftest.py): sharded results
equal single-device ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmatch_jax import distill, evaluate, experts, matching, parallel
from tests import helpers

needs4 = pytest.mark.skipif(jax.device_count() < 4, reason='needs 4 devices')


@needs4
def test_distill_step_on_4_devices_is_the_mean_of_4_meta_gradients():
  net = helpers.tiny_convnet(width=4, depth=1)
  keys = jax.random.split(jax.random.key(0), 4)
  starts = jax.vmap(lambda k: net.init(k)[0])(keys)
  targets = jax.tree.map(lambda p: p * 1.05 + 0.01, starts)
  images = jax.random.normal(jax.random.key(1), (10, 8, 8, 1))
  labels = jnp.arange(10)
  backbone, plan = helpers.mtt_plan(net, 'flip', ipc=1, iterations=1,
                                    syn_steps=2, expert_epochs=1,
                                    max_start_epoch=1, lr_teacher=0.05,
                                    lr_img=100.0, batch_syn=10)
  mesh = parallel.make_mesh(4)
  step, state, frozen = helpers.step_setup(backbone, plan, images, labels,
                                           key=jax.random.key(2), trajectories=4,
                                           mesh=mesh)
  new, metrics = step(state, frozen, (starts, targets), None)
  # Reference: the four meta-gradients one by one on one device, averaged.
  grad = matching.meta_gradient(net, num_steps=2, batch_size=10, augment='flip',
                                remat=True)
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key), 0)
  tkeys = jax.random.split(key, 4)
  outs = [grad(images, state.trainable['extras']['syn_lr'], images[:0], labels,
               jax.tree.map(lambda a, i=i: a[i], starts),
               jax.tree.map(lambda a, i=i: a[i], targets), tkeys[i])
          for i in range(4)]
  loss = np.mean([float(o[0]) for o in outs])
  g_img = np.mean([np.asarray(o[1][0]) for o in outs], axis=0)
  np.testing.assert_allclose(metrics['loss'], loss, rtol=1e-5)
  # First SGD step with momentum: images - lr_img * g.
  np.testing.assert_allclose(new.trainable['images'], images - 100.0 * g_img, rtol=1e-4,
                             atol=1e-5)


@needs4
def test_sharded_evaluation_equals_sequential():
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  xr, yr = evaluate.random_real(x, y, 2, 10, seed=0)
  net = helpers.tiny_convnet()
  keys = jax.random.split(jax.random.key(3), 5)  # 5 models on 4 devices: padded
  run = lambda mode, mesh: evaluate.train_and_score(
      net, evaluate.Protocol(epochs=5, augment='flip', parallel=mode), keys,
      [(xr, yr)], jnp.full((1,), 0.02), xt, yt, mesh)
  np.testing.assert_allclose(run('vmap', parallel.make_mesh(4)),
                             run('sequential', None), atol=2e-3)


@needs4
def test_sharded_expert_training_equals_sequential(tmp_path):
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  meta = dict(dataset='digits')
  net = helpers.tiny_convnet()
  spec = lambda g: experts.ExpertSpec(num=4, epochs=2, lr=0.05, momentum=0.0,
                                      batch_size=256, augment='', per_batch=g)
  a = experts.train_experts(net, spec(4), str(tmp_path / 'a'), x, y, xt, yt,
                            jax.random.key(0), meta, mesh=parallel.make_mesh(4))
  b = experts.train_experts(net, spec(1), str(tmp_path / 'b'), x, y, xt, yt,
                            jax.random.key(0), meta)
  for i in range(4):
    for u, v in zip(jax.tree.leaves(a.load(i, 2)), jax.tree.leaves(b.load(i, 2))):
      np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)


def test_map_models_modes_agree():
  f = lambda w, b, x: jnp.tanh(x @ w + b).sum()
  w = jax.random.normal(jax.random.key(0), (3, 4, 2))
  b = jnp.arange(3.0)
  x = jnp.ones((5, 4))
  seq = parallel.map_models(f, 2, 'sequential')(w, b, x)
  vm = parallel.map_models(f, 2, 'vmap')(w, b, x)
  np.testing.assert_allclose(seq, vm, rtol=1e-6)
  with pytest.raises(Exception, match='auto|vmap|sequential'):
    parallel.resolve_model_parallel('pmap')
