"""FTD: flat trajectory distillation (Du et al., CVPR 2023) as a method.

FTD is MTT with two changes (official code: AngusDujw/FTD-distillation
`buffer/buffer_FTD.py`, `distill/distill_FTD.py`):
  * its experts are trained with GSAM, a sharpness-aware optimiser, so the
    trajectories the student matches run through flat regions
    (`experts.optimizer=gsam`, training.gsam_direction);
  * an exponential moving average of the synthetic images is kept beside
    them (in `aux['ema']`): e <- d e + (1 - d) x after every step, from the
    initial images, no bias correction, never fed back into the matching.
    Evaluation scores the raw and the EMA set each on fresh networks; the
    best iterate keeps its EMA (the whole trainable tree is copied).

Under SeqMatch every subset keeps its own EMA (reset to its initial images)
and the staged experts of subsets k >= 2 are GSAM experts too.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from seqmatch_jax import experts as experts_lib
from seqmatch_jax.backbones.mtt import MTT, PER_SUBSET
from seqmatch_jax.errors import ConfigError


class FTD(MTT):
  name = 'ftd'
  title = 'FTD'
  config_key = 'ftd'

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """MTT's keys (its reference defaults) plus FTD's EMA decay (official
    default 0.999; Table 7 rows set 0.9995 / 0.9999 where the paper does)."""
    c = MTT.default_config()
    c.ema_decay = 0.999
    c.per_subset.ema_decay = ()
    return c

  @classmethod
  def validate(cls, plans):
    plans = super().validate(plans)
    if plans[0].run.experts.optimizer != 'gsam':
      raise ConfigError(
          f'backbone.name={cls.name} matches flat (GSAM) expert trajectories; add '
          '--config.experts.optimizer=gsam (rho experts.rho, alpha '
          f'experts.alpha), or use backbone.name=mtt for SGD experts.')
    for p in plans:
      if not 0.0 <= p.ema_decay < 1.0:
        raise ConfigError(f'{cls.config_key}.ema_decay of subset {p.index + 1} '
                          f'must lie in [0, 1), got {p.ema_decay}.')
    return plans

  def prepare(self, ctx, plan, done):
    if plan.index == 0:  # given experts (experts.dir) must be flat ones
      meta = experts_lib.TrajectoryStore(ctx.experts_dir).metadata
      if meta.get('optimizer', 'sgd') != 'gsam':
        raise ConfigError(
            f'backbone.name={self.name} needs GSAM experts, but {ctx.experts_dir} '
            f'holds {meta.get("optimizer", "sgd")} experts; point experts.dir at '
            'GSAM experts or train them with --config.experts.optimizer=gsam.')
    return super().prepare(ctx, plan, done)

  def init(self, plan, source, images, labels):
    trainable, optimizers = super().init(plan, source, images, labels)
    # Its own buffer: the step may donate the state.
    trainable['aux'] = {'ema': jnp.copy(trainable['images'])}
    return trainable, optimizers

  def step(self, plan, trainable, opt_state, io):
    trainable, opt_state, metrics = super().step(plan, trainable, opt_state, io)
    return ema_update(plan.ema_decay, trainable), opt_state, metrics


def ema_update(decay: float, trainable: dict) -> dict:
  """e <- d e + (1 - d) x on the images after a step (FTD's ModelEmaV2)."""
  ema = decay * trainable['aux']['ema'] + (1.0 - decay) * trainable['images']
  return dict(trainable, aux=dict(trainable['aux'], ema=ema))
