"""Evaluation protocol: real signal on digits, vmap == one by one, staged
K=1 == plain, malformed files."""

import jax
import numpy as np
import pytest

from seqmatch_jax import evaluate, synthetic
from seqmatch_jax.errors import DataError
from tests import helpers


def _run(x, y, lr, key, *, num_models: int = 2, epochs: int = 60,
         parallel: str = 'auto', **kw):
  """evaluate_synthetic on a width-16 ConvNet-2 with the digits config's
  protocol (`epochs`, `parallel`)."""
  from seqmatch_jax import pipeline  # pylint: disable=g-import-not-at-top
  c = helpers.config('digits')
  c.model.width = 16
  c.model.depth = 2
  c.eval.epochs = epochs
  c.eval.parallel = parallel
  network = pipeline.network_for(c, 'convnet', 10, (8, 8, 1))
  return evaluate.evaluate_synthetic(
      x, y, lr, network, evaluate.protocol_from_config(c), key, x_eval=kw.pop('xt'),
      y_eval=kw.pop('yt'), num_models=num_models, **kw)


def test_whole_digits_reaches_95_percent():
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  r = _run(x, y, 0.05, jax.random.key(0), xt=xt, yt=yt, num_models=1, epochs=30)
  assert r['mean'] > 95.0


def test_random_real_is_far_above_chance():
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  xr, yr = evaluate.random_real(x, y, 10, 10, seed=0)
  assert np.bincount(np.asarray(yr)).tolist() == [10] * 10
  r = _run(xr, yr, 0.01, jax.random.key(0), xt=xt, yt=yt)
  assert r['mean'] > 60.0 and len(r['per_model']) == 2


def test_vmap_equals_sequential_and_staged_k1_equals_plain():
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  xr, yr = evaluate.random_real(x, y, 3, 10, seed=1)
  run = lambda parallel, **kw: _run(xr, yr, 0.02, jax.random.key(7), xt=xt, yt=yt,
                                    epochs=20, parallel=parallel, **kw)
  seq = run('sequential')
  vm = run('vmap')
  np.testing.assert_allclose(seq['per_model'], vm['per_model'], atol=0.5)
  staged = run('sequential', subset=np.zeros(len(yr), np.int32))
  assert staged['per_model'] == seq['per_model']


def test_staged_reports_each_stage():
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  xr, yr = evaluate.random_real(x, y, 4, 10, seed=2)
  subset = np.repeat([0, 1], 20)
  order = np.argsort(np.tile(np.repeat([0, 1], 2), 10), kind='stable')
  r = _run(np.asarray(xr)[order], np.asarray(yr)[order], [0.02, 0.01],
           jax.random.key(0), xt=xt, yt=yt, subset=subset, epochs=20)
  assert len(r['stages']) == 2 and r['stages'][-1]['mean'] == r['mean']
  assert r['lr'] == pytest.approx([0.02, 0.01])


def test_soft_labels_train_like_their_one_hot_limit():
  """Soft labels (logits) train with softmax targets: very confident logits
  of the true class give what integer labels give, to float tolerance."""
  x, y, xt, yt, _, _ = helpers.digits_model_space()
  xr, yr = evaluate.random_real(x, y, 3, 10, seed=1)
  hard = _run(xr, yr, 0.02, jax.random.key(7), xt=xt, yt=yt, epochs=10,
              parallel='sequential', num_models=1)
  logits = 60.0 * np.eye(10, dtype=np.float32)[np.asarray(yr)]
  soft = _run(xr, logits, 0.02, jax.random.key(7), xt=xt, yt=yt, epochs=10,
              parallel='sequential', num_models=1)
  np.testing.assert_allclose(soft['per_model'], hard['per_model'], atol=0.5)


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


def _counting_stop(after: int):
  """A should_stop that turns true at its `after + 1`-th call (calls come
  before each model)."""
  calls = {'n': 0}

  def stop():
    calls['n'] += 1
    return calls['n'] > after
  return stop


