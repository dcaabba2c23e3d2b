"""The distillation loop: it learns, it resumes bit for bit, it stops cleanly
on divergence."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmatch_jax import distill, experts, matching
from tests import helpers

META = dict(dataset='digits', image_shape=[8, 8, 1], num_classes=10, zca=False,
            seed=0, start='init', model=dict(name='convnet', width=8))


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  spec = experts.ExpertSpec(num=2, epochs=4, lr=0.05, momentum=0.0,
                            batch_size=256, augment='', per_batch=1)
  return experts.train_experts(helpers.tiny_convnet(), spec,
                               str(tmp_path_factory.mktemp('exp')), x, y, xt, yt,
                               jax.random.key(0), META)


def _plan(**kw):
  base = dict(index=0, ipc=2, iterations=12, syn_steps=4, expert_epochs=2,
              max_start_epoch=2, lr_teacher=0.05, lr_img=10.0, lr_lr=1e-5,
              batch_syn=0)
  base.update(kw)
  return distill.SubsetPlan(**base)


def _run(store, ckpt, plan, augment='flip', **kw):
  x, y = helpers.digits_model_space()[:2]
  labels = jnp.repeat(jnp.arange(10), plan.ipc)
  init = jnp.concatenate([x[np.flatnonzero(np.asarray(y) == c)[:plan.ipc]]
                          for c in range(10)])
  args = dict(network=helpers.tiny_convnet(), plan=plan, store=store,
              init_images=init, labels=labels, frozen=x[:0],
              frozen_labels=labels[:0], key=jax.random.key(3), seed=0,
              ckpt_dir=str(ckpt), augment=augment, remat=True,
              checkpoint_every=5, eval_every=0, evaluate_fn=None, progress=False)
  args.update(kw)
  return distill.distill_subset(**args), init, labels


def test_matching_loss_falls(store, tmp_path):
  plan = _plan(iterations=25, max_start_epoch=1, lr_img=30.0)
  state, init, labels = _run(store, tmp_path, plan, augment='')
  start, target = store.load(0, 0), store.load(0, 2)
  loss = lambda imgs, lr: float(matching.trajectory_loss(
      imgs, lr, init[:0], labels, start, target, jax.random.key(9),
      network=helpers.tiny_convnet(), num_steps=plan.syn_steps, batch_size=20,
      augment='', remat=True))
  assert loss(state.images, state.syn_lr) < 0.95 * loss(init, jnp.float32(0.05))


def test_kill_and_resume_is_bitwise_identical(store, tmp_path):
  full, _, _ = _run(store, tmp_path / 'a', _plan())
  calls = {'n': 0}

  def stop_at_seven():
    calls['n'] += 1
    return calls['n'] > 7
  with pytest.raises(distill.Interrupted):
    _run(store, tmp_path / 'b', _plan(), should_stop=stop_at_seven)
  resumed, _, _ = _run(store, tmp_path / 'b', _plan())
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_divergence_stops_with_a_clear_message(store, tmp_path):
  with pytest.raises(distill.Diverged, match=r'iteration \d+.*lr_img') as err:
    _run(store, tmp_path, _plan(lr_img=1e30, iterations=30))
  last = str(err.value).split('checkpoint: ')[1].split(' ')[0]
  if last != 'none':
    assert os.path.isdir(last)


@pytest.mark.skipif(jax.device_count() < 4, reason='needs 4 devices')
def test_resume_on_another_device_count_keeps_the_trajectory_count(store, tmp_path):
  """Killed on 4 devices (4 trajectories per step), resumed on 2: refused
  with the fix named while that would change the count, and equal to the
  uninterrupted run once the count is kept."""
  from seqmatch_jax import parallel
  from seqmatch_jax.errors import UserError
  plan = _plan(iterations=4)
  four, two = parallel.make_mesh(4), parallel.make_mesh(2)
  full, _, _ = _run(store, tmp_path / 'a', plan, mesh=four, checkpoint_every=1)
  calls = {'n': 0}

  def stop_at_two():
    calls['n'] += 1
    return calls['n'] > 2
  with pytest.raises(distill.Interrupted):
    _run(store, tmp_path / 'b', plan, mesh=four, should_stop=stop_at_two)
  with pytest.raises(UserError, match='trajectories_per_step=4'):
    _run(store, tmp_path / 'b', plan, mesh=two)
  resumed, _, _ = _run(store, tmp_path / 'b', plan, mesh=two,
                       trajectories_per_step=4)
  assert int(resumed.iteration) == 4
  np.testing.assert_allclose(parallel.fetch(resumed.images),
                             parallel.fetch(full.images), rtol=1e-5, atol=1e-6)
