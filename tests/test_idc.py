"""IDC and SeqMatch-IDC: multi-formation decode and init, IDC's augmentation
and CutMix, the per-class step against a direct loop, finite differences,
frozen subsets, S_1 in every later stage, resume, the evaluation schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmatch_jax import augment, backbones, config_lib, distill, evaluate
from seqmatch_jax import parameterization, seqmatch, training
from seqmatch_jax.backbones import idc
from seqmatch_jax.errors import ConfigError, Interrupted
from tests import helpers


# -- IDC's augmentation and CutMix ----------------------------------------------

def test_idc_style_applies_flip_color_cutout_always_around_one_drawn_family():
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  dsa = augment.DSAParams(style='idc', align_corners=False)
  for seed in range(4):
    p = augment.sample_params(jax.random.key(seed), 'color_crop_cutout_flip', 4,
                              x.shape[1:], dsa)
    assert p.always == ('flip', 'color', 'cutout') and p.families == ('crop',)
    expected = augment._cutout(augment._crop(augment._color(
        augment._flip(x, p), p), p), p)
    np.testing.assert_allclose(augment.apply_params(x, p), expected, atol=1e-6)
  # Only the always-families listed: nothing is drawn besides them.
  p = augment.sample_params(jax.random.key(0), 'color_cutout', 4, x.shape[1:], dsa)
  assert p.families == () and p.always == ('color', 'cutout')
  # DSA style still draws one family of all tokens.
  p = augment.sample_params(jax.random.key(0), 'color_crop_cutout', 4, x.shape[1:])
  assert p.always == () and p.families == ('color', 'crop', 'cutout')


def test_cutmix_box_ratio_and_partners():
  """Image i is constant i: inside the one box it shows its partner's value;
  ratio is 1 minus the box's area; partners permute the valid entries."""
  x = jnp.arange(6, dtype=jnp.float32)[:, None, None, None] * jnp.ones((6, 8, 8, 1))
  valid = jnp.asarray([1, 1, 1, 1, 0, 0], jnp.float32)
  checked = 0
  for seed in range(20):
    out, partner, ratio = augment.cutmix(jax.random.key(seed), x, 1.0, valid=valid)
    out, partner = np.asarray(out)[..., 0], np.asarray(partner)
    assert sorted(partner[:4].tolist()) == [0, 1, 2, 3]
    assert partner[4:].tolist() == [4, 5] and np.all(out[4:] == np.asarray(x)[4:, ..., 0])
    moved = [i for i in range(4) if partner[i] != i]
    if not moved:
      continue
    box = out[moved[0]] == partner[moved[0]]
    for i in moved:
      np.testing.assert_array_equal(out[i] == partner[i], box)  # one box
      assert np.all(out[i][~box] == i)
    np.testing.assert_allclose(float(ratio), 1 - box.mean(), atol=1e-6)
    checked += 1
  assert checked > 10
  same, _, ratio = augment.cutmix(jax.random.key(0), x, 0.0)
  np.testing.assert_array_equal(same, x)
  assert float(ratio) == 1.0


def test_cutmix_loss_is_the_ratio_mix_of_both_labels():
  net = helpers.tiny_convnet(width=4, depth=1, num_classes=3)
  params, state = net.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  y, y2 = jnp.asarray([0, 1, 2, 0]), jnp.asarray([1, 1, 0, 2])
  mask = jnp.ones(4)
  mixed, _ = training.mixed_loss(net, params, state, x, y, y2, 0.3, mask)
  a, _ = training.masked_loss(net, params, state, x, y, mask)
  b, _ = training.masked_loss(net, params, state, x, y2, mask)
  np.testing.assert_allclose(mixed, 0.3 * a + 0.7 * b, rtol=1e-6)


def test_multistep_schedule_drops_by_five_at_two_thirds_and_five_sixths():
  """IDC's MultiStepLR([2E//3, 5E//6], 0.2): a one-parameter linear model
  with a constant gradient moves by exactly lr_e per epoch."""
  epochs = 12  # milestones 8 and 10
  lrs = [float(training.epoch_lr(training.SGDSpec(8, multistep=True), 1.0, e, epochs))
         for e in range(epochs)]
  assert lrs == pytest.approx([1.0] * 8 + [0.2] * 2 + [0.04] * 2)
  half = [float(training.epoch_lr(training.SGDSpec(8, decay_at_half=True), 1.0, e, 4))
          for e in range(4)]
  assert half == pytest.approx([1.0, 1.0, 0.1, 0.1])


