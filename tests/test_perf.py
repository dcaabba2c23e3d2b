"""Issue 17: fast paths pinned against the plain ones; the benchmark harness
runs (our side without torch; the torch side only where $TORCH_PYTHON has it)."""

import functools
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmatch_jax import augment as augment_lib
from seqmatch_jax import training
from seqmatch_jax.models import create_network

_DSA = 'color_crop_cutout_flip_scale_rotate'


def _padded_epoch_step(net, spec, params, state, images, labels, key, lr):
  """run_epoch's one step computed on the whole padded batch (the plain path)."""
  tx = spec.transform()
  perm_key, aug_key = jax.random.split(key)
  idx, mask = training.batch_schedule(perm_key, images.shape[0], spec.batch_size)
  k = jax.random.split(aug_key, idx.shape[0])[0]
  x = augment_lib.augment(k, images[idx[0]], spec.augment,
                          augment_lib.DSAParams(align_corners=spec.align_corners))
  (loss, _), grads = jax.value_and_grad(
      functools.partial(training.masked_loss, net), has_aux=True)(
          params, state, x, labels[idx[0]], mask[0])
  updates, _ = tx.update(grads, tx.init(params), params)
  return jax.tree.map(lambda p, u: p - lr * u, params, updates), loss


@pytest.mark.parametrize('norm', ['instance', 'none'])
def test_short_batch_trim_matches_padded_batch(norm):
  """Fewer images than a batch: computing only the real rows gives the padded
  batch's loss and update to float32 rounding (same DSA draws)."""
  net = create_network('convnet', 10, (8, 8, 3), width=8, depth=2, norm=norm)
  params, state = net.init(jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (20, 8, 8, 3))
  labels = jnp.arange(20) % 10
  spec = training.SGDSpec(batch_size=64, momentum=0.9, weight_decay=5e-4,
                          augment=_DSA, trim_short_batch=True)
  key, lr = jax.random.key(3), jnp.float32(0.1)
  got, _, _, loss = jax.jit(lambda p: training.run_epoch(
      net, spec, p, state, spec.transform().init(p), images, labels, key, lr))(params)
  want, want_loss = _padded_epoch_step(net, spec, params, state, images, labels,
                                       key, lr)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_vs_reference_runs_our_side_without_torch(tmp_path):
  from benchmarks import vs_reference  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'vs')
  rows = vs_reference.main(['--quick', '--no_torch', '--width=8', '--steps=1',
                            '--phases=step,eval', '--eval_epochs=2', '--out', out])
  assert [r['phase'] for r in rows] == ['step', 'eval']
  for r in rows:
    assert r['ours_s'] > 0 and r['ours_rss_mib'] > 0, r
    assert r['ref_s'] is None and 'reference skipped' in r['note']
  with open(out + '.json') as f:
    assert len(json.load(f)['rows']) == 2
  assert os.path.exists(out + '.md')


def _torch_python() -> str:
  py = os.environ.get('TORCH_PYTHON', '')
  if not py or subprocess.run([py, '-c', 'import torch'],
                              capture_output=True).returncode:
    return ''
  return py


@pytest.mark.skipif(not _torch_python(), reason='no $TORCH_PYTHON with torch')
def test_vs_reference_torch_side(tmp_path):
  from benchmarks import vs_reference  # pylint: disable=g-import-not-at-top
  if not os.path.exists(vs_reference.parse([]).step_script):
    pytest.skip('no torch_mtt_step.py (set $TORCH_STEP_SCRIPT)')
  rows = vs_reference.main(['--quick', '--steps=1', '--phases=step',
                            '--torch_python', _torch_python(),
                            '--out', str(tmp_path / 'vs')])
  assert rows[0]['ref_s'] > 0 and rows[0]['ratio'] > 0, rows
