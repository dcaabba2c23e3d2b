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


def _short_batch_epoch(norm: str, trim: bool = True):
  """One run_epoch of a width-8 ConvNet on 20 images with batch 64 (a short
  batch): (net, spec, params, state, images, labels, key, lr, its outputs)."""
  net = create_network('convnet', 10, (8, 8, 3), width=8, depth=2, norm=norm)
  params, state = net.init(jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (20, 8, 8, 3))
  labels = jnp.arange(20) % 10
  spec = training.SGDSpec(batch_size=64, momentum=0.9, weight_decay=5e-4,
                          augment=_DSA, trim_short_batch=trim)
  key, lr = jax.random.key(3), jnp.float32(0.1)
  out = jax.jit(lambda p: training.run_epoch(
      net, spec, p, state, spec.transform().init(p), images, labels, key, lr))(params)
  return net, spec, params, state, images, labels, key, lr, out


@pytest.mark.parametrize('norm', ['instance', 'none'])
def test_short_batch_trim_matches_padded_batch(norm):
  """Fewer images than a batch: computing only the real rows gives the padded
  batch's loss and update to float32 rounding (same DSA draws)."""
  net, spec, params, state, images, labels, key, lr, out = _short_batch_epoch(norm)
  got, _, _, loss = out
  want, want_loss = _padded_epoch_step(net, spec, params, state, images, labels,
                                       key, lr)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_short_batch_trim_gives_batchnorm_the_real_rows_only():
  """A BatchNorm net on fewer images than a batch: the trimmed step is the
  step on the n real rows alone (PyTorch's short batch): its batch statistics
  and running averages leave the padding out."""
  net, spec, params, state, images, labels, key, lr, out = _short_batch_epoch('batch')
  got, got_state, _, loss = out
  tx = spec.transform()
  perm_key, aug_key = jax.random.split(key)
  idx, _ = training.batch_schedule(perm_key, 20, 64)
  k = jax.random.split(aug_key, idx.shape[0])[0]
  x = augment_lib.augment(k, images[idx[0]], _DSA, augment_lib.DSAParams())[:20]
  (want_loss, want_state), grads = jax.value_and_grad(
      functools.partial(training.masked_loss, net), has_aux=True)(
          params, state, x, labels[idx[0][:20]], jnp.ones(20))
  updates, _ = tx.update(grads, tx.init(params), params)
  want = jax.tree.map(lambda p, u: p - lr * u, params, updates)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for g, w in zip(jax.tree.leaves((got, got_state)), jax.tree.leaves((want, want_state))):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # The padded computation's statistics differ (padding counted in them).
  pad_state = _short_batch_epoch('batch', trim=False)[-1][1]
  assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(pad_state),
                                                   jax.tree.leaves(got_state)))


@pytest.mark.starts_first
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


def test_kernel_floor_counts_each_kernel_times_its_loops():
  """The floor's kernel list: every convolution and dot of the compiled
  program, multiplied by the trip counts of the (nested) loops around it."""
  from jax import lax  # pylint: disable=g-import-not-at-top
  from benchmarks import kernel_floor  # pylint: disable=g-import-not-at-top

  def inner(x, w, m):
    def body(c, _):
      y = lax.conv_general_dilated(c, w, (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      return jnp.tanh(y), None
    x, _ = lax.scan(body, x, None, length=5)
    return x, jnp.tanh(m @ m)

  def outer(x, w, m):
    def body(c, _):
      return inner(c[0], w, c[1]), None
    (x, m), _ = lax.scan(body, (x, m), None, length=3)
    return x.sum() + m.sum()

  x = jnp.ones((2, 6, 6, 4))
  w = jnp.ones((3, 3, 4, 4)) * 0.01
  m = jnp.ones((7, 7)) * 0.1
  text = jax.jit(outer).lower(x, w, m).compile().as_text()
  found = kernel_floor.kernels(text)
  convs = {k: n for k, n in found.items() if k[0] == 'conv'}
  dots = {k: n for k, n in found.items() if k[0] == 'dot'}
  assert list(convs.values()) == [15], found  # 3 outer x 5 inner
  assert list(convs)[0][1:3] == ((2, 6, 6, 4), (3, 3, 4, 4))
  assert list(dots.values()) == [3], found
  # Each supported kernel rebuilds as a standalone op of the right shape.
  for (kind, lhs, rhs, attrs) in found:
    op = kernel_floor.build_op(kind, attrs)
    assert op is not None
    out = op(jnp.ones(lhs), jnp.ones(rhs))
    assert out.ndim == (4 if kind == 'conv' else 2)


def test_profile_compare_cores_finds_single_threaded_thunks():
  """A thunk as slow on two cores as on one is counted as single-threaded;
  the all-parallel bound is half the one-core thunk time."""
  from benchmarks import profile_step  # pylint: disable=g-import-not-at-top
  two = dict(per_op_ms={'conv.a': ['conv', 76.0], 'conv.b': ['conv', 38.0],
                        'norm.c': ['norm', 10.0], 'gone.d': ['other', 5.0]})
  one = dict(wall_s=[2.0, 2.2], thunk_s=0.2,
             per_op_ms={'conv.a': ['conv', 75.0], 'conv.b': ['conv', 76.0],
                        'norm.c': ['norm', 11.0]})
  r = profile_step.compare_cores(two, one)
  assert r['serial_thunk_s'] == 0.086  # conv.a (0.99x) and norm.c (1.1x)
  assert r['all_parallel_bound_s'] == 0.1
  assert r['one_core_wall_s'] == 2.1
  assert [row[0] for row in r['rows']] == ['conv.a', 'conv.b', 'norm.c']
  assert r['rows'][1][4] == 2.0
  assert r['unmatched'] == 1  # gone.d


@pytest.mark.parametrize('program', ['expert', 'eval'])
def test_profile_builds_the_first_order_programs(program):
  """`profile_step --program=expert|eval` compiles a program whose last
  argument is the key the profiler replaces."""
  from benchmarks import profile_step  # pylint: disable=g-import-not-at-top
  compiled, args = profile_step._build(
      (16, 16, 1), 2, 1, width=8, augment='flip', program=program, images=32)
  out = jax.block_until_ready(compiled(*args[:-1], jax.random.key(7)))
  assert all(np.isfinite(np.asarray(leaf)).all()
             for leaf in jax.tree.leaves(out))


def test_release_freed_memory_runs_where_glibc_is():
  from seqmatch_jax import hostmem  # pylint: disable=g-import-not-at-top
  done = hostmem.release_freed_memory()
  assert isinstance(done, bool)
  if os.path.exists('/lib/x86_64-linux-gnu/libc.so.6'):
    assert done