def test_idc_protocol_is_the_backbones():
  c = _config('idc', 1)
  c.eval.epochs = 9
  p = seqmatch.run_info(c).protocol
  assert (p.schedule, p.batch_size, p.augment_style, p.cutmix, p.align_corners,
          p.augment, p.epochs) == ('multistep', 64, 'idc', 0.5, False,
                                   'color_crop_flip_scale_rotate', 9)
  assert p.momentum == c.eval.momentum and p.trim_short_batch == c.eval.trim_short_batch
  c.backbone.name = 'mtt'
  assert seqmatch.run_info(c).protocol == evaluate.protocol_from_config(c)


# -- the step ---------------------------------------------------------------------

def _config(name: str = 'idc', k: int = 2, **settings):
  c = helpers.config('digits', f'ipc=2,k={k},backbone={name}')
  config_lib.apply_settings(c, {
      'model.width': 8, 'augment.strategy': 'flip', 'distill.checkpoint_every': 2,
      'distill.eval_every': 0, 'idc.iterations': 3, 'idc.per_subset.iterations': (),
      'idc.inner_loop': 2, 'idc.per_subset.inner_loop': (), 'idc.n_data': 64,
      'idc.batch_syn_max': 6, 'idc.net_epochs': 2, 'idc.fix_iter': 2,
      'idc.lr_img': 0.5, 'idc.per_subset.lr_img': (), **settings})
  return c


def _ctx(tmp_path, config):
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  from seqmatch_jax import data as data_lib
  pre = data_lib.fit_preprocessor(data_lib.load_dataset('digits'), zca=False)
  del config  # methods read their plans, never the config
  return seqmatch.Context(
      workdir=str(tmp_path), network=helpers.tiny_convnet(),
      x_train=x, y_train=y, x_test=xt, y_test=yt, x_val=None, y_val=None,
      num_classes=10, experts_dir='', expert_metadata={}, key=jax.random.key(0),
      progress=False, preprocessor=pre)


def _initial_set(config, ctx):
  plans = seqmatch.subset_plans(config, (8, 8, 1))
  sizes = [p.ipc for p in plans]
  init = seqmatch.initial_images(jax.random.key(1), ctx.x_train, ctx.y_train, sizes,
                                 10, config.distill.pix_init, plans[0].run.param,
                                 ctx.preprocessor.to_pixels)
  labels, subset = seqmatch.subset_layout(sizes, 10)
  return plans, init, labels, subset


def _subset_problem(tmp_path, k_index: int = 1, **settings):
  """The IDC method at subset 2 of 2 (ipc 1 + 1): its source, plan, a frozen
  S_1 and the trainable S_2 in pixel space."""
  config = _config(**settings)
  ctx = _ctx(tmp_path, config)
  backbone = backbones.create(config, ctx.network)
  plans, init, labels, subset = _initial_set(config, ctx)
  plan = plans[k_index]
  frozen = init[subset < k_index]
  done = backbones.Done(frozen, labels[subset < k_index], subset[subset < k_index],
                        [0.01] * k_index)
  source = backbone.prepare(ctx, plan, done)
  return backbone, plan, source, jnp.asarray(frozen), jnp.asarray(
      init[subset == k_index]), jnp.asarray(labels[subset <= k_index])


def _walk(source, iteration: int = 0):
  """Trajectory 0's real batches at `iteration`, as a step's inner state
  holds them before its first match."""
  return dict(jax.tree.map(jnp.asarray, source.real_batches(iteration, 0)),
              match=jnp.zeros((), jnp.int32))


def _syn(plan, images, labels):
  return helpers.synset(images, labels, plan, 10)


