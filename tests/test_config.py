"""Every config file and variant validates; Table-4 rows are what the paper says."""

import glob
import importlib.util
import os

import pytest

from seqmatch_jax import config_lib, configuration, seqmatch
from seqmatch_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(f for f in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
               if not f.endswith('__init__.py'))


def _load(path):
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('path', FILES, ids=os.path.basename)
@pytest.mark.parametrize('arg', [None, 'ipc=10', 'ipc=50', 'ipc=10,k=1'])
def test_every_config_validates(path, arg):
  config = _load(path).get_config(arg)
  configuration.validate(config)
  plans = seqmatch.subset_plans(config)
  assert sum(p.ipc for p in plans) == config.ipc


def test_table4_cifar10_ipc10():
  c = _load(os.path.join(ROOT, 'configs', 'cifar10.py')).get_config('ipc=10')
  plans = seqmatch.subset_plans(c)
  assert [(p.ipc, p.max_start_epoch, p.syn_steps, p.expert_epochs) for p in plans] \
      == [(5, 20, 30, 2), (5, 10, 80, 3)]
  assert c.mtt.lr_teacher == 0.001 and c.dataset.zca


def test_table4_cifar100_ipc50_and_imagefruit():
  c = _load(os.path.join(ROOT, 'configs', 'cifar100.py')).get_config('ipc=50')
  plans = seqmatch.subset_plans(c)
  assert [p.ipc for p in plans] == [17, 17, 16]
  assert [p.max_start_epoch for p in plans] == [40, 20, 20]
  assert {p.syn_steps for p in plans} == {80} and c.mtt.batch_syn == 125
  f = _load(os.path.join(ROOT, 'configs', 'imagefruit.py')).get_config()
  assert tuple(f.mtt.per_subset.max_start_epoch) == (10, 10) and f.model.depth == 5


def test_variant_argument_errors():
  with pytest.raises(ValueError, match='Unknown config argument'):
    config_lib.parse_arg('ipcc=3', ipc=10)
  with pytest.raises(ValueError, match="ipc must be an integer, got 'ten'"):
    config_lib.parse_arg('ipc=ten', ipc=10)
  with pytest.raises(ValueError, match='zca must be true or false'):
    config_lib.parse_arg('zca=maybe', zca=False)
  assert config_lib.parse_arg('zca=no', zca=True).zca is False


def test_unknown_table_key_is_refused():
  with pytest.raises(ValueError, match="'experts.epoch'.*experts.epochs"):
    config_lib.table_config('digits', None, {10: {'experts.epoch': 5}})


@pytest.mark.parametrize('key, value, match', [
    ('ipc', 0, 'ipc'), ('mode', 'train', 'mode'), ('mtt.lr_lr', 0.0, 'lr_lr'),
    ('model.norm', 'group', 'norm'), ('experts.epochs', 5, 'exceeds'),
    ('augment.strategy', 'color_blur', 'blur'), ('eval.baselines', ('x',), 'baseline'),
])
def test_bad_values(key, value, match):
  c = _load(os.path.join(ROOT, 'configs', 'digits.py')).get_config()
  node = c
  *path, leaf = key.split('.')
  for part in path:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ConfigError, match=match):
    configuration.validate(c)


# -- Each method's own official row (issue 27) ----------------------------------

@pytest.mark.parametrize('dataset', ['cifar10', 'cifar100'])
@pytest.mark.parametrize('name, iterations, lr_img, pix_init', [
    ('dm', 20000, 1.0, 'real'), ('dc', 1000, 0.1, 'noise'), ('dsa', 1000, 0.1, 'real')])
def test_dm_dc_dsa_rows_are_their_official_ones(dataset, name, iterations, lr_img,
                                                pix_init):
  module = _load(os.path.join(ROOT, 'configs', f'{dataset}.py'))
  for ipc, k in ((1, 1), (10, 2), (50, 3)):
    c = module.get_config(f'ipc={ipc},backbone={name}')
    configuration.validate(c)
    plans = seqmatch.subset_plans(c, (32, 32, 3))
    assert not c.dataset.zca and c.distill.pix_init == pix_init
    assert c.augment.strategy == 'color_crop_cutout_flip_scale_rotate'
    assert len(plans) == k and {p.iterations for p in plans} == {iterations}
    assert {p.lr_img for p in plans} == {lr_img}
    assert {p.trajectories for p in plans} == {1}  # one network per iteration
    if name != 'dm':  # DC's get_loops of the whole set's ipc
      loops = {1: (1, 1), 10: (10, 50), 50: (50, 10)}[ipc]
      assert {(p.outer_loop, p.inner_loop) for p in plans} == {loops}


@pytest.mark.parametrize('name', ['dm', 'dc', 'dsa'])
def test_dm_dc_dsa_refuse_zca_unless_asked(name):
  """The MTT row whitens CIFAR; these methods never ran on ZCA data."""
  c = _load(os.path.join(ROOT, 'configs', 'cifar10.py')).get_config('ipc=10')
  c.backbone.name = name
  with pytest.raises(ConfigError, match=f'backbone={name}.*allow_zca'):
    seqmatch.subset_plans(c, (32, 32, 3))
  c['dc' if name == 'dsa' else name].allow_zca = True
  assert len(seqmatch.subset_plans(c, (32, 32, 3))) == 2


def test_trajectories_default_per_method_and_explicit_value_wins():
  c = _load(os.path.join(ROOT, 'configs', 'cifar10.py')).get_config('ipc=10,backbone=idc')
  assert {p.trajectories for p in seqmatch.subset_plans(c, (32, 32, 3))} == {1}
  c.distill.trajectories_per_step = 4
  assert {p.trajectories for p in seqmatch.subset_plans(c, (32, 32, 3))} == {4}
  mtt = _load(os.path.join(ROOT, 'configs', 'cifar10.py')).get_config('ipc=10')
  assert 'trajectories' not in seqmatch.subset_plans(mtt)[0].settings  # per device


def test_seqmatch_mtt_cifar10_ipc50_teacher_lrs_follow_the_official_script():
  c = _load(os.path.join(ROOT, 'configs', 'cifar10.py')).get_config('ipc=50')
  assert [p.lr_teacher for p in seqmatch.subset_plans(c)] == [0.001, 0.01, 0.01]
  plain = _load(os.path.join(ROOT, 'configs', 'cifar10.py')).get_config('ipc=50,k=1')
  assert [p.lr_teacher for p in seqmatch.subset_plans(plain)] == [0.01]
