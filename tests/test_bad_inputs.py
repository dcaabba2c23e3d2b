"""Bad input at the command line: each case ends, before any training, with
exit code 2 and exactly one `error:` line, the last of stderr, that names the
fix; never a traceback.

The table runs `python -m seqmatch_jax.main` once per case (~2 s each: the
imports); unit tests of the checks behind it follow.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest

from seqmatch_jax import config_lib
from seqmatch_jax import data
from seqmatch_jax.errors import ConfigError, DataError
from seqmatch_jax.models import create_network, single_pixel_norms
from seqmatch_jax.models.networks import check_image_size
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = '--config=configs/digits.py'


def run_main(*args: str, cwd: str = ROOT,
             timeout: float = 300) -> subprocess.CompletedProcess:
  env = helpers.subprocess_env()
  return subprocess.run([sys.executable, '-m', 'seqmatch_jax.main', *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def assert_one_error_line(r: subprocess.CompletedProcess, phrase: str) -> None:
  """Exit 2; one `error:` line, the last non-empty one, containing `phrase`."""
  tail = r.stderr[-3000:]
  assert r.returncode == 2, tail
  assert 'Traceback' not in r.stderr, tail
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert sum('error:' in l for l in lines) == 1, tail
  assert lines[-1].startswith('error: '), tail
  assert phrase in lines[-1], tail


def _npz(path, x_train, x_test=None) -> str:
  n, m = len(x_train), 6
  x_test = x_train[:m] if x_test is None else x_test
  np.savez(path, x_train=x_train, y_train=np.arange(n) % 2, x_test=x_test,
           y_test=np.arange(len(x_test)) % 2)
  return str(path)


def _npz_args(path: str) -> list[str]:
  return [DIGITS, '--config.dataset.name=npz', f'--config.dataset.data_dir={path}']


def _npy_as_npz(tmp):
  np.save(tmp / 'x.npy', np.zeros((20, 8, 8, 1), np.uint8))
  return _npz_args(str(tmp / 'x.npy'))


def _directory_as_npz(tmp):
  (tmp / 'data').mkdir()
  _npz(tmp / 'data' / 'mine.npz', np.zeros((20, 8, 8, 1), np.uint8))
  return _npz_args(str(tmp / 'data'))


def _channels_first(channels):
  def make(tmp):
    return _npz_args(_npz(tmp / 'nchw.npz',
                          np.zeros((20, channels, 8, 8), np.uint8)))
  return make


def _tiny_images(tmp):
  return _npz_args(_npz(tmp / 'tiny.npz', np.zeros((20, 2, 2, 3), np.uint8)))


def _experts_dir(tmp, metadata: str | None, progress: str | None = None) -> str:
  path = tmp / 'experts'
  (path / 'expert_0000').mkdir(parents=True)
  if metadata is not None:
    (path / 'metadata.json').write_text(metadata)
  if progress is not None:
    (path / 'expert_0000' / 'progress.json').write_text(progress)
  return str(path)


def _damaged_metadata(mode):
  def make(tmp):
    path = _experts_dir(tmp, '{"epochs": 3, "num_exp')
    return [DIGITS, f'--config.mode={mode}', f'--config.experts.dir={path}']
  return make


def _damaged_progress(tmp):
  meta = json.dumps(dict(epochs=3, num_experts=1, format=2))
  path = _experts_dir(tmp, meta, progress='{"snapshots": {"0": ')
  return [f'{DIGITS}:ipc=1', '--config.mode=distill',
          f'--config.experts.dir={path}', '--config.experts.epochs=3',
          '--config.mtt.max_start_epoch=1', '--config.mtt.expert_epochs=1']


def _file(tmp, name='a_file') -> str:
  (tmp / name).write_text('not a directory')
  return str(tmp / name)


def _fixed(*args):
  return lambda tmp: list(args)


# (id, tmp_path -> arguments, phrase of the error line). A case that sets
# --workdir itself gets no default one.
CASES: list[tuple[str, Callable, str]] = [
    ('npy_as_npz', _npy_as_npz, 'not an .npz archive'),
    ('directory_as_npz', _directory_as_npz,
     'set --config.dataset.data_dir to the .npz file itself'),
    ('channels_first_grey', _channels_first(1), 'transpose(0, 2, 3, 1)'),
    ('channels_first_rgb', _channels_first(3), 'channels-first'),
    ('images_too_small', _tiny_images, '--config.model.depth=1 or less'),
    ('model_too_deep', _fixed(DIGITS, '--config.model.depth=5'),
     '--config.model.depth=3 or less'),
    ('cross_arch_on_single_pixels',
     _fixed(DIGITS, '--config.eval.architectures=(convnet,vgg11)'),
     'Set --config.eval.cross_arch_norm=batch'),
    ('model_on_single_pixels', _fixed(DIGITS, '--config.model.name=resnet18'),
     'Set --config.model.norm=batch'),
    ('bad_cross_arch_norm', _fixed(DIGITS, '--config.eval.cross_arch_norm=group'),
     "eval.cross_arch_norm must be empty (model.norm) or one of"),
    ('damaged_metadata_experts', _damaged_metadata('experts'),
     'delete it and rerun with --config.mode=experts'),
    ('damaged_metadata_distill', _damaged_metadata('distill'),
     'metadata.json is damaged'),
    ('damaged_progress', _damaged_progress, 'to retrain expert 0'),
    ('unknown_key', _fixed(DIGITS, '--config.distill.bogus=1'),
     'unknown config key distill.bogus'),
    ('misspelt_key', _fixed(DIGITS, '--config.mtt.iteration=1'),
     'did you mean mtt.iterations?'),
    ('misspelt_section', _fixed(DIGITS, '--config.distil.eval_every=1'),
     'did you mean distill.eval_every'),
    ('unknown_backbone_variant', _fixed(f'{DIGITS}:backbone=idcc'),
     "Unknown backbone.name 'idcc'"),
    ('param_factor_too_large', _fixed(f'{DIGITS}:backbone=idc', '--config.param.factor=9'),
     'param.factor=9 cuts 8-pixel images'),
    ('bad_variant_value', _fixed(f'{DIGITS}:ipc=ten'),
     "variant argument ipc must be an integer, got 'ten'"),
    ('unknown_variant_key', _fixed(f'{DIGITS}:foo=1'),
     "Unknown config argument 'foo=1'"),
    ('workdir_is_a_file', lambda tmp: [DIGITS, f'--workdir={_file(tmp)}'],
     'is an existing file, not a directory'),
    ('workdir_under_a_file',
     lambda tmp: [DIGITS, f'--workdir={_file(tmp)}/run'], 'is a file'),
    ('experts_dir_is_a_file',
     lambda tmp: [DIGITS, f'--config.experts.dir={_file(tmp)}'],
     '--config.experts.dir='),
    ('experts_dir_is_a_file_distill',
     lambda tmp: [DIGITS, '--config.mode=distill',
                  f'--config.experts.dir={_file(tmp)}'],
     'is an existing file'),
]


# Run in this process (helpers.run_cli: the program's entry point with an
# argv, its stderr and exit status); these few also as real `python -m`
# subprocesses, to prove the command line itself behaves the same way.
SUBPROCESS_CASES = ('unknown_key', 'workdir_is_a_file', 'damaged_metadata_experts')


def _with_workdir(args: list[str], tmp_path) -> list[str]:
  if not any(a.startswith('--workdir') for a in args):
    args.append(f'--workdir={tmp_path / "run"}')
  return args


@pytest.mark.parametrize('make_args, phrase', [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_fails_with_one_line(capsys, tmp_path, make_args, phrase):
  args = _with_workdir(make_args(tmp_path), tmp_path)
  helpers.assert_one_error_line(*helpers.run_cli(capsys, *args), phrase)


@pytest.mark.parametrize('make_args, phrase',
                         [c[1:] for c in CASES if c[0] in SUBPROCESS_CASES],
                         ids=[c[0] for c in CASES if c[0] in SUBPROCESS_CASES])
def test_bad_input_fails_with_one_line_from_the_shell(tmp_path, make_args, phrase):
  args = _with_workdir(make_args(tmp_path), tmp_path)
  assert_one_error_line(run_main(*args), phrase)


@pytest.mark.skipif(hasattr(os, 'geteuid') and os.geteuid() == 0,
                    reason='root writes to read-only directories')
def test_read_only_workdir(capsys, tmp_path):
  workdir = tmp_path / 'ro'
  workdir.mkdir()
  workdir.chmod(0o500)
  try:
    r = helpers.run_cli(capsys, DIGITS, f'--workdir={workdir}')
  finally:
    workdir.chmod(0o700)
  helpers.assert_one_error_line(*r, 'is not writable')


def test_uncreatable_workdir(capsys, tmp_path):
  """As root a chmod-ed directory stays writable; sysfs refuses even root."""
  target = '/sys/seqmatch_bad_input_test/run'
  if os.path.exists(target) or not os.path.isdir('/sys'):
    pytest.skip('no /sys')
  try:
    os.makedirs(target)
  except OSError:
    pass
  else:
    pytest.skip('/sys is writable here')
  helpers.assert_one_error_line(
      *helpers.run_cli(capsys, DIGITS, f'--workdir={target}'),
      'pass a directory you can write to')


@pytest.mark.starts_first
def test_truncated_orbax_step_is_one_line_without_async_noise(capsys, tmp_path):
  """A damaged distillation checkpoint: one line, and none of the ~100 lines
  of 'Exception ignored in: <coroutine ...>' / 'Event loop is closed' that
  TensorStore's cancelled reads print (they show in about half the runs, at
  the process's exit: the failing run is a real subprocess). A tiny experts +
  distill run (in this process) writes the checkpoint."""
  tiny = [f'{DIGITS}:ipc=1', f'--workdir={tmp_path / "run"}',
          '--config.model.width=8', '--config.experts.num=1',
          '--config.experts.epochs=2', '--config.mtt.iterations=2',
          '--config.mtt.syn_steps=2', '--config.mtt.expert_epochs=1',
          '--config.mtt.max_start_epoch=1', '--config.distill.checkpoint_every=2',
          '--config.distill.eval_every=0',
          '--config.seqmatch.compare_backbone=False']
  for mode in ('experts', 'distill'):
    code, err = helpers.run_cli(capsys, *tiny, f'--config.mode={mode}')
    assert code == 0, err[-3000:]
  run = tmp_path / 'run'
  step = run / 'distill' / 'subset_1' / '2'
  assert step.is_dir(), sorted(os.listdir(run / 'distill' / 'subset_1'))
  for f in (run / 'synthetic.npz', run / 'synthetic.png'):
    f.unlink()
  shutil.rmtree(run / 'subsets')
  for f in step.rglob('*'):  # every array chunk: the restore must fail
    if f.is_file() and f.parent.name == 'd':
      with open(f, 'r+b') as fh:
        fh.truncate(5)
  r = run_main(*tiny, '--config.mode=distill')
  # The error names the fix, not TensorStore's or pybind's own text.
  assert_one_error_line(r, 'cannot be restored: its files are damaged or '
                        'incomplete (')
  assert re.search(r'incomplete \(\w+\)\. Move the folder \S+/2 away',
                   r.stderr.splitlines()[-1]), r.stderr[-1000:]
  assert 'coroutine' not in r.stderr and 'Event loop' not in r.stderr


# ------------------------------------------------------------- unit checks


@pytest.mark.parametrize('shape, depth', [
    ((8, 8, 1), 3), ((28, 28, 1), 5), ((32, 32, 3), 5), ((64, 64, 3), 6),
    ((128, 128, 3), 7), ((2, 2, 3), 1), ((4, 9, 1), 2),
])
def test_check_image_size_accepts(shape, depth):
  check_image_size('convnet', shape, depth)


@pytest.mark.parametrize('shape, depth, phrase', [
    ((8, 8, 1), 4, 'depth=3 or less'),
    ((8, 8, 1), 5, 'at least 32x32'),
    ((32, 32, 3), 6, 'depth=5 or less'),
    ((2, 2, 3), 2, 'depth=1 or less'),
    ((4, 9, 1), 3, 'depth=2 or less'),
    ((1, 1, 3), 1, 'too small for a ConvNet'),
])
def test_check_image_size_refuses(shape, depth, phrase):
  with pytest.raises(ConfigError, match=phrase) as e:
    check_image_size('convnet', shape, depth)
  assert '\n' not in str(e.value)


def test_check_image_size_ignores_fixed_architectures():
  check_image_size('resnet18', (8, 8, 1), 5)  # depth shapes the ConvNet only


@pytest.mark.parametrize('name, shape, norm, layers', [
    ('vgg11', (8, 8, 1), 'instance', 4),  # the four 512-channel convs at 1x1
    ('resnet18', (8, 8, 1), 'instance', 5),  # layer4 (and its shortcut) at 1x1
    ('vgg11', (8, 8, 1), 'batch', 0),
    ('resnet18', (8, 8, 1), 'none', 0),
    ('vgg11', (32, 32, 3), 'instance', 0),  # its last convs see 2x2
    ('resnet18', (28, 28, 1), 'instance', 0),
    ('convnet', (8, 8, 1), 'instance', 0),
])
def test_single_pixel_instance_norms(name, shape, norm, layers):
  net = create_network(name, 10, shape, depth=2, norm=norm)
  assert len(single_pixel_norms(net)) == layers


def test_peek_image_shape(tmp_path):
  assert data.peek_image_shape('digits') == (8, 8, 1)
  assert data.peek_image_shape('cifar10', '/nowhere') == (32, 32, 3)
  assert data.peek_image_shape('imagewoof') == (128, 128, 3)
  path = _npz(tmp_path / 'grey.npz', np.zeros((20, 5, 7), np.uint8))
  assert data.peek_image_shape('npz', path) == (5, 7, 1)
  with pytest.raises(DataError, match='channels-first'):
    data.peek_image_shape('npz', _npz(tmp_path / 'cf.npz',
                                      np.zeros((20, 3, 9, 9), np.uint8)))


@pytest.mark.parametrize('arg, message', [
    ('flag=maybe', 'variant argument flag must be true or false'),
    ('ipc=ten', "variant argument ipc must be an integer, got 'ten'"),
    ('ipc=2.5', 'variant argument ipc must be an integer'),
    ('lr=fast', "variant argument lr must be a number, got 'fast'"),
    ('ipcc=3', "Unknown config argument 'ipcc=3'"),
])
def test_variant_arguments_are_strict(arg, message):
  with pytest.raises(ValueError, match=message):
    config_lib.parse_arg(arg, ipc=10, flag=False, lr=0.1)


@pytest.mark.parametrize('text, value', [
    ('true', True), ('True', True), ('1', True), ('yes', True),
    ('false', False), ('FALSE', False), ('0', False), ('no', False),
])
def test_bool_variant_argument(text, value):
  assert config_lib.parse_arg(f'flag={text}', flag=not value).flag is value


def test_misspelt_table_key_is_refused():
  tables = {10: {'mtt.syn_step': 30}}
  with pytest.raises(ValueError, match=r"'mtt.syn_step'.*mtt.syn_steps"):
    config_lib.table_config('digits', None, tables)
  with pytest.raises(ValueError, match=r"'distil.eval_every'.*distill.eval_every"):
    config_lib.apply_settings(config_lib.base_config(), {'distil.eval_every': 1})
  with pytest.raises(ValueError, match='top-level keys'):
    config_lib.apply_settings(config_lib.base_config(), {'zzz': 1})
  c = config_lib.base_config()
  config_lib.apply_settings(c, {'mtt.per_subset.syn_steps': (7, 8), 'ipc': 3})
  assert c.mtt.per_subset.syn_steps == (7, 8) and c.ipc == 3


def test_error_line_is_not_glued_to_a_progress_bar(capsys):
  import tqdm  # pylint: disable=g-import-not-at-top
  from seqmatch_jax import main  # pylint: disable=g-import-not-at-top
  bar = tqdm.tqdm(total=10, desc='distill subset 1', file=sys.stderr)
  bar.update(3)  # the bar's line is left unfinished, as mid-run
  with pytest.raises(SystemExit) as e:
    main._fail('boom; do this')  # pylint: disable=protected-access
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.endswith('\nerror: boom; do this\n'), repr(err[-200:])


# -- silent changes of meaning (issue 13) ---------------------------------------

def _random_bytes_npz(tmp):
  (tmp / 'x.npz').write_bytes(os.urandom(300))
  return [DIGITS, '--config.mode=evaluate', f'--config.eval.synthetic={tmp}/x.npz']


def _damaged_subset(tmp):
  (tmp / 'run' / 'subsets').mkdir(parents=True)
  (tmp / 'run' / 'subsets' / 'subset_1.npz').write_bytes(b'PK\x03\x04 truncated')
  return [DIGITS, '--config.mode=distill']


def _damaged_run_record(tmp):
  ckpt = tmp / 'run' / 'distill' / 'subset_1'
  (ckpt / '50').mkdir(parents=True)
  (ckpt / 'run.json').write_text('{"trajectories_per_step": ')
  return [DIGITS, '--config.mode=distill']


CHANGED_MEANING = [
    ('ipc_override_keeps_row', _fixed(DIGITS, '--config.ipc=2'),
     'use --config=configs/digits.py:ipc=2 instead'),
    ('per_subset_not_numbers',
     _fixed(DIGITS, "--config.mtt.per_subset.max_start_epoch=('a','b')"),
     'must hold numbers'),
    ('random_bytes_as_synthetic', _random_bytes_npz, 'not a readable .npz archive'),
    ('damaged_subset_file', _damaged_subset, 'delete it and rerun'),
    ('damaged_run_record', _damaged_run_record, 'run.json is damaged'),
]


@pytest.mark.parametrize('make_args, phrase', [c[1:] for c in CHANGED_MEANING],
                         ids=[c[0] for c in CHANGED_MEANING])
def test_changed_meaning_fails_with_one_line(capsys, tmp_path, make_args, phrase):
  args = make_args(tmp_path)
  helpers.assert_one_error_line(
      *helpers.run_cli(capsys, *args, f'--workdir={tmp_path / "run"}'), phrase)


def test_rerun_with_other_hyperparameters_is_refused_and_keeps_config(capsys, tmp_path):
  """A finished subset made under other settings is never silently reused,
  and the refused run leaves the earlier config.json alone."""
  from seqmatch_jax import seqmatch, synthetic
  config = helpers.config('digits')
  plan = seqmatch.subset_plans(config)[0]
  record = seqmatch.subset_record(config, plan)
  record['mtt.syn_steps'] = 99  # what the earlier run used
  run = tmp_path / 'run'
  synthetic.save_subset(str(run / 'subsets' / 'subset_1.npz'), synthetic.FinishedSubset(
      np.zeros((50, 8, 8, 1)), 0.01, np.repeat(np.arange(10), 5), record), record)
  (run / 'config.json').write_text('{"earlier": true}')
  code, err = helpers.run_cli(capsys, DIGITS, '--config.mode=distill',
                              f'--workdir={run}')
  helpers.assert_one_error_line(code, err, 'mtt.syn_steps: 99 -> 20')
  assert 'new --workdir' in err
  # It names what to delete: this subset and the later ones built on it.
  assert f'delete {run}/subsets/subset_{{1..2}}.npz and the folders ' \
      f'{run}/distill/subset_{{1..2}}' in err
  assert (run / 'config.json').read_text() == '{"earlier": true}'


def test_scalar_override_replaces_the_per_subset_tuple():
  config = helpers.config('digits')
  notes = config_lib.reconcile_overrides(
      config, {'mtt.lr_img': 500.0}, os.path.join(ROOT, 'configs', 'digits.py'))
  assert tuple(config.mtt.per_subset.lr_img) == () and 'every subset' in notes[0]
  kept = helpers.config('digits')
  assert config_lib.reconcile_overrides(
      kept, {'mtt.lr_img': 500.0, 'mtt.per_subset.lr_img': (1.0, 2.0)},
      'configs/digits.py') == []


def test_ipc_override_within_a_row_is_allowed():
  config = helpers.config('digits')
  assert config_lib.reconcile_overrides(
      config, {'ipc': 12}, os.path.join(ROOT, 'configs', 'digits.py')) == []


def test_model_space_is_reused_across_seeds_without_zca(tmp_path):
  """mode=evaluate on a set saved under another seed uses its exact
  model-space images: without ZCA the preprocessing does not depend on it."""
  from seqmatch_jax import synthetic
  saved, now = helpers.config('digits'), helpers.config('digits')
  now.seed = 7
  tag = synthetic.preprocessing_tag(saved)
  assert synthetic.same_preprocessing(tag, now)
  saved.dataset.zca = now.dataset.zca = True
  assert not synthetic.same_preprocessing(synthetic.preprocessing_tag(saved), now)


# -- issue 24: the last silent changes of meaning, late errors ---------------
# In-process runs of the command line (helpers.run_cli): each ends before any
# training.

def test_repeated_tuple_key_takes_the_last_value(capsys, tmp_path):
  """ml_collections would join the two into (100.0, 5.0, -1.0): 3 entries for
  2 subsets. The last value wins, as for every other key."""
  code, err = helpers.run_cli(
      capsys, DIGITS, f'--workdir={tmp_path}',
      '--config.mtt.per_subset.lr_img=(100.0,)',
      '--config.mtt.per_subset.lr_img=(5.0,-1.0)')
  helpers.assert_one_error_line(code, err, 'lr_img of subset 2 must be positive, '
                                'got -1.0')


@pytest.mark.parametrize('args, phrase', [
    (['--config.backbone.name=ftd', '--config.experts.optimizer=gsam',
      '--config.mtt.syn_steps=7'], 'use --config.ftd.syn_steps'),
    (['--config.backbone.name=idc', '--config.dm.iterations=7'],
     'use --config.idc.iterations'),
    (['--config.backbone.name=dm', '--config.idc.metric=l1'],
     'backbone dm has no such setting'),
])
def test_another_backbones_key_is_refused(capsys, tmp_path, args, phrase):
  code, err = helpers.run_cli(capsys, DIGITS, f'--workdir={tmp_path}', *args)
  helpers.assert_one_error_line(code, err, phrase)


def test_unquoted_string_tuple_is_split(capsys, tmp_path):
  code, err = helpers.run_cli(capsys, DIGITS, f'--workdir={tmp_path}',
                              '--config.eval.architectures=(convnet,resnet18x)')
  helpers.assert_one_error_line(code, err, "Unknown architecture 'resnet18x'")
  config = helpers.config('digits')
  overrides = {'eval.architectures': ('(convnet, alexnet)',),
               'eval.baselines': ('whole',)}
  config_lib.reconcile_overrides(config, overrides, 'configs/digits.py')
  assert config.eval.architectures == ('convnet', 'alexnet')
  assert overrides['eval.baselines'] == ('whole',)  # a proper tuple stays


def _npz_dataset(tmp, y_train, y_test=(0, 1, 0, 1)) -> str:
  rng = np.random.default_rng(0)
  path = str(tmp / 'data.npz')
  np.savez(path, x_train=rng.integers(0, 255, (len(y_train), 8, 8, 1), np.uint8),
           y_train=np.asarray(y_train),
           x_test=rng.integers(0, 255, (len(y_test), 8, 8, 1), np.uint8),
           y_test=np.asarray(y_test))
  return path


def test_too_few_images_for_ipc_before_any_expert(capsys, tmp_path):
  path = _npz_dataset(tmp_path, [0] * 10 + [1])
  code, err = helpers.run_cli(
      capsys, f'{DIGITS}:ipc=2', f'--workdir={tmp_path / "run"}',
      '--config.dataset.name=npz', f'--config.dataset.data_dir={path}',
      '--config.dataset.val_size=0')
  helpers.assert_one_error_line(
      code, err, 'Class 1 has 1 training images, but the initial set takes ipc=2')
  assert not (tmp_path / 'run' / 'experts').exists()


def test_stray_label_names_the_label_not_every_empty_class(capsys, tmp_path):
  path = _npz_dataset(tmp_path, [0] * 5 + [1] * 5 + [9])
  code, err = helpers.run_cli(
      capsys, DIGITS, f'--workdir={tmp_path / "run"}',
      '--config.dataset.name=npz', f'--config.dataset.data_dir={path}',
      '--config.dataset.val_size=0')
  helpers.assert_one_error_line(code, err, 'the labels 9 leave 7 classes from 2 on')


def test_damaged_own_synthetic_set_says_it_is_rebuilt(capsys, tmp_path):
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'synthetic.npz').write_bytes(b'PK\x03\x04 truncated')
  code, err = helpers.run_cli(capsys, DIGITS, f'--workdir={tmp_path / "run"}',
                              '--config.mode=evaluate')
  helpers.assert_one_error_line(
      code, err, f'delete it and rerun with --config.mode=all (or distill): it '
      f'is rebuilt from {tmp_path / "run" / "subsets"}')