def test_step_is_one_image_update_per_class_in_turn(tmp_path):
  """The generic step (one match) equals a direct Python loop: the block's
  network, then per class the gradient of that class's loss at the current
  images and one SGD-momentum step on the whole tensor; then the clamp."""
  backbone, plan, source, frozen, mine, labels = _subset_problem(
      tmp_path, **{'idc.inner_loop': 1})
  n = len(frozen)
  step, state, frozen_set = helpers.step_setup(
      backbone, plan, mine, labels[n:], frozen=frozen, frozen_labels=labels[:n],
      key=jax.random.key(7))
  resources = source.sample(0, 1)
  new, _ = step(state, frozen_set, resources, source.data)

  key = jax.random.fold_in(jax.random.wrap_key_data(state.key), 0)
  key = jax.random.split(key, 1)[0]
  inner = backbone.initial_network(plan, jax.tree.map(lambda x: x[0], resources),
                                   jax.random.fold_in(key, distill.INIT_SALT))
  tx = backbone.init(plan, source, mine, labels[n:])[1]['images']
  opt = tx.init(mine)
  images = mine
  class_grad = jax.jit(jax.grad(lambda m, c: backbone.class_loss(
      plan, _syn(plan, jnp.concatenate([frozen, m]), labels), inner, key,
      source.data, c)))
  for c in range(10):
    g = class_grad(images, c)
    # Only class c's images get a gradient; momentum moves the others.
    rows = np.flatnonzero(np.asarray(labels[n:]) != c)
    assert float(jnp.abs(g[rows]).max()) == 0.0
    upd, opt = tx.update(g, opt)
    images = images + upd
  got = new.trainable['images']
  np.testing.assert_allclose(got, jnp.clip(images, 0, 1), rtol=1e-5, atol=1e-6)
  assert float(got.min()) >= 0 and float(got.max()) <= 1
  assert not np.allclose(got, mine)


def test_sharded_step_equals_the_single_device_step(tmp_path):
  """Two trajectories (each its own copy of the block's network, real
  batches and draws) split over two devices give the step one device gives."""
  from seqmatch_jax import parallel
  backbone, plan, source, frozen, mine, labels = _subset_problem(
      tmp_path, **{'idc.inner_loop': 1})
  n = len(frozen)
  setup = lambda mesh: helpers.step_setup(
      backbone, plan, mine, labels[n:], frozen=frozen, frozen_labels=labels[:n],
      key=jax.random.key(7), trajectories=2, mesh=mesh)
  step, state, frozen_set = setup(None)
  one, _ = step(state, frozen_set, source.sample(0, 2), source.data)
  mesh = parallel.make_mesh(2)
  step, state, frozen_set = setup(mesh)
  two, _ = step(parallel.replicate(state, mesh), parallel.replicate(frozen_set, mesh),
                source.sample(0, 2, mesh), parallel.replicate(source.data, mesh))
  np.testing.assert_allclose(parallel.fetch(two.trainable['images']),
                             one.trainable['images'], rtol=1e-5, atol=1e-6)


def test_loss_is_the_direct_conv_gradient_mse(tmp_path):
  """One class's loss: Σ over the conv kernels of (g_real - g_syn)^2, the
  synthetic images being each subset's decoded images joined, with one
  augmentation (here none) for real and synthetic."""
  backbone, plan, source, frozen, mine, labels = _subset_problem(
      tmp_path, **{'augment.strategy': 'flip', 'idc.aug_match': 'none',
                   'idc.batch_real': 1000, 'idc.batch_syn_max': 1000})
  data = source.data
  params, state = backbone.network.init(jax.random.key(3))
  inner = ((params, state), None, _walk(source))
  c = 4
  loss = jax.jit(lambda im: backbone.class_loss(
      plan, _syn(plan, im, labels), inner, jax.random.key(5), data, c))(
          jnp.concatenate([frozen, mine]))
  real = data['x'][np.asarray(data['y']) == c]
  decode = lambda x: parameterization.decode_tiles(x, 2)
  syn = jnp.concatenate([decode(frozen[np.asarray(labels[:10]) == c]),
                         decode(mine[np.asarray(labels[10:]) == c])])
  syn = (syn - data['mean']) / data['std']

  @jax.jit
  def grads(x):
    ce = lambda p: -jnp.mean(jax.nn.log_softmax(
        backbone.network.apply(p, state, x, train=True)[0])[:, c])
    return jax.grad(ce)(params)
  expected = sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(
      jax.tree.leaves(grads(real)), jax.tree.leaves(grads(syn))) if a.ndim == 4)
  np.testing.assert_allclose(loss, expected, rtol=1e-4)


