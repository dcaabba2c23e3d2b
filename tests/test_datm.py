"""DATM and SeqMatch-DATM: the widening window, soft labels (initialisation,
soft cross-entropy, gradients), the threshold, frozen soft labels, resume,
and the config rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmatch_jax import config_lib, configuration, experts, seqmatch, training
from seqmatch_jax.backbones import datm
from seqmatch_jax.errors import ConfigError, Interrupted
from tests import helpers

META = dict(dataset='digits', image_shape=[8, 8, 1], num_classes=10, zca=False,
            seed=0, start='init', model=dict(name='convnet', width=8))


@pytest.fixture(scope='module')
def gsam_store(tmp_path_factory):
  """Two tiny GSAM experts x 3 epochs on digits."""
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  spec = experts.ExpertSpec(num=2, epochs=3, lr=0.05, momentum=0.0, batch_size=256,
                            augment='', per_batch=1, optimizer='gsam', rho=0.01,
                            alpha=0.3)
  return experts.train_experts(helpers.tiny_convnet(), spec,
                               str(tmp_path_factory.mktemp('gsam')), x, y, xt[:200],
                               yt[:200], jax.random.key(0), META, progress=False)


def _plan(epochs: int = 3, **settings):
  config = config_lib.base_config()
  config.experts.optimizer = 'gsam'
  config.experts.epochs = epochs
  base = dict(iterations=4, syn_steps=2, expert_epochs=1, min_start_epoch=0,
              current_max_start_epoch=1, max_start_epoch=3, expansion_end_epoch=4,
              batch_syn=0, lr_img=10.0, lr_y=2.0, threshold=10.0)
  return helpers.method_plan('datm', helpers.tiny_convnet(), ipc=2, augment='flip',
                             config=config, **dict(base, **settings))


def test_window_bound_follows_the_formula_and_draws_inside_it(gsam_store):
  _, plan = _plan(epochs=40, min_start_epoch=1, current_max_start_epoch=10,
                  max_start_epoch=30, expansion_end_epoch=1000, iterations=2000)
  formula = lambda it: min(10 + int((30 - 10) * it / 1000), 30)
  for it, want in ((0, 10), (500, 20), (999, 29), (1000, 30), (1999, 30)):
    assert datm.window_upper(plan, it) == formula(it) == want
  assert datm.window_upper(plan.resolved(sequential_generation=False), 0) == 30
  _, small = _plan()
  windows = datm.DATMWindows(gsam_store, small, 0, small.max_start_epoch)
  for it in range(4):
    upper = datm.window_upper(small, it)
    from seqmatch_jax.backbones import mtt  # pylint: disable=g-import-not-at-top
    picks = mtt.sample_picks(windows.experts, small, 0, it, 16, upper, low=0)
    assert all(0 <= t < upper for _, t in picks)
    assert picks == mtt.sample_picks(windows.experts, small, 0, it, 16, upper)  # replayable


def test_label_init_averages_the_experts_that_are_right():
  """Two experts, three images of classes (0, 1, 1): expert 2 gets image 0
  wrong, both get image 1 right, neither image 2 (then: all experts)."""
  logits = np.asarray([[[3., 1.], [0., 2.], [2., 0.]],
                       [[0., 1.], [1., 4.], [5., 1.]]], np.float32)
  classes = np.asarray([0, 1, 1])
  got = datm.initial_logits(logits, classes)
  expected = np.stack([logits[0, 0], (logits[0, 1] + logits[1, 1]) / 2,
                       (logits[0, 2] + logits[1, 2]) / 2])
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_init_takes_correct_images_and_labels_from_the_experts(gsam_store):
  backbone, plan = _plan()
  x, y = helpers.digits_model_space()[:2]
  rows = datm.select_correct(backbone.network, gsam_store, 3, x, y, 2, 10, seed=0)
  assert rows.shape == (10, 2) and len(set(rows.ravel().tolist())) == 20
  assert np.all(np.asarray(y)[rows] == np.arange(10)[:, None])
  preds = [np.asarray(backbone.network.apply(*gsam_store.load(e, 3, with_state=True), x[rows.ravel()],
                                             train=False)[0]).argmax(-1)
           for e in (0, 1)]
  right = np.repeat(np.arange(10), 2)
  assert np.all((preds[0] == right) | (preds[1] == right))  # an expert gets each
  # The labels: per image, the mean logits of the snapshots that get it right.
  source = datm.DATMWindows(gsam_store, plan, 0, plan.max_start_epoch)
  images = x[rows.ravel()]
  classes = np.repeat(np.arange(10), 2)
  trainable, optimizers = backbone.init(plan, source, images, classes)
  per_expert = np.stack([np.asarray(backbone.network.apply(
      *gsam_store.load(e, 3, with_state=True), images, train=False)[0]) for e in (0, 1)])
  np.testing.assert_allclose(trainable['labels'],  # float32, chunked vs whole
                             datm.initial_logits(per_expert, classes), atol=1e-6)
  assert set(optimizers) == {'images', 'labels', 'extras'}


def test_soft_cross_entropy_is_the_softmax_target_formula():
  logits = jax.random.normal(jax.random.key(0), (5, 4))
  targets = 3 * jax.random.normal(jax.random.key(1), (5, 4))
  direct = -np.sum(np.asarray(jax.nn.softmax(targets)) *
                   np.asarray(jax.nn.log_softmax(logits)), axis=-1)
  np.testing.assert_allclose(training.cross_entropy(logits, targets), direct,
                             rtol=1e-6)
  ints = jnp.asarray([0, 3, 1, 2, 2])
  np.testing.assert_allclose(training.cross_entropy(logits, ints),
                             -jax.nn.log_softmax(logits)[jnp.arange(5), ints],
                             rtol=1e-6)


def test_gradients_wrt_labels_and_images_match_finite_differences():
  with jax.enable_x64(True):
    net = helpers.tiny_convnet(width=4, depth=1)
    backbone, plan = helpers.method_plan(
        'datm', net, ipc=2, augment='', config=_gsam_config(), syn_steps=2,
        expert_epochs=1, current_max_start_epoch=1, max_start_epoch=2,
        batch_syn=0)
    params, _ = net.init(jax.random.key(0))
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    target = jax.tree.map(lambda p: p * 1.05 + 0.01, params)
    images = jax.random.normal(jax.random.key(1), (20, 8, 8, 1), jnp.float64)
    labels = jax.random.normal(jax.random.key(2), (20, 10), jnp.float64)
    syn_lr = jnp.float64(0.05)

    def f(x, y):
      syn = helpers.synset(x, y, plan, 10, extras={'syn_lr': syn_lr})
      return backbone.loss(plan, syn, (params, target), jax.random.key(3), None)
    g_x, g_y = jax.grad(f, argnums=(0, 1))(images, labels)
    assert float(jnp.abs(g_y).max()) > 0
    eps = 1e-6
    for d in range(2):
      v = jax.random.normal(jax.random.key(10 + d), images.shape, jnp.float64)
      w = jax.random.normal(jax.random.key(20 + d), labels.shape, jnp.float64)
      fd_x = (f(images + eps * v, labels) - f(images - eps * v, labels)) / (2 * eps)
      fd_y = (f(images, labels + eps * w) - f(images, labels - eps * w)) / (2 * eps)
      np.testing.assert_allclose(jnp.vdot(g_x, v), fd_x, rtol=1e-5, atol=1e-10)
      np.testing.assert_allclose(jnp.vdot(g_y, w), fd_y, rtol=1e-5, atol=1e-10)


def _gsam_config():
  config = config_lib.base_config()
  config.experts.optimizer = 'gsam'
  return config


def test_threshold_skip_changes_nothing_but_the_iteration(gsam_store):
  backbone, plan = _plan(threshold=1e-9)  # every matching loss exceeds it
  x, y = helpers.digits_model_space()[:2]
  source = datm.DATMWindows(gsam_store, plan, 0, plan.max_start_epoch)
  images = jnp.concatenate([x[np.flatnonzero(np.asarray(y) == c)[:2]]
                            for c in range(10)])
  classes = np.repeat(np.arange(10), 2)
  step, state, frozen = helpers.step_setup(backbone, plan, images, classes,
                                           source=source)
  before = jax.tree.map(np.asarray, (state.trainable, state.opt_state))
  new, metrics = step(state, frozen, source.sample(0, 1), None)
  assert float(metrics['skipped']) == 1.0 and int(new.iteration) == 1
  after = jax.tree.map(np.asarray, (new.trainable, new.opt_state))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, b)
  # Below the threshold the same step moves images, labels and syn_lr.
  backbone, plan = _plan(threshold=1e9)
  step, state, frozen = helpers.step_setup(backbone, plan, images, classes,
                                           source=source)
  new, metrics = step(state, frozen, source.sample(0, 1), None)
  assert float(metrics['skipped']) == 0.0
  for part in ('images', 'labels', 'extras'):
    assert not np.array_equal(jax.tree.leaves(new.trainable[part])[0],
                              jax.tree.leaves(state.trainable[part])[0]), part


def _tiny_config(k: int):
  c = helpers.config('digits', f'ipc=2,k={k},backbone=datm')
  config_lib.apply_settings(c, {
      'model.width': 8, 'augment.strategy': 'flip', 'experts.num': 2,
      'experts.epochs': 3, 'experts.staged_epochs': 3, 'datm.iterations': 4,
      'datm.per_subset.iterations': (), 'datm.syn_steps': 2,
      'datm.expert_epochs': 1, 'datm.current_max_start_epoch': 1,
      'datm.per_subset.current_max_start_epoch': (),
      'datm.max_start_epoch': 2, 'datm.per_subset.max_start_epoch': (),
      'datm.expansion_end_epoch': 4, 'datm.per_subset.expansion_end_epoch': (),
      'datm.threshold': 10.0, 'distill.checkpoint_every': 2,
      'dataset.val_size': 0, 'eval.epochs': 2})
  return c


def _ctx(tmp_path, store):
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  return seqmatch.Context(
      workdir=str(tmp_path), network=helpers.tiny_convnet(), x_train=x, y_train=y,
      x_test=xt, y_test=yt, x_val=None, y_val=None, num_classes=10,
      experts_dir=store.path, expert_metadata=META, key=jax.random.key(0),
      progress=False)


@pytest.mark.starts_first
def test_seqmatch_datm_freezes_soft_labels_and_resumes_bitwise(gsam_store, tmp_path):
  config = _tiny_config(2)
  configuration.validate(config)
  full = seqmatch.distill_all(_ctx(tmp_path / 'a', gsam_store), config)
  assert full.soft_labels.shape == (20, 10) and full.subset.tolist() == [0] * 10 + [1] * 10
  with np.load(tmp_path / 'a' / 'subsets' / 'subset_1.npz') as f:
    first = dict(f)
  # S_1's images and learned soft labels are untouched by subset 2.
  np.testing.assert_array_equal(full.images[:10], first['images_model'])
  np.testing.assert_array_equal(full.soft_labels[:10], first['soft_labels'])
  assert not np.array_equal(full.soft_labels[10:], full.soft_labels[:10])
  calls = {'n': 0}

  def stop_at_five():
    calls['n'] += 1
    return calls['n'] > 5  # during subset 2
  ctx = _ctx(tmp_path / 'b', gsam_store)
  ctx.should_stop = stop_at_five
  with pytest.raises(Interrupted):
    seqmatch.distill_all(ctx, config)
  ctx.should_stop = lambda: False
  again = seqmatch.distill_all(ctx, config)
  np.testing.assert_array_equal(again.images, full.images)
  np.testing.assert_array_equal(again.soft_labels, full.soft_labels)
  np.testing.assert_array_equal(again.lrs, full.lrs)


def test_config_rows_and_checks():
  rows = {('cifar10', 1): (80, 100.0, 5.0, 10, (0, 4, 4), 1.1),
          ('cifar10', 10): (80, 100.0, 2.0, 100, (0, 10, 20), 1.0),
          ('cifar10', 50): (80, 1000.0, 2.0, 500, (0, 20, 40), 1.0),
          ('cifar100', 10): (80, 1000.0, 10.0, 1000, (0, 30, 50), 1.0),
          ('cifar100', 50): (80, 1000.0, 10.0, 1000, (20, 70, 70), 1.0),
          ('tiny_imagenet', 50): (20, 100.0, 10.0, 1000, (40, 70, 70), 1.0)}
  for (name, ipc), (n, lr_img, lr_y, batch, window, threshold) in rows.items():
    c = helpers.config(name, f'ipc={ipc},backbone=datm')
    configuration.validate(c)
    plan = seqmatch.subset_plans(c)[0]
    assert (plan.syn_steps, plan.lr_img, plan.lr_y, plan.batch_syn,
            (plan.min_start_epoch, plan.current_max_start_epoch,
             plan.max_start_epoch), plan.threshold, plan.iterations) == (
                 n, lr_img, lr_y, batch, window, threshold, 10000), (name, ipc)
    assert c.dataset.zca and c.experts.optimizer == 'gsam' and c.experts.epochs == 100
  assert not helpers.config('cifar100', 'ipc=50,backbone=datm').datm.select_correct
  c = helpers.config('digits', 'backbone=datm')
  c.experts.optimizer = 'sgd'
  with pytest.raises(ConfigError, match='GSAM'):
    configuration.validate(c)
  for key, value, match in [('min_start_epoch', 5, 'window'),
                            ('max_start_epoch', 20, 'experts.epochs'),
                            ('threshold', 0.0, 'threshold')]:
    c = helpers.config('digits', 'backbone=datm')
    c.datm[key] = value
    if key in c.datm.per_subset:
      c.datm.per_subset[key] = ()
    with pytest.raises(ConfigError, match=match):
      configuration.validate(c)
