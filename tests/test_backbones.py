"""Backbones behind one interface: MTT pinned to its pre-interface behaviour;
DM, DC and DSA losses against direct computations, finite differences, frozen
subsets and resume."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from seqmatch_jax import backbones, config_lib, distill, pipeline
from tests import helpers

PIN = os.path.join(os.path.dirname(__file__), 'data', 'mtt_pin.npz')


def _assert_pinned(actual, expected, same_jax: bool):
  """Bitwise on the JAX version the pin was recorded with; within float32
  rounding on another (XLA may reorder sums across versions)."""
  if same_jax:
    np.testing.assert_array_equal(actual, expected)
  else:
    np.testing.assert_allclose(actual, expected, rtol=2e-4, atol=1e-6)


@pytest.fixture(scope='module')
def pin():
  with np.load(PIN) as f:
    data = {k: f[k] for k in f.files}
  data['same_jax'] = str(data['jax_version']) == jax.__version__
  return data


def _mtt_pin_inputs():
  net = helpers.tiny_convnet(width=8, depth=2)
  params, _ = net.init(jax.random.key(0))
  target = jax.tree.map(lambda p: p * 1.05 + 0.01, params)
  frozen = jax.random.normal(jax.random.key(1), (10, 8, 8, 1))
  mine = jax.random.normal(jax.random.key(2), (20, 8, 8, 1))
  labels = jnp.concatenate([jnp.arange(10), jnp.repeat(jnp.arange(10), 2)])
  return net, params, target, frozen, mine, labels


def test_mtt_step_is_pinned(pin):
  """Two generic steps of the MTT backbone equal the pre-interface MTT step
  (recorded from commit 95dfd41 on the same inputs)."""
  net, params, target, frozen, mine, labels = _mtt_pin_inputs()
  config = digits.get_config()
  config.augment.strategy = 'color_crop_cutout_flip_scale_rotate'
  backbone = backbones.create(config, net)
  plan = backbones.SubsetPlan(
      index=1, ipc=2, ipc_before=1, iterations=2, lr_img=100.0,
      settings=dict(config.mtt.to_dict(), syn_steps=5, expert_epochs=2,
                    max_start_epoch=2, lr_teacher=0.02, lr_lr=1e-3, batch_syn=10))
  for name in ('iterations', 'lr_img', 'per_subset'):
    plan.settings.pop(name)
  step = distill.make_distill_step(backbone, plan, trajectories=2)
  state = distill.init_state(backbone, plan, mine, jax.random.key(5))
  stack = lambda t: jax.tree.map(lambda *x: jnp.stack(x), *t)
  for i in range(2):
    windows = (stack([params, target]),
               stack([target, jax.tree.map(lambda p: p * 0.9, params)]))
    state, metrics = step(state, frozen, labels, windows, None)
    _assert_pinned(np.asarray(metrics['loss']), pin[f'step{i}_loss'], pin['same_jax'])
  _assert_pinned(np.asarray(state.images), pin['step_images'], pin['same_jax'])
  _assert_pinned(np.asarray(state.extras['syn_lr']), pin['step_syn_lr'],
                 pin['same_jax'])


def _pin_run_config():
  c = digits.get_config('ipc=2')
  config_lib.apply_settings(c, {
      'model.width': 8, 'experts.num': 2, 'experts.epochs': 3,
      'experts.staged_epochs': 3, 'mtt.syn_steps': 4, 'mtt.expert_epochs': 1,
      'mtt.max_start_epoch': 2, 'mtt.iterations': 6, 'distill.eval_every': 3,
      'distill.eval_epochs': 3, 'distill.checkpoint_every': 2,
      'mtt.per_subset.iterations': (3, 3), 'mtt.per_subset.max_start_epoch': (2, 1),
      'mtt.per_subset.lr_img': (1000.0, 100.0), 'eval.epochs': 3,
      'eval.num_models': 1, 'eval.baselines': (), 'dataset.val_size': 50,
      'parallel.num_devices': 1, 'mode': 'all', 'seqmatch.num_subsets': 2,
      'seqmatch.compare_backbone': True})
  return c


def test_mtt_run_is_pinned(pin, tmp_path):
  """A tiny digits run (experts, SeqMatch-MTT K=2 with in-run validation, the
  plain-MTT comparison, evaluation) ends with the synthetic sets, learned
  step sizes and accuracies recorded before the interface existed."""
  results = pipeline.run(_pin_run_config(), str(tmp_path))
  for tag, prefix in (('', 'run'), ('mtt', 'runmtt')):
    with np.load(os.path.join(tmp_path, tag, 'synthetic.npz')) as f:
      for key in ('images', 'images_model', 'lr'):
        _assert_pinned(f[key], pin[f'{prefix}_{key}'], pin['same_jax'])
      for key in ('labels', 'subset'):
        np.testing.assert_array_equal(f[key], pin[f'{prefix}_{key}'])
  accs = str({n: r['convnet']['per_model'] for n, r in results['rows'].items()})
  if pin['same_jax']:
    assert accs == str(pin['results'])