def test_image_gradient_matches_finite_differences(tmp_path):
  backbone, plan, source, frozen, mine, labels = _subset_problem(
      tmp_path, **{'idc.aug_match': 'color_crop_cutout'})
  params, state = backbone.network.init(jax.random.key(3))
  with jax.enable_x64(True):
    data = jax.tree.map(lambda a: a.astype(jnp.float64)
                        if jnp.issubdtype(a.dtype, jnp.floating) else a, source.data)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    inner = ((params, state), None, _walk(source))
    frozen, mine = frozen.astype(jnp.float64), mine.astype(jnp.float64)
    f = jax.jit(lambda m: backbone.class_loss(
        plan, _syn(plan, jnp.concatenate([frozen, m]), labels), inner,
        jax.random.key(5), data, 3))
    g = jax.jit(jax.grad(f))(mine)
    assert float(jnp.abs(g).max()) > 0
    eps = 1e-7
    for d in range(3):
      v = jax.random.normal(jax.random.key(10 + d), mine.shape, jnp.float64)
      fd = (f(mine + eps * v) - f(mine - eps * v)) / (2 * eps)
      np.testing.assert_allclose(jnp.vdot(g, v), fd, rtol=1e-4, atol=1e-9)


def test_frozen_subset_gets_no_gradient(tmp_path):
  backbone, plan, source, frozen, mine, labels = _subset_problem(tmp_path)
  params, state = backbone.network.init(jax.random.key(3))
  inner = ((params, state), None, _walk(source))
  f = lambda fr, stop: backbone.class_loss(
      plan, _syn(plan, jnp.concatenate([jax.lax.stop_gradient(fr) if stop else fr,
                                        mine]), labels),
      inner, jax.random.key(5), source.data, 2)
  grad = jax.jit(jax.grad(f), static_argnums=1)
  assert float(jnp.abs(grad(frozen, True)).max()) == 0.0
  # ... but it takes part in the loss.
  assert float(jnp.abs(grad(frozen, False)).max()) > 0.0


def test_seqmatch_networks_learn_the_earlier_subsets_including_s1_at_k3(tmp_path):
  """Subset 3's networks are trained on S_1, then S_1 ∪ S_2 (the official
  code's K >= 3 bug drops S_1); they refresh every fix_iter iterations and
  depend only on the block."""
  config = _config(k=3, **{'ipc': 3})
  ctx = _ctx(tmp_path, config)
  backbone = backbones.create(config, ctx.network)
  plans, init, labels, subset = _initial_set(config, ctx)
  done = backbones.Done(init[subset < 2], labels[subset < 2], subset[subset < 2],
                        [0.01, 0.01])
  source = backbone.prepare(ctx, plans[2], done)
  decode = lambda *a: plans[0].run.param.decode_set(*a, ctx.preprocessor.to_model)
  s1 = decode(init[subset == 0], labels[subset == 0], None)[0]
  assert len(source.stages) == 2
  np.testing.assert_array_equal(source.stages[0][0], s1)
  np.testing.assert_array_equal(source.stages[1][0][:len(s1)], s1)  # S_1 kept
  assert len(source.stages[1][0]) == 2 * len(s1)
  a, b, c = (source.sample(i, 1) for i in (0, 1, 2))
  same = lambda u, v: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(u),
                                                               jax.tree.leaves(v)))
  assert same(a['net'], b['net']) and not same(a['net'], c['net'])  # fix_iter 2
  assert not same(a['real'], b['real'])  # the walk goes on every iteration
  source.__init__(backbone, ctx, plans[2], done)  # a resumed run
  assert same(source.sample(1, 1), b)
  # And the staged evaluation of the final set has S_1 in stage 3.
  stages = evaluate.stage_sets(*decode(init, labels, subset))
  np.testing.assert_array_equal(stages[2][0][:len(s1)], s1)


