"""FTD: flat trajectory distillation (Du et al., CVPR 2023) as a backbone.

FTD is MTT with two changes (official code: AngusDujw/FTD-distillation
`buffer/buffer_FTD.py`, `distill/distill_FTD.py`):
  * its experts are trained with GSAM, a sharpness-aware optimiser, so the
    trajectories the student matches run through flat regions
    (`experts.optimizer=gsam`, training.gsam_direction);
  * an exponential moving average of the synthetic images is kept beside
    them (`post_step`): e <- d e + (1 - d) x after every step, from the
    initial images, no bias correction, never fed back into the matching.
    Evaluation scores the raw and the EMA set each on fresh networks.

Under SeqMatch every subset keeps its own EMA (reset to its initial images)
and the staged experts of subsets k >= 2 are GSAM experts too.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from seqmatch_jax import experts as experts_lib
from seqmatch_jax.backbones import base
from seqmatch_jax.backbones.mtt import MTT, PER_SUBSET
from seqmatch_jax.errors import ConfigError


class FTD(MTT):
  name = 'ftd'
  title = 'FTD'
  config_key = 'ftd'
  per_subset = PER_SUBSET + ('ema_decay',)

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """MTT's keys (its reference defaults) plus FTD's EMA decay (official
    default 0.999; Table 7 rows set 0.9995 / 0.9999 where the paper does)."""
    c = MTT.default_config()
    c.ema_decay = 0.999
    c.per_subset.ema_decay = ()
    return c

  @classmethod
  def validate(cls, config, plans) -> None:
    super().validate(config, plans)
    if config.experts.optimizer != 'gsam':
      raise ConfigError(
          'backbone.name=ftd matches flat (GSAM) expert trajectories; add '
          '--config.experts.optimizer=gsam (rho experts.rho, alpha '
          'experts.alpha), or use backbone.name=mtt for SGD experts.')
    for p in plans:
      if not 0.0 <= p.ema_decay < 1.0:
        raise ConfigError(f'ftd.ema_decay of subset {p.index + 1} must lie in '
                          f'[0, 1), got {p.ema_decay}.')

  def prepare(self, ctx, plan, done):
    if plan.index == 0:  # given experts (experts.dir) must be flat ones
      meta = experts_lib.TrajectoryStore(ctx.experts_dir).metadata
      if meta.get('optimizer', 'sgd') != 'gsam':
        raise ConfigError(
            f'backbone.name=ftd needs GSAM experts, but {ctx.experts_dir} holds '
            f'{meta.get("optimizer", "sgd")} experts; point experts.dir at GSAM '
            'experts or train them with --config.experts.optimizer=gsam.')
    return super().prepare(ctx, plan, done)

  def init_aux(self, plan: base.SubsetPlan, images) -> dict:
    # Own buffers (the step may donate the state); `best_ema` is the EMA at
    # the iterate validation keeps (see keep_best).
    return {'ema': jnp.copy(images), 'best_ema': jnp.copy(images)}

  def post_step(self, plan: base.SubsetPlan, state):
    d = plan.ema_decay
    ema = d * state.aux['ema'] + (1.0 - d) * state.images
    return state.replace(aux=dict(state.aux, ema=ema))

  def keep_best(self, plan: base.SubsetPlan, state):
    return state.replace(aux=dict(state.aux, best_ema=jnp.copy(state.aux['ema'])))
