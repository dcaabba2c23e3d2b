"""Analyses (paper Figures 1, 2, 4, K search): the R norm against a direct
Jacobian, the easy/hard split on two obvious groups, S+/S- halves, and every
output file of a tiny end-to-end run."""

import json
import os

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from seqmatch_jax import analysis
from seqmatch_jax import analyze
from seqmatch_jax import training
from seqmatch_jax.errors import DataError
from tests import helpers


def _direct_r_norm(net, params, state, x, y):
  """||d grad_θ ℓ / dx||_1 via the full Jacobian (jacfwd of grad)."""
  flat, unravel = ravel_pytree(params)

  def grad(xi):
    def loss(p):
      logits, _ = net.apply(unravel(p), state, xi[None], train=True)
      return training.cross_entropy(logits, y[None])[0]
    return jax.grad(loss)(flat)

  return jnp.sum(jnp.abs(jax.jacfwd(grad)(x)))


def test_r_norm_matches_direct_jacobian():
  net = helpers.tiny_convnet(width=4, depth=2, conv_impl='xla')
  params, state = net.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  y = jnp.array([0, 3, 7])
  want = np.asarray(jax.jit(jax.vmap(
      lambda xi, yi: _direct_r_norm(net, params, state, xi, yi)))(x, y))
  # chunk 24 does not divide 64: the padded (zero) tangents must add nothing.
  got = np.asarray(analysis.r_norms(net, params, state, x, y, chunk=24))
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # The estimator: a quarter of the columns, scaled, lands near the exact norm.
  cols = analysis.sample_columns(jax.random.key(3), (8, 8, 1), 16)
  est = np.asarray(analysis.r_norms(net, params, state, x, y, cols, chunk=24))
  assert np.all(np.abs(est - want) / want < 0.5)


def test_easy_hard_split_finds_two_obvious_groups():
  rng = np.random.default_rng(0)
  t = np.arange(10)
  easy = 2.3 * np.exp(-t / 2) + 0.05 * rng.standard_normal((70, 10))
  hard = 2.3 - 0.02 * t + 0.05 * rng.standard_normal((30, 10))
  order = rng.permutation(100)
  curves = np.concatenate([easy, hard])[order]
  truth = np.concatenate([np.zeros(70, bool), np.ones(30, bool)])[order]
  hard_mask = analysis.easy_hard_split(curves)
  np.testing.assert_array_equal(hard_mask, truth)
  assert hard_mask.mean() == pytest.approx(0.3)
  with pytest.raises(DataError):
    analysis.easy_hard_split(curves[:1])


def test_split_by_norm_and_restage():
  norms = np.array([5., 1., 3., 9., 2., 7., 4.])
  labels = np.array([0, 0, 0, 1, 1, 1, 1])
  plus, minus = analysis.split_by_norm(norms, labels)
  assert np.flatnonzero(plus).tolist() == [0, 3, 5]  # class 0: 5; class 1: 9, 7
  assert np.flatnonzero(minus).tolist() == [1, 4, 6]  # class 0: 1; class 1: 2, 4
  subset = np.array([0, 1, 1, 1, 1, 1, 1])
  new, lrs = analysis.restage(subset, minus, np.array([0.1, 0.2]))
  assert new.tolist() == [0, 0, 0] and lrs.tolist() == pytest.approx([0.2])
  assert analysis.linear_fit([0, 1, 2], [1, 3, 5])['slope'] == pytest.approx(2.0)
  assert analysis.split_epochs(5, 2) == [3, 2]


def _tiny_config():
  c = helpers.config('digits')
  c.model.width = 8
  c.model.depth = 2
  c.augment.strategy = ''  # no DSA: a cheaper compile
  c.eval.epochs = 2
  c.eval.num_models = 1
  return c