@pytest.mark.starts_first
def test_distill_all_freezes_subsets_decodes_and_resumes_bitwise(tmp_path):
  config = _config(k=2)
  full = seqmatch.distill_all(_ctx(tmp_path / 'a', config), config)
  # 2 stored images per class -> 8 decoded per class, subset 1 first.
  assert full.images.shape == (80, 8, 8, 1) and full.stored.shape == (20, 8, 8, 1)
  assert full.subset.tolist() == [0] * 40 + [1] * 40
  with np.load(tmp_path / 'a' / 'subsets' / 'subset_1.npz') as f:
    np.testing.assert_array_equal(full.stored[:10], f['images_model'])
  assert full.stored.min() >= 0 and full.stored.max() <= 1
  calls = {'n': 0}

  def stop_at_three():
    calls['n'] += 1
    return calls['n'] > 3
  ctx = _ctx(tmp_path / 'b', config)
  ctx.should_stop = stop_at_three
  with pytest.raises(Interrupted):
    seqmatch.distill_all(ctx, config)
  ctx.should_stop = lambda: False
  again = seqmatch.distill_all(ctx, config)
  np.testing.assert_array_equal(again.stored, full.stored)
  np.testing.assert_array_equal(again.images, full.images)


def test_config_rows_and_checks():
  c = helpers.config('digits', 'ipc=10,backbone=idc')
  assert c.backbone.name == 'idc' and c.seqmatch.num_subsets == 2
  paper = helpers.config('cifar10', 'ipc=50,backbone=idc')
  official = helpers.config('cifar10', 'ipc=50,backbone=idc,k=2')
  assert paper.seqmatch.num_subsets == 3 and not paper.dataset.zca
  assert official.idc.per_subset.inner_loop == (50, 100)
  assert official.idc.per_subset.iterations == (4000, 4000)
  from seqmatch_jax import configuration
  for c in (paper, official):
    configuration.validate(c)
  bad = helpers.config('cifar10', 'ipc=50')
  bad.backbone.name = 'idc'
  with pytest.raises(ConfigError, match='backbone=idc'):
    configuration.validate(bad)
  for key, value, match in [('batch_real', 0, 'positive'), ('metric', 'l2', 'mse|l1|cos'),
                            ('mix_p', 2.0, r'\[0, 1\]'), ('aug_net', 'blur', 'blur'),
                            ('inner_loop', 0, 'inner_loop')]:
    c = helpers.config('digits', 'backbone=idc')
    c.idc[key] = value
    with pytest.raises(ConfigError, match=match):
      configuration.validate(c)
  # lr_img tuned with the subset's ipc: 5e-3 x 25 / 10 at C10 ipc 50 (K=2).
  backbone = backbones.create(official, helpers.tiny_convnet(
      image_shape=(32, 32, 3)))
  plan = seqmatch.subset_plans(official)[0]
  assert backbone.image_lr(plan) == pytest.approx(0.0125)


def test_real_batches_walk_each_class_without_replacement():
  """IDC's ClassBatchSampler: batches of min(class size, batch) in a shuffled
  order, no image twice in a pass, the incomplete last batch dropped, a new
  order each pass; a fresh walk (a resumed run) gives the same batches."""
  y = np.asarray([0] * 10 + [1] * 3)
  walk = idc.ClassWalk(y, 2, 4, (0, 500))
  out = walk.batches(0, 6, t=0)
  assert out['rows'].shape == (6, 2, 4)
  first_pass = out['rows'][:2, 0].reshape(-1)  # class 0: 2 batches of 4 per pass
  assert len(set(first_pass.tolist())) == 8 and set(first_pass) <= set(range(10))
  assert not np.array_equal(out['rows'][2:4, 0].reshape(-1), first_pass)  # reshuffled
  np.testing.assert_array_equal(out['mask'][:, 1], np.tile([1, 1, 1, 0], (6, 1)))
  assert {tuple(sorted(r[:3])) for r in out['rows'][:, 1]} == {(10, 11, 12)}
  again = idc.ClassWalk(y, 2, 4, (0, 500)).batches(3, 3, t=0)
  np.testing.assert_array_equal(again['rows'], out['rows'][3:])
  other = idc.ClassWalk(y, 2, 4, (0, 500)).batches(0, 6, t=1)
  assert not np.array_equal(other['rows'][:, 0], out['rows'][:, 0])
