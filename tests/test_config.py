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
