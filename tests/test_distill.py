"""The distillation loop: it learns, it resumes bit for bit, it stops cleanly
on divergence."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmatch_jax import distill, experts, matching
from seqmatch_jax.backbones import Layout, mtt
from seqmatch_jax.errors import Diverged, Interrupted
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


def _plan(augment='flip', **kw):
  base = dict(iterations=12, syn_steps=4, expert_epochs=2, max_start_epoch=2,
              lr_teacher=0.05, lr_img=10.0, lr_lr=1e-5, batch_syn=0)
  base.update(kw)
  return helpers.mtt_plan(helpers.tiny_convnet(), augment, **base)


def _run(store, ckpt, plan, trajectories_per_step=0, eval_every=0, **kw):
  backbone, plan = plan
  x, y = helpers.digits_model_space()[:2]
  labels = jnp.repeat(jnp.arange(10), plan.ipc)
  init = jnp.concatenate([x[np.flatnonzero(np.asarray(y) == c)[:plan.ipc]]
                          for c in range(10)])
  options = distill.LoopOptions(ckpt_dir=str(ckpt), seed=0, checkpoint_every=5,
                                trajectories_per_step=trajectories_per_step,
                                eval_every=eval_every, progress=False)
  source = mtt.ExpertWindows(store, plan, seed=0)
  trainable, optimizers = backbone.init(plan, source, init, labels)
  layout = Layout(np.asarray(labels), np.zeros(len(labels), np.int32), 10)
  state = distill.distill_subset(
      backbone, plan, source, trainable=trainable, optimizers=optimizers,
      frozen=dict(images=x[:0], labels=labels[:0]), layout=layout,
      key=jax.random.key(3), options=options, **kw)
  return state, init, labels


def test_matching_loss_falls(store, tmp_path):
  plan = _plan('', iterations=25, max_start_epoch=1, lr_img=30.0)
  state, init, labels = _run(store, tmp_path, plan)
  start, target = store.load(0, 0), store.load(0, 2)
  loss = lambda imgs, lr: float(matching.trajectory_loss(
      imgs, lr, init[:0], labels, start, target, jax.random.key(9),
      network=helpers.tiny_convnet(), num_steps=plan[1].syn_steps, batch_size=20,
      augment='', remat=True))
  t = state.trainable
  assert loss(t['images'], t['extras']['syn_lr']) < 0.95 * loss(init, jnp.float32(0.05))


def test_kill_and_resume_is_bitwise_identical(store, tmp_path):
  full, _, _ = _run(store, tmp_path / 'a', _plan())
  calls = {'n': 0}

  def stop_at_seven():
    calls['n'] += 1
    return calls['n'] > 7
  with pytest.raises(Interrupted):
    _run(store, tmp_path / 'b', _plan(), should_stop=stop_at_seven)
  resumed, _, _ = _run(store, tmp_path / 'b', _plan())
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def _val_evaluator(should_stop=None):
  """The in-run validation evaluation (as seqmatch._val_evaluator builds it),
  two models one by one, polling `should_stop` before each."""
  from seqmatch_jax import evaluate, pipeline  # pylint: disable=g-import-not-at-top
  c = helpers.config('digits')
  c.model.width = 8
  c.augment.strategy = 'flip'
  c.eval.parallel = 'sequential'
  xt, yt = helpers.digits_model_space()[2:4]

  network = pipeline.network_for(c, 'convnet', 10, (8, 8, 1))
  protocol = dataclasses.replace(evaluate.protocol_from_config(c), epochs=2)

  def evaluate_fn(images, labels, lr, it):
    r = evaluate.evaluate_synthetic(
        images, labels, lr, network, protocol,
        jax.random.fold_in(jax.random.key(5), it), x_eval=xt[:200],
        y_eval=yt[:200], num_models=2, should_stop=should_stop)
    return r['mean'] / 100.0
  return evaluate_fn


def test_stop_during_in_run_evaluation_resumes_bitwise(store, tmp_path):
  """A stop that lands in the validation evaluation of iteration 6 abandons
  it, saves the state of iteration 6 and raises; the rerun redoes that
  evaluation and ends bit for bit where an uninterrupted run does."""
  plan = _plan(iterations=9)
  full, _, _ = _run(store, tmp_path / 'a', plan, eval_every=3,
                    evaluate_fn=_val_evaluator())
  calls = {'n': 0}

  def stop_in_second_evaluation():  # 2 checks at iteration 3, then 1 model at 6
    calls['n'] += 1
    return calls['n'] > 3
  with pytest.raises(Interrupted, match='iteration 6 .*validation evaluation'):
    _run(store, tmp_path / 'b', plan, eval_every=3,
         evaluate_fn=_val_evaluator(stop_in_second_evaluation))
  assert calls['n'] == 4
  assert max(int(d) for d in os.listdir(tmp_path / 'b') if d.isdigit()) == 6
  resumed, _, _ = _run(store, tmp_path / 'b', plan, eval_every=3,
                       evaluate_fn=_val_evaluator())
  assert float(full.best_score) >= 0
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def test_divergence_stops_with_a_clear_message(store, tmp_path):
  with pytest.raises(Diverged, match=r'iteration \d+.*lr_img') as err:
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
  full, _, _ = _run(store, tmp_path / 'a', plan, mesh=four)
  calls = {'n': 0}

  def stop_at_two():
    calls['n'] += 1
    return calls['n'] > 2
  with pytest.raises(Interrupted):
    _run(store, tmp_path / 'b', plan, mesh=four, should_stop=stop_at_two)
  with pytest.raises(UserError, match='trajectories_per_step=4'):
    _run(store, tmp_path / 'b', plan, mesh=two)
  resumed, _, _ = _run(store, tmp_path / 'b', plan, mesh=two,
                       trajectories_per_step=4)
  assert int(resumed.iteration) == 4
  np.testing.assert_allclose(parallel.fetch(resumed.trainable['images']),
                             parallel.fetch(full.trainable['images']), rtol=1e-5,
                             atol=1e-6)
