"""Distillation backbones behind one interface (base.py); one file each."""

from seqmatch_jax.backbones.base import (REGISTRY, Backbone, Done, Source,
                                         SubsetPlan, backbone_class, create,
                                         default_configs, plan_from_settings)
