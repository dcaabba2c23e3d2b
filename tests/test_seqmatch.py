"""SeqMatch: subset arithmetic, frozen prefix, K=1 == plain MTT, staged experts."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmatch_jax import distill, evaluate, experts, matching, seqmatch
from seqmatch_jax import backbones
from seqmatch_jax.backbones import mtt
from seqmatch_jax.errors import ConfigError
from seqmatch_jax.parameterization import Parameterization
from tests import helpers


def test_subset_sizes():
  assert seqmatch.subset_sizes(50, 3) == [17, 17, 16]
  assert seqmatch.subset_sizes(10, 2) == [5, 5]
  assert seqmatch.subset_sizes(7, 3) == [3, 2, 2]
  assert seqmatch.subset_sizes(10, 2, (3, 7)) == [3, 7]
  with pytest.raises(ConfigError, match='exceeds ipc'):
    seqmatch.subset_sizes(2, 3)
  with pytest.raises(ConfigError, match='summing'):
    seqmatch.subset_sizes(10, 2, (3, 3))


def test_schedule_takes_per_subset_lists():
  c = helpers.config('digits')
  c.mtt.per_subset.syn_steps = (30, 80)
  plans = seqmatch.subset_plans(c)
  assert [p.syn_steps for p in plans] == [30, 80]
  assert [p.max_start_epoch for p in plans] == [8, 5]
  assert [p.ipc for p in plans] == [5, 5]
  c.mtt.per_subset.lr_teacher = (0.1, 0.2, 0.3)
  with pytest.raises(ConfigError, match='3 entries for 2 subsets'):
    seqmatch.subset_plans(c)


def test_layout_and_initial_images():
  labels, subset = seqmatch.subset_layout([2, 1], 3)
  assert labels.tolist() == [0, 0, 1, 1, 2, 2, 0, 1, 2]
  assert subset.tolist() == [0] * 6 + [1] * 3
  x, y = helpers.digits_model_space()[:2]
  init = seqmatch.initial_images(jax.random.key(0), x, y, [2, 1], 10, 'real',
                                 Parameterization())
  labels, _ = seqmatch.subset_layout([2, 1], 10)
  xs, ys = np.asarray(x), np.asarray(y)
  for img, lab in zip(init, labels):  # each image is a real one of its class
    match = np.flatnonzero(np.all(xs == img, axis=(1, 2, 3)))
    assert len(match) and ys[match[0]] == lab
  assert len({img.tobytes() for img in init}) == len(init)  # distinct


def test_gradient_wrt_frozen_subsets_is_exactly_zero():
  net = helpers.tiny_convnet(width=4, depth=1)
  params, _ = net.init(jax.random.key(0))
  target = jax.tree.map(lambda p: p * 1.1, params)
  frozen = jax.random.normal(jax.random.key(1), (10, 8, 8, 1))
  mine = jax.random.normal(jax.random.key(2), (10, 8, 8, 1))
  labels = jnp.tile(jnp.arange(10), 2)
  f = lambda fz, mn: matching.trajectory_loss(
      mn, jnp.float32(0.05), fz, labels, params, target, jax.random.key(3),
      network=net, num_steps=3, batch_size=10, augment='flip', remat=True)
  g_frozen, g_mine = jax.grad(f, argnums=(0, 1))(frozen, mine)
  assert np.all(np.asarray(g_frozen) == 0.0)
  assert np.abs(np.asarray(g_mine)).sum() > 0


def _ctx(tmp_path, config, key=0):
  x, y, xt, yt, xv, yv = helpers.digits_model_space()
  net = helpers.tiny_convnet()
  meta = dict(dataset='digits', image_shape=[8, 8, 1], num_classes=10, zca=False,
              seed=0, start='init', model=dict(name='convnet', width=8))
  exp_dir = os.path.join(str(tmp_path), 'experts')
  spec = experts.ExpertSpec(num=2, epochs=config.experts.epochs,
                            lr=config.experts.lr, momentum=0.0, batch_size=256,
                            augment='', per_batch=1)
  experts.train_experts(net, spec, exp_dir, x, y, xt, yt, jax.random.key(0), meta)
  return seqmatch.Context(workdir=str(tmp_path), network=net,
                          x_train=x, y_train=y, x_test=xt, y_test=yt, x_val=None,
                          y_val=None, num_classes=10, experts_dir=exp_dir,
                          expert_metadata=meta, key=jax.random.key(key),
                          progress=False)


def _tiny_config(k):
  c = helpers.config('digits', f'k={k}')
  c.ipc = 2
  c.augment.strategy = 'flip'
  c.experts.num = 2
  c.experts.epochs = 3
  c.experts.staged_epochs = 2
  c.experts.lr = 0.05
  c.mtt.iterations = 4
  c.mtt.syn_steps = 3
  c.mtt.expert_epochs = 1
  c.mtt.max_start_epoch = 2  # SeqMatch draws starts in [0, 2 - 1)
  c.mtt.lr_img = 10.0
  c.mtt.lr_teacher = 0.05
  c.distill.checkpoint_every = 2
  c.eval.epochs = 4
  c.mtt.per_subset.iterations = ()
  c.mtt.per_subset.max_start_epoch = ()
  return c


def test_k1_is_plain_mtt_bit_for_bit(tmp_path):
  c = _tiny_config(1)
  ctx = _ctx(tmp_path, c)
  syn = seqmatch.distill_all(ctx, c)
  plan = seqmatch.subset_plans(c)[0]
  labels, _ = seqmatch.subset_layout([2], 10)
  init = seqmatch.initial_images(jax.random.fold_in(ctx.key, 1), ctx.x_train,
                                 ctx.y_train, [2], 10, 'real', Parameterization())
  backbone = backbones.create(c, ctx.network)
  source = mtt.ExpertWindows(experts.TrajectoryStore(ctx.experts_dir), plan, c.seed)
  trainable, optimizers = backbone.init(plan, source, init, labels)
  state = distill.distill_subset(
      backbone, plan, source, trainable=trainable, optimizers=optimizers,
      frozen=dict(images=jnp.asarray(init[:0]), labels=jnp.asarray(labels[:0])),
      layout=backbones.Layout(labels, np.zeros(len(labels), np.int32), 10),
      key=jax.random.fold_in(ctx.key, 100),
      options=distill.LoopOptions(ckpt_dir=str(tmp_path / 'plain'), seed=c.seed,
                                  checkpoint_every=2, progress=False))
  np.testing.assert_array_equal(syn.images, np.asarray(state.trainable['images']))
  assert list(syn.lrs) == [float(state.trainable['extras']['syn_lr'])]


def test_two_subsets_freeze_the_first_and_use_staged_experts(tmp_path):
  c = _tiny_config(2)
  ctx = _ctx(tmp_path, c)
  syn = seqmatch.distill_all(ctx, c)
  assert syn.subset.tolist() == [0] * 10 + [1] * 10 and len(syn.lrs) == 2
  with np.load(tmp_path / 'subsets' / 'subset_1.npz') as f:
    first = f['images_model']
  np.testing.assert_array_equal(syn.images[:10], first)  # untouched by subset 2
  # Staged experts start from a network trained on S_1 with its learned lr.
  store = experts.TrajectoryStore(str(tmp_path / 'experts_staged' / 'subset_2'))
  assert store.epochs == 2 and store.experts() == [0, 1]
  protocol = evaluate.protocol_from_config(c)
  stages = evaluate.stage_sets(first, syn.labels[:10], syn.subset[:10])
  init_fn = mtt.staged_init_fn(ctx.network, protocol, stages, syn.lrs[:1])
  key = experts._init_key(jax.random.fold_in(ctx.key, 201), 1)
  expected, _ = init_fn(1, key)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(store.load(1, 0))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  fresh, _ = ctx.network.init(key)
  assert not np.allclose(jax.tree.leaves(fresh)[0], jax.tree.leaves(expected)[0])
  # Rerunning resumes from the finished subsets without recomputing.
  again = seqmatch.distill_all(ctx, c)
  np.testing.assert_array_equal(again.images, syn.images)
