"""FTD: GSAM experts against a direct computation of its five steps, GSAM at
rho 0 = SGD, the image EMA (formula, checkpoint and bitwise resume, saved and
read back), and the refusals that keep SGD experts away from FTD."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmatch_jax import backbones, config_lib, configuration, distill
from seqmatch_jax import experts as experts_lib
from seqmatch_jax import pipeline, seqmatch, synthetic, training
from seqmatch_jax.errors import CheckpointError, ConfigError
from tests import helpers


def _tiny_data(n=20):
  x, y, *_ = helpers.digits_model_space()
  return x[:n], y[:n]


def _direct_gsam_step(net, params, state, x, y, lr, rho, alpha):
  """GSAM's five steps one scalar at a time (float64, Python loops), with
  only the two gradients from JAX: the reference the vectorised one meets."""
  mask = jnp.ones(x.shape[0])
  grad = lambda p: jax.grad(lambda q: training.masked_loss(
      net, q, state, x, y, mask)[0])(p)
  leaves, tree = jax.tree.flatten(params)
  w = [np.asarray(a, np.float64).ravel() for a in leaves]
  flat = lambda t: [np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(t)]
  g = flat(grad(params))  # 1. gradient at w
  n = 0.0  # 2. adaptive norm ||w * g||, ascent e = rho w^2 g / (n + eps)
  for wl, gl in zip(w, g):
    for wi, gi in zip(wl, gl):
      n += (abs(wi) * gi) ** 2
  n = n ** 0.5
  e = [[rho * wi * wi * gi / (n + 1e-12) for wi, gi in zip(wl, gl)]
       for wl, gl in zip(w, g)]
  shifted = jax.tree.unflatten(tree, [
      jnp.asarray((wl + np.asarray(el)).reshape(a.shape), jnp.float32)
      for wl, el, a in zip(w, e, leaves)])
  gp = flat(grad(shifted))  # 3. gradient at w + e
  dot = ng = ngp = 0.0  # 4. surrogate-gap decomposition
  for gl, pl in zip(g, gp):
    for gi, pi in zip(gl, pl):
      dot += gi * pi
      ng += gi * gi
      ngp += pi * pi
  ng, ngp = ng ** 0.5, ngp ** 0.5
  cos = dot / (ngp * ng + 1e-12)
  new = []
  for wl, gl, pl, a in zip(w, g, gp, leaves):
    out = []
    for wi, gi, pi in zip(wl, gl, pl):
      perp = gi - cos * ng * pi / (ngp + 1e-12)
      out.append(wi - lr * (pi - alpha * perp))  # 5. SGD step with d at w
    new.append(np.asarray(out).reshape(a.shape))
  return new


def test_gsam_matches_direct_computation():
  net = helpers.tiny_convnet(width=4, depth=1)
  params, state = net.init(jax.random.key(0))
  x, y = _tiny_data()
  lr, rho, alpha = 0.5, 0.05, 0.4  # large enough that every term matters
  spec = training.SGDSpec(batch_size=32, gsam=(rho, alpha))  # one batch
  got, *_ = training.run_epoch(net, spec, params, state,
                               spec.transform().init(params), x, y,
                               jax.random.key(1), jnp.float32(lr))
  want = _direct_gsam_step(net, params, state, x, y, lr, rho, alpha)
  sgd = training.SGDSpec(batch_size=32)
  plain, *_ = training.run_epoch(net, sgd, params, state, sgd.transform().init(params),
                                 x, y, jax.random.key(1), jnp.float32(lr))
  for g, wnt, p in zip(jax.tree.leaves(got), want, jax.tree.leaves(plain)):
    np.testing.assert_allclose(np.asarray(g), wnt, rtol=2e-5, atol=2e-6)
  # ... and it is not SGD in disguise.
  assert max(float(jnp.max(jnp.abs(g - p))) for g, p in zip(
      jax.tree.leaves(got), jax.tree.leaves(plain))) > 1e-4


def test_gsam_rho_zero_is_sgd():
  net = helpers.tiny_convnet(width=4, depth=1)
  params, state = net.init(jax.random.key(0))
  x, y = _tiny_data(100)

  def epoch(gsam):
    spec = training.SGDSpec(batch_size=16, momentum=0.5, augment='flip_scale',
                            gsam=gsam)
    return training.run_epoch(net, spec, params, state,
                              spec.transform().init(params), x, y,
                              jax.random.key(3), jnp.float32(0.1))
  sgd = epoch(None)
  # alpha 0: d = grad(w + 0) = g, bitwise.
  for a, b in zip(jax.tree.leaves(epoch((0.0, 0.0))), jax.tree.leaves(sgd)):
    np.testing.assert_array_equal(a, b)
  # alpha > 0: g_perp is 0 up to float32 rounding of cos.
  for a, b in zip(jax.tree.leaves(epoch((0.0, 1.0))), jax.tree.leaves(sgd)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _ftd_backbone(net, **settings):
  config = config_lib.base_config()
  config.experts.optimizer = 'gsam'
  return helpers.method_plan('ftd', net, ipc=2, augment='flip', config=config,
                             **settings)


def test_ema_post_step_formula():
  net = helpers.tiny_convnet(width=4, depth=1)
  backbone, plan = _ftd_backbone(net, iterations=3, lr_img=100.0, syn_steps=2,
                                 batch_syn=10, ema_decay=0.7, remat=False)
  params, _ = net.init(jax.random.key(0))
  target = jax.tree.map(lambda p: p * 1.05 + 0.01, params)
  window = jax.tree.map(lambda a: a[None], (params, target))
  images = jax.random.normal(jax.random.key(2), (20, 8, 8, 1))
  labels = jnp.repeat(jnp.arange(10), 2)
  step, state, frozen = helpers.step_setup(backbone, plan, images, labels,
                                           key=jax.random.key(5))
  ema = np.asarray(images)
  for _ in range(3):
    state, _ = step(state, frozen, window, None)
    t = state.trainable
    ema = 0.7 * ema + 0.3 * np.asarray(t['images'])  # no bias correction
    np.testing.assert_allclose(t['aux']['ema'], ema, rtol=1e-6, atol=1e-6)
  assert not np.allclose(t['aux']['ema'], t['images'])  # never fed back


def test_best_iterate_keeps_its_ema():
  """Validation keeping a set keeps that iterate's EMA with it: the best is a
  copy of the whole trainable tree."""
  from seqmatch_jax.backbones import ftd  # pylint: disable=g-import-not-at-top
  backbone, plan = _ftd_backbone(helpers.tiny_convnet(), iterations=2,
                                 lr_img=1.0, ema_decay=0.5)
  images = jnp.ones((20, 8, 8, 1))
  labels = jnp.repeat(jnp.arange(10), 2)
  _, state, frozen = helpers.step_setup(backbone, plan, images, labels)
  bump = lambda st, scale: st.replace(trainable=ftd.ema_update(
      0.5, dict(st.trainable, images=images * scale)))
  state = bump(state, 3)  # ema 2
  scores = iter([0.5, 0.4])
  score = lambda *_: next(scores)
  state = distill._evaluate(backbone, state, score, frozen, None, 1, plan,
                            None, 'x')
  np.testing.assert_array_equal(state.best['aux']['ema'], 2.0)
  state = bump(state, 3)  # ema 2.5, validation worse
  state = distill._evaluate(backbone, state, score, frozen, None, 2, plan,
                            None, 'x')
  np.testing.assert_array_equal(state.trainable['aux']['ema'], 2.5)
  np.testing.assert_array_equal(state.best['aux']['ema'], 2.0)


@pytest.fixture(scope='module')
def gsam_experts(tmp_path_factory):
  """Two tiny GSAM experts x 2 epochs on digits."""
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  path = str(tmp_path_factory.mktemp('experts'))
  spec = experts_lib.ExpertSpec(num=2, epochs=2, lr=0.03, momentum=0.0,
                                batch_size=256, augment='flip', per_batch=1,
                                optimizer='gsam', rho=0.01, alpha=0.3)
  experts_lib.train_experts(helpers.tiny_convnet(), spec, path, x, y, xt[:200],
                            yt[:200], jax.random.key(0), {}, progress=False)
  return path, spec


def test_expert_metadata_records_the_optimizer(gsam_experts, tmp_path):
  path, spec = gsam_experts
  with open(os.path.join(path, 'metadata.json')) as f:
    meta = json.load(f)
  assert (meta['optimizer'], meta['rho'], meta['alpha']) == ('gsam', 0.01, 0.3)
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  sgd = experts_lib.ExpertSpec(**dict(vars(spec), optimizer='sgd'))
  with pytest.raises(CheckpointError, match='optimizer'):
    experts_lib.train_experts(helpers.tiny_convnet(), sgd, path, x, y, xt, yt,
                              jax.random.key(0), {}, progress=False)
  other = experts_lib.ExpertSpec(**dict(vars(spec), alpha=1.0))
  with pytest.raises(CheckpointError, match='alpha'):
    experts_lib.train_experts(helpers.tiny_convnet(), other, path, x, y, xt, yt,
                              jax.random.key(0), {}, progress=False)


def _ftd_config():
  c = helpers.config('digits', 'k=1')
  config_lib.apply_settings(c, {
      'backbone.name': 'ftd', 'experts.optimizer': 'gsam', 'ipc': 2,
      'model.width': 8, 'augment.strategy': 'flip', 'distill.checkpoint_every': 2,
      'ftd.iterations': 5, 'ftd.syn_steps': 2, 'ftd.expert_epochs': 1,
      'ftd.max_start_epoch': 1, 'ftd.lr_img': 100.0, 'ftd.ema_decay': 0.5,
      'ftd.remat': False})
  return c


def _ctx(workdir, config, experts_dir):
  from seqmatch_jax import seqmatch
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  del config  # methods read their plans, never the config
  return seqmatch.Context(
      workdir=str(workdir), network=helpers.tiny_convnet(),
      x_train=x, y_train=y, x_test=xt, y_test=yt, x_val=None, y_val=None,
      num_classes=10, experts_dir=experts_dir, expert_metadata={},
      key=jax.random.key(0), progress=False)


def test_ema_is_checkpointed_resumed_bitwise_and_saved(gsam_experts, tmp_path):
  from seqmatch_jax import seqmatch
  from seqmatch_jax.errors import Interrupted
  config = _ftd_config()
  configuration.validate(config)
  full = seqmatch.distill_all(_ctx(tmp_path / 'a', config, gsam_experts[0]), config)
  assert full.ema is not None and full.ema.shape == full.images.shape
  assert not np.array_equal(full.ema, full.images)
  calls = {'n': 0}

  def stop_at_three():
    calls['n'] += 1
    return calls['n'] > 3
  ctx = _ctx(tmp_path / 'b', config, gsam_experts[0])
  ctx.should_stop = stop_at_three
  with pytest.raises(Interrupted):
    seqmatch.distill_all(ctx, config)
  ctx.should_stop = lambda: False
  resumed = seqmatch.distill_all(ctx, config)
  np.testing.assert_array_equal(resumed.images, full.images)
  np.testing.assert_array_equal(resumed.ema, full.ema)
  # Written next to the raw images, and read back (a finished subset too).
  np.testing.assert_array_equal(
      synthetic.load_subset(tmp_path / 'b' / 'subsets' / 'subset_1.npz').ema,
      full.ema)
  np.testing.assert_array_equal(seqmatch.distill_all(ctx, config).ema, full.ema)
  out = str(tmp_path / 'synthetic.npz')

  class Identity:
    to_pixels = to_model = staticmethod(lambda v: v)
  synthetic.save(out, full, Identity(), config)
  with np.load(out) as f:
    assert {'images_ema', 'images_ema_model'} <= set(f.files)
  back = synthetic.load(out, 10, (8, 8, 1), Identity(), config)
  np.testing.assert_array_equal(back.ema, full.ema.astype(np.float32))


def test_ftd_refuses_sgd_experts(tmp_path):
  config = _ftd_config()
  config.experts.optimizer = 'sgd'
  with pytest.raises(ConfigError, match='experts.optimizer=gsam'):
    configuration.validate(config)
  config.experts.optimizer = 'adam'
  with pytest.raises(ConfigError, match='sgd|gsam'):
    configuration.validate(config)
  # A given expert directory (experts.dir) of SGD experts is refused too.
  os.makedirs(tmp_path / 'sgd')
  with open(tmp_path / 'sgd' / 'metadata.json', 'w') as f:
    json.dump({'epochs': 2}, f)  # no optimizer recorded: SGD
  config.experts.optimizer = 'gsam'
  net = helpers.tiny_convnet()
  backbone = backbones.create(config, net)
  plan = seqmatch.single_plan(config, ipc=2)
  with pytest.raises(ConfigError, match='GSAM experts'):
    backbone.prepare(_ctx(tmp_path, config, str(tmp_path / 'sgd')), plan, None)


def test_kept_version_names_the_better_mean():
  raw = {'convnet': {'mean': 90.0}}
  ema = {'convnet': {'mean': 91.0}}
  assert pipeline.kept_version(raw, ema)['kept'] == 'EMA'
  assert pipeline.kept_version(ema, raw)['kept'] == 'raw'


def test_ftd_rows_follow_table_7():
  c = helpers.config('cifar10', 'ipc=1')
  assert (c.ftd.syn_steps, c.ftd.lr_lr, c.ftd.ema_decay, c.experts.alpha) == (
      50, 1e-7, 0.9999, 0.3)
  c = helpers.config('cifar10', 'ipc=50')
  assert (c.ftd.lr_img, c.ftd.lr_teacher, c.experts.alpha) == (1000.0, 0.01, 1.0)
  assert c.mtt.lr_teacher == 0.01 and c.mtt.lr_img == 100.0  # mtt rows kept
  c = helpers.config('cifar100', 'ipc=50')
  assert (c.ftd.batch_syn, c.ftd.syn_steps, c.ftd.ema_decay) == (1000, 80, 0.999)
  c = helpers.config('tiny_imagenet', 'ipc=10')
  assert (c.ftd.batch_syn, c.experts.alpha, c.mtt.batch_syn) == (500, 1.0, 100)