def _write_set(path, k, with_lr, ipc=4):
  """ipc images per class in k subsets, laid out subset-major as ours."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng(k)
  per = ipc // k
  labels = np.tile(np.repeat(np.arange(10), per), k).astype(np.int32)
  subset = np.repeat(np.arange(k), 10 * per).astype(np.int32)
  extra = dict(subset=subset) if k > 1 else {}
  if with_lr:
    extra['lr'] = np.full((k,), 0.02, np.float32)
  np.savez(path, images=rng.uniform(size=(len(labels), 8, 8, 1)).astype(np.float32),
           labels=labels, **extra)


@pytest.mark.starts_first
def test_every_output_file_written(tmp_path):
  _write_set(str(tmp_path / 'synthetic.npz'), 2, with_lr=True)
  _write_set(str(tmp_path / 'mtt' / 'synthetic.npz'), 1, with_lr=False)
  # Both sets (found in the workdir) for the grids and loss curves.
  analyze.run(_tiny_config(), str(tmp_path), analyses=['grids', 'loss'],
              loss_epochs=2, loss_iterations=2, max_instances=60)
  # Coupling on the plain set only: its S+ and S- share one shape, hence one
  # compile of the evaluation (the staged S+/S- path is `restage`, tested above).
  report = analyze.run(_tiny_config(), str(tmp_path), analyses=['coupling'],
                       sets=[str(tmp_path / 'mtt' / 'synthetic.npz')], names=['MTT'],
                       coupling_inits=2, coupling_models=1, coupling_epochs=2,
                       r_check_images=1)
  out = tmp_path / 'analysis'
  names = ['loss_curves.png', 'loss_heatmap.png', 'loss_curves.json', 'coupling.png',
           'coupling.json', 'grids.png', 'grids.json', 'grid_seqmatch_k_2_subset1.png',
           'grid_seqmatch_k_2_subset2.png', 'grid_mtt_subset1.png']
  for name in names:
    assert (out / name).stat().st_size > 0, name
  loss = json.loads((out / 'loss_curves.json').read_text())
  assert loss['instances'] == dict(used=60, train_size=loss['instances']['train_size'],
                                   subsampled=True)
  assert set(loss['sets']) == {'SeqMatch (K=2)', 'MTT'}
  assert loss['sets']['SeqMatch (K=2)']['stage_epochs'] == [1, 1]
  assert len(loss['sets']['MTT']['mean_all']) == 3  # init + 2 epochs
  coupling = json.loads((out / 'coupling.json').read_text())
  assert coupling['r_norm']['method'].startswith('exact')
  assert coupling['r_norm']['estimator_check']['images'] == 1
  assert coupling['sets']['MTT']['lr_source'] == 'eval.lr'
  assert len(coupling['sets']['MTT']['points']) == 2
  assert all(p['norm_diff'] >= 0 for p in coupling['sets']['MTT']['points'])
  assert coupling['sets']['MTT']['fit'] is not None
  assert report['files'] == ['coupling.png', 'coupling.json']
  # Beyond r_max_dims input dimensions: the estimator, checked against exact.
  report = analyze.run(_tiny_config(), str(tmp_path), analyses=['coupling'],
                       sets=[str(tmp_path / 'mtt' / 'synthetic.npz')], names=['MTT'],
                       coupling_inits=1, coupling_models=1, coupling_epochs=2,
                       r_max_dims=32, r_columns=16, r_check_images=1)
  r_norm = report['coupling']['r_norm']
  assert r_norm['method'].startswith('estimator (16 of 64')
  assert r_norm['estimator_check']['mean_rel_error'] < 0.5


def test_k_search_writes_plot(tmp_path):
  # Plain sets of one shape under k2/ and k3/: one compile serves both.
  for k in (2, 3):
    _write_set(str(tmp_path / f'k{k}' / 'synthetic.npz'), 1, with_lr=True)
  _write_set(str(tmp_path / 'kx' / 'synthetic.npz'), 1, with_lr=True)  # not a K run
  out = tmp_path / 'analysis'
  res = analyze.k_search(_tiny_config(), str(tmp_path), jax.random.key(0),
                         models=1, epochs=2, out_dir=str(out))
  assert sorted(res['runs']) == ['2', '3'] and res['best_k'] in (2, 3)
  assert (out / 'k_search.png').stat().st_size > 0
  assert (out / 'k_search.json').stat().st_size > 0
