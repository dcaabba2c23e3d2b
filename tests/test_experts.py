"""Expert trajectories: layout, learning, batched == sequential, resume,
window loads, damaged snapshots."""

import os

import jax
import numpy as np
import pytest

from seqmatch_jax import experts
from seqmatch_jax.errors import CheckpointError
from tests import helpers

META = dict(dataset='digits', image_shape=[8, 8, 1], num_classes=10, zca=False,
            seed=0, start='init', model=dict(name='convnet', width=8))


def _spec(num=2, epochs=3, per_batch=1):
  return experts.ExpertSpec(num=num, epochs=epochs, lr=0.05, momentum=0.0,
                            batch_size=256, augment='', per_batch=per_batch)


def _train(path, spec, **kw):
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  return experts.train_experts(helpers.tiny_convnet(), spec, str(path), x, y, xt,
                               yt, jax.random.key(0), META, **kw)


def _trajectory(store, i):
  return [store.load(i, e) for e in range(store.epochs + 1)]


def _assert_same(a, b, exact=True):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if exact:
      np.testing.assert_array_equal(x, y)
    else:
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  path = tmp_path_factory.mktemp('experts')
  return path, _train(path, _spec())


def test_snapshots_shapes_and_learning(trained):
  _, store = trained
  assert store.experts() == [0, 1]
  net = helpers.tiny_convnet()
  ref = net.init(jax.random.key(1))[0]
  for i in store.experts():
    traj = _trajectory(store, i)
    assert len(traj) == 4
    assert jax.tree.map(np.shape, traj[0]) == jax.tree.map(np.shape, ref)
    assert not np.array_equal(jax.tree.leaves(traj[0])[0], jax.tree.leaves(traj[3])[0])
    acc = store.test_accuracy(i)
    assert acc[3] > acc[1] and acc[3] > 0.3  # chance is 0.1
    loss = {int(k): v['loss'] for k, v in store.progress(i)['snapshots'].items()
            if 'loss' in v}
    assert loss[3] < loss[1]


def test_batched_equals_sequential(trained, tmp_path):
  _, store = trained
  batched = _train(tmp_path, _spec(per_batch=2))
  for i in (0, 1):
    _assert_same(_trajectory(store, i), _trajectory(batched, i), exact=False)


def test_resume_equals_uninterrupted(trained, tmp_path):
  _, store = trained
  calls = {'n': 0}

  def stop_after_two_epochs():
    calls['n'] += 1
    return calls['n'] > 2
  partial = _train(tmp_path, _spec(), should_stop=stop_after_two_epochs)
  assert partial.experts() == []
  resumed = _train(tmp_path, _spec())
  for i in (0, 1):
    _assert_same(_trajectory(store, i), _trajectory(resumed, i))


def test_window_load_touches_only_requested_snapshots(trained, monkeypatch):
  _, store = trained
  fresh = experts.TrajectoryStore(store.path)
  seen = []
  original = np.load

  def spy(path, *a, **k):
    seen.append(os.path.basename(path))
    return original(path, *a, **k)
  monkeypatch.setattr(np, 'load', spy)
  fresh.load(1, 1)
  fresh.load(1, 3)
  assert seen == ['epoch_0001.npz', 'epoch_0003.npz']


