"""Evaluation protocol: real signal on digits, vmap == one by one, staged
K=1 == plain, malformed files."""

import jax
import numpy as np
import pytest

from configs import digits
from seqmatch_jax import evaluate, synthetic
from seqmatch_jax.errors import DataError
from tests import helpers


def _config(**eval_kw):
  c = digits.get_config()
  c.model.width = 16
  c.model.depth = 2
  c.eval.num_models = 2
  c.eval.epochs = 60
  for k, v in eval_kw.items():
    c.eval[k] = v
  return c


def test_whole_digits_reaches_95_percent():
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  r = evaluate.evaluate_synthetic(x, y, 0.05, _config(), jax.random.key(0),
                                  x_eval=xt, y_eval=yt, num_classes=10,
                                  num_models=1, epochs=30)
  assert r['mean'] > 95.0


def test_random_real_is_far_above_chance():
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  xr, yr = evaluate.random_real(x, y, 10, 10, seed=0)
  assert np.bincount(np.asarray(yr)).tolist() == [10] * 10
  r = evaluate.evaluate_synthetic(xr, yr, 0.01, _config(), jax.random.key(0),
                                  x_eval=xt, y_eval=yt, num_classes=10)
  assert r['mean'] > 60.0 and len(r['per_model']) == 2


def test_vmap_equals_sequential_and_staged_k1_equals_plain():
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  xr, yr = evaluate.random_real(x, y, 3, 10, seed=1)
  run = lambda cfg, **kw: evaluate.evaluate_synthetic(
      xr, yr, 0.02, cfg, jax.random.key(7), x_eval=xt, y_eval=yt, num_classes=10,
      epochs=20, **kw)
  seq = run(_config(parallel='sequential'))
  vm = run(_config(parallel='vmap'))
  np.testing.assert_allclose(seq['per_model'], vm['per_model'], atol=0.5)
  staged = run(_config(parallel='sequential'), subset=np.zeros(len(yr), np.int32))
  assert staged['per_model'] == seq['per_model']


def test_staged_reports_each_stage():
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  xr, yr = evaluate.random_real(x, y, 4, 10, seed=2)
  subset = np.repeat([0, 1], 20)
  order = np.argsort(np.tile(np.repeat([0, 1], 2), 10), kind='stable')
  r = evaluate.evaluate_synthetic(
      np.asarray(xr)[order], np.asarray(yr)[order], [0.02, 0.01], _config(),
      jax.random.key(0), x_eval=xt, y_eval=yt, num_classes=10, subset=subset,
      epochs=20)
  assert len(r['stages']) == 2 and r['stages'][-1]['mean'] == r['mean']
  assert r['lr'] == pytest.approx([0.02, 0.01])


@pytest.mark.parametrize('bad, match', [
    (dict(images=np.zeros((4, 8, 8, 3)), labels=np.zeros(4, int)), 'shape'),
    (dict(images=np.zeros((4, 8, 8, 1)), labels=np.array([0, 1, 2, 10])), 'lie in'),
    (dict(images=np.full((2, 8, 8, 1), np.nan), labels=np.zeros(2, int)), 'NaN'),
    (dict(images=np.zeros((2, 8, 8, 1)), labels=np.zeros(2)), 'integers'),
    (dict(labels=np.zeros(2, int)), "lacks 'images'"),
])
def test_malformed_npz(tmp_path, bad, match):
  path = tmp_path / 'bad.npz'
  np.savez(path, **bad)
  with pytest.raises(DataError, match=match):
    synthetic.load(str(path), 10, (8, 8, 1))


def test_not_an_npz(tmp_path):
  path = tmp_path / 'x.npz'
  path.write_text('hello')
  with pytest.raises(DataError, match='not a readable'):
    synthetic.load(str(path), 10, (8, 8, 1))


def test_subset_ids_with_gaps(tmp_path):
  path = tmp_path / 'gap.npz'
  np.savez(path, images=np.zeros((4, 8, 8, 1)), labels=np.arange(4),
           subset=np.array([0, 0, 2, 2]))
  with pytest.raises(DataError, match='without gaps'):
    synthetic.load(str(path), 10, (8, 8, 1))
