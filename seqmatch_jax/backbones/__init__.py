"""Distillation methods ("backbones" of SeqMatch), one file each, behind the
interface in base.py; the registry that names them.

Adding a method: write `backbones/<name>.py` with a `base.Backbone` subclass
and add one line to `REGISTRY` (BUILD_NOTES.md, "How to add a method").
"""

from __future__ import annotations

import importlib

import ml_collections

from seqmatch_jax.backbones.base import (Backbone, Done, Layout, RunInfo, Source,
                                         SubsetPlan, SynSet, per_subset_names)
from seqmatch_jax.errors import ConfigError

# name -> 'module:Class'. DSA is DC with siamese augmentation (same class).
REGISTRY = {
    'mtt': 'seqmatch_jax.backbones.mtt:MTT',
    'ftd': 'seqmatch_jax.backbones.ftd:FTD',
    'dm': 'seqmatch_jax.backbones.dm:DM',
    'dc': 'seqmatch_jax.backbones.dc:DC',
    'dsa': 'seqmatch_jax.backbones.dc:DSA',
    'idc': 'seqmatch_jax.backbones.idc:IDC',
    'datm': 'seqmatch_jax.backbones.datm:DATM',
}


def backbone_class(name: str) -> type[Backbone]:
  if name not in REGISTRY:
    raise ConfigError(f'Unknown backbone.name {name!r}; choose one of '
                      f'{", ".join(REGISTRY)}.')
  module, cls = REGISTRY[name].split(':')
  return getattr(importlib.import_module(module), cls)


def create(config: ml_collections.ConfigDict, network) -> Backbone:
  return backbone_class(config.backbone.name)(network)


def default_configs() -> dict[str, ml_collections.ConfigDict]:
  """Each method's section, keyed by its config key (shared keys once)."""
  out = {}
  for name in REGISTRY:
    cls = backbone_class(name)
    out.setdefault(cls.config_key, cls.default_config())
  return out


__all__ = ['REGISTRY', 'Backbone', 'Done', 'Layout', 'RunInfo', 'Source',
           'SubsetPlan', 'SynSet', 'backbone_class', 'create', 'default_configs',
           'per_subset_names']