@pytest.mark.parametrize('damage', ['truncate', 'flip', 'delete'])
def test_damaged_snapshot_is_detected_and_recomputed(trained, tmp_path, damage):
  _, store = trained
  import shutil
  copy = tmp_path / 'copy'
  shutil.copytree(store.path, copy)
  snap = copy / 'expert_0001' / 'epoch_0002.npz'
  if damage == 'truncate':
    with open(snap, 'r+b') as f:
      f.truncate(os.path.getsize(snap) // 2)
  elif damage == 'flip':  # same size, different bytes: only the CRC sees it
    raw = bytearray(snap.read_bytes())
    with np.load(snap) as f:
      first = f[f.files[0]]
    at = bytes(raw).index(first.tobytes()[:8])
    raw[at] ^= 0xFF
    snap.write_bytes(bytes(raw))
  else:
    snap.unlink()
    orphan = copy / 'expert_0001' / 'epoch_0003.npz.999.tmp.npz'  # a killed write
    orphan.write_bytes(b'half')
  damaged = experts.TrajectoryStore(str(copy))
  with pytest.raises(CheckpointError, match='expert 1') as err:
    damaged.load(1, 2)
  assert 'delete that file' in str(err.value)
  if damage == 'flip':  # the size is intact: follow the message
    snap.unlink()
  repaired = _train(copy, _spec())
  _assert_same(_trajectory(store, 1), _trajectory(repaired, 1))
  assert not list((copy / 'expert_0001').glob('*.tmp.npz'))


def test_directory_of_another_format_is_refused(trained, tmp_path):
  import json
  import shutil
  copy = tmp_path / 'old'
  shutil.copytree(trained[0], copy)
  meta = json.load(open(copy / 'metadata.json'))
  meta['format'] = 1
  json.dump(meta, open(copy / 'metadata.json', 'w'))
  with pytest.raises(CheckpointError, match='format 1'):
    _train(copy, _spec())


def test_custom_start_and_metadata_mismatch(tmp_path):
  net = helpers.tiny_convnet()
  start = net.init(jax.random.key(42))
  store = _train(tmp_path, _spec(num=1, epochs=1), init_fn=lambda i, k: start)
  _assert_same(store.load(0, 0), start[0])
  with pytest.raises(CheckpointError, match='different settings'):
    _train(tmp_path, experts.ExpertSpec(num=1, epochs=2, lr=0.1, momentum=0.0,
                                        batch_size=256, augment='', per_batch=1))


@pytest.mark.parametrize('text', ['{"epochs": 3, ', '[1, 2]', '\xff'])
def test_damaged_metadata_names_file_and_fix(trained, tmp_path, text):
  import shutil
  copy = tmp_path / 'copy'
  shutil.copytree(trained[0], copy)
  (copy / 'metadata.json').write_text(text, encoding='latin-1')
  with pytest.raises(CheckpointError, match='metadata.json .*--config.mode=experts'):
    experts.TrajectoryStore(str(copy))
  with pytest.raises(CheckpointError, match='metadata.json .*delete it'):
    _train(copy, _spec())
  (copy / 'metadata.json').unlink()  # the fix: rerun mode=experts
  repaired = _train(copy, _spec())
  _assert_same(_trajectory(trained[1], 1), _trajectory(repaired, 1))


def test_metadata_without_epochs_is_damaged(tmp_path):
  (tmp_path / 'metadata.json').write_text('{"format": 2}')
  with pytest.raises(CheckpointError, match='metadata.json lacks epochs'):
    experts.TrajectoryStore(str(tmp_path))


def test_damaged_progress_is_an_error_until_retrained(trained, tmp_path):
  import shutil
  copy = tmp_path / 'copy'
  shutil.copytree(trained[0], copy)
  (copy / 'expert_0001' / 'progress.json').write_text('{"snapshots": {"0": ')
  store = experts.TrajectoryStore(str(copy))
  with pytest.raises(CheckpointError, match='progress.json is damaged.*expert 1'):
    store.experts()  # never silently one expert fewer
  repaired = _train(copy, _spec())
  assert repaired.experts() == [0, 1]
  _assert_same(_trajectory(trained[1], 1), _trajectory(repaired, 1))


def test_missing_store_is_a_clear_error(tmp_path):
  with pytest.raises(CheckpointError, match='mode=experts'):
    experts.TrajectoryStore(str(tmp_path / 'nothing'))


def test_momentum_state_is_saved_and_resumed(tmp_path):
  spec = experts.ExpertSpec(num=1, epochs=3, lr=0.05, momentum=0.5,
                            batch_size=256, augment='', per_batch=1)
  full = _train(tmp_path / 'full', spec)
  calls = {'n': 0}

  def stop_after_one():
    calls['n'] += 1
    return calls['n'] > 1
  _train(tmp_path / 'part', spec, should_stop=stop_after_one)
  resumed = _train(tmp_path / 'part', spec)
  _assert_same(_trajectory(full, 0), _trajectory(resumed, 0))