def test_final_evaluation_stops_between_models_and_resumes_exactly(tmp_path):
  """A stop during pipeline.evaluate keeps the finished models; reruns train
  only the others and give exactly the uninterrupted numbers; a changed
  protocol does not reuse them."""
  from seqmatch_jax import pipeline  # pylint: disable=g-import-not-at-top
  from seqmatch_jax.errors import Interrupted  # pylint: disable=g-import-not-at-top
  c = helpers.config('digits')
  c.model.width = 8
  c.eval.num_models = 3
  c.eval.epochs = 6
  c.eval.parallel = 'sequential'
  c.eval.baselines = ('random_real',)
  c.augment.strategy = 'flip'
  c.dataset.cache_dir = str(tmp_path / 'cache')
  data = pipeline.prepare_data(c, str(tmp_path / 'prep'))
  x, y = evaluate.random_real(data.x_train, data.y_train, 2, 10, seed=3)
  path = tmp_path / 'set.npz'
  np.savez(path, images=np.clip(data.preprocessor.to_pixels(np.asarray(x)), 0, 1),
           labels=np.asarray(y), subset=np.tile([0, 1], 10),
           lr=np.float32([0.02, 0.01]))
  c.eval.synthetic = str(path)
  key = jax.random.key(0)
  full = pipeline.evaluate(c, str(tmp_path / 'full'), data, key)['rows']

  wd = str(tmp_path / 'stopped')
  with pytest.raises(Interrupted, match='1 of 3 models kept'):
    pipeline.evaluate(c, wd, data, key, should_stop=_counting_stop(1))
  progress = pipeline.EvalProgress(wd)
  kept = progress.cells['synthetic / convnet']['accuracies']
  assert kept[0] is not None and kept[1:] == [None, None]
  # Second stop in the next row: 2 models of the first row, then 1 of this one.
  with pytest.raises(Interrupted, match=r'random real .* 1 of 3 models kept'):
    pipeline.evaluate(c, wd, data, key, should_stop=_counting_stop(3))
  resumed = pipeline.evaluate(c, wd, data, key)['rows']
  assert resumed == full
  # The stored models are those of the uninterrupted run, to the bit.
  stored = pipeline.EvalProgress(wd).cells['synthetic / convnet']['accuracies']
  assert [round(100 * a[-1], 4) for a in stored] == \
      full['synthetic']['convnet']['per_model']
  # Another protocol (or model count) never reuses them.
  spec = pipeline.EvalProgress(wd).cells['synthetic / convnet']['spec']
  for change in (dict(protocol=dict(spec['protocol'], epochs=7)),
                 dict(num_models=4),
                 dict(source=dict(spec['source'], crc32=1))):
    other = dict(spec, **change)
    assert np.isnan(pipeline.EvalProgress(wd).done('synthetic / convnet', other)).all()
  assert not np.isnan(pipeline.EvalProgress(wd).done('synthetic / convnet', spec)).any()


# -- Which protocol a method's sets get (issue 27) --------------------------------

@pytest.mark.parametrize('name, epochs, augment, align', [
    ('mtt', 1000, 'color_crop_cutout_flip_scale_rotate', True),
    ('dm', 1000, 'color_crop_cutout_flip_scale_rotate', False),
    ('dsa', 1000, 'color_crop_cutout_flip_scale_rotate', False),
    ('dc', 300, '', False)])
def test_each_method_is_evaluated_with_its_official_protocol(name, epochs, augment,
                                                             align):
  from seqmatch_jax import pipeline  # pylint: disable=g-import-not-at-top
  arg = 'ipc=10' if name == 'mtt' else f'ipc=10,backbone={name}'
  config = helpers.config('cifar10', arg)
  p = pipeline.evaluation_protocol(config)
  assert (p.epochs, p.augment, p.align_corners) == (epochs, augment, align)
  assert (p.batch_size, p.schedule) == (256, 'half')
  config.eval.protocol = 'common'  # one protocol to compare methods
  assert pipeline.evaluation_protocol(config) == evaluate.protocol_from_config(config)
  assert pipeline.protocol_name(config) == 'common (eval.*)'


def test_results_md_names_each_rows_protocol(tmp_path):
  p = evaluate.Protocol(epochs=300, augment='', align_corners=False)
  row = dict(mean=50.0, std=1.0, protocol=evaluate.describe(p))
  evaluate.write_results(str(tmp_path), dict(
      rows={'DC': {'convnet': row}}, protocol=dict(name='DC (official)')))
  text = (tmp_path / 'results.md').read_text()
  assert 'Evaluation protocol: DC (official).' in text
  assert '| DC | convnet | 50.00 ± 1.00 |  | 300 epochs, batch 256' in text
  assert 'no augmentation, align_corners=False |' in text
