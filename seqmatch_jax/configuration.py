"""Config validation: every bad value ends the program before any compute,
with one readable line naming the key and the fix."""

from __future__ import annotations

import os

import ml_collections

from seqmatch_jax.errors import ConfigError

MODES = ('all', 'experts', 'distill', 'evaluate')
NORMS = ('instance', 'batch', 'layer', 'none')
BASELINES = ('random_real', 'whole')


def _positive(config, *keys: str, allow_zero: bool = False) -> None:
  for key in keys:
    value = config
    for part in key.split('.'):
      value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f'{key} must be a number, got {value!r}.')
    if value < 0 or (value == 0 and not allow_zero):
      raise ConfigError(f'{key} must be {"non-negative" if allow_zero else "positive"}'
                        f', got {value}.')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first problem found."""
  from seqmatch_jax import augment, data, models  # pylint: disable=g-import-not-at-top
  from seqmatch_jax import backbones, config_lib, seqmatch  # pylint: disable=g-import-not-at-top
  if config.mode not in MODES:
    raise ConfigError(f'mode must be one of {"|".join(MODES)}, got {config.mode!r}.')
  if not isinstance(config.ipc, int) or config.ipc < 1:
    raise ConfigError(f'ipc must be an integer >= 1, got {config.ipc!r}.')
  names = data.dataset_names()
  if config.dataset.name not in names:
    raise ConfigError(f'Unknown dataset.name {config.dataset.name!r}; choose one of '
                      f'{", ".join(names)}.')
  if config.model.name not in models.MODEL_NAMES:
    raise ConfigError(f'Unknown model.name {config.model.name!r}; choose one of '
                      f'{", ".join(models.MODEL_NAMES)}.')
  for arch in config.eval.architectures:
    if arch not in models.MODEL_NAMES:
      raise ConfigError(f'Unknown architecture {arch!r} in eval.architectures; '
                        f'choose from {", ".join(models.MODEL_NAMES)}.')
  if config.model.norm not in NORMS:
    raise ConfigError(f'model.norm must be one of {"|".join(NORMS)}, '
                      f'got {config.model.norm!r}.')
  if config.eval.cross_arch_norm not in ('',) + tuple(NORMS):
    raise ConfigError(f'eval.cross_arch_norm must be empty (model.norm) or one of '
                      f'{"|".join(NORMS)}, got {config.eval.cross_arch_norm!r}.')
  if config.model.conv_impl not in ('auto', 'xla', 'im2col'):
    raise ConfigError(f"model.conv_impl must be auto|xla|im2col, got "
                      f"{config.model.conv_impl!r}.")
  for b in config.eval.baselines:
    if b not in BASELINES:
      raise ConfigError(f'Unknown baseline {b!r} in eval.baselines; choose from '
                        f'{", ".join(BASELINES)}.')
  if config.eval.protocol not in ('backbone', 'common'):
    raise ConfigError(f'eval.protocol must be backbone|common, got '
                      f'{config.eval.protocol!r}.')
  if config.eval.parallel not in ('auto', 'vmap', 'sequential'):
    raise ConfigError(f'eval.parallel must be auto|vmap|sequential, got '
                      f'{config.eval.parallel!r}.')
  try:
    augment.validate_strategy(config.augment.strategy)
  except ValueError as e:
    raise ConfigError(f'augment.strategy: {e}') from e
  _positive(config, 'model.width', 'model.depth', 'experts.num', 'experts.epochs',
            'experts.lr', 'experts.batch_size', 'experts.staged_epochs',
            'distill.eval_models', 'distill.eval_epochs', 'eval.lr',
            'eval.num_models', 'eval.epochs', 'eval.batch_size', 'eval.whole_epochs',
            'seqmatch.num_subsets')
  _positive(config, 'experts.momentum', 'experts.per_batch',
            'distill.eval_every', 'distill.checkpoint_every', 'dataset.val_size',
            'distill.trajectories_per_step', 'eval.momentum', 'eval.weight_decay',
            'parallel.num_devices', allow_zero=True)
  if config.experts.optimizer not in ('sgd', 'gsam'):
    raise ConfigError(f'experts.optimizer must be sgd|gsam, got '
                      f'{config.experts.optimizer!r}.')
  _positive(config, 'experts.rho', 'experts.alpha', allow_zero=True)
  if config.distill.pix_init not in ('real', 'noise'):
    raise ConfigError(f"distill.pix_init must be real|noise, got "
                      f"{config.distill.pix_init!r}.")
  # The method checks its own settings on the per-subset plans it builds
  # (which also checks K, the subset sizes and the per-subset tuples).
  backbones.backbone_class(config.backbone.name)  # a clear error if unknown
  try:
    shape = data.peek_image_shape(config.dataset.name, config.dataset.data_dir or None)
  except Exception:  # pylint: disable=broad-except
    shape = None  # the data loader reports its own problems later
  seqmatch.subset_plans(config, shape)
  if config.seqmatch.compare_backbone and config.seqmatch.num_subsets > 1:
    # The plain-backbone comparison reads the scalars the per-subset tuples
    # override: a bad scalar must not wait until that run starts.
    plain = config_lib.clear_subsets(ml_collections.ConfigDict(config.to_dict()))
    seqmatch.subset_plans(plain, shape)
  if config.mode == 'evaluate' and config.eval.synthetic:
    if not os.path.isfile(config.eval.synthetic):
      raise ConfigError(f'eval.synthetic={config.eval.synthetic!r} is not a file; '
                        'give the path of a synthetic.npz.')
