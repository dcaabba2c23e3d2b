"""The interface every distillation backbone implements, and their registry.

A backbone (MTT, DM, DC, DSA, ...) is one file in this package: a subclass of
`Backbone` plus one line in `REGISTRY`. The distillation loop (distill.py) and
SeqMatch's subset scan (seqmatch.py) are generic over it; they never branch on
which backbone runs. Per distillation iteration the loop

  1. asks the subset's `Source` (built by `prepare`, on the host) for T
     resources: expert windows for MTT, nothing for DM/DC (their random
     networks and real batches are drawn inside the jitted step);
  2. in one jitted step, per trajectory: `init_inner` (e.g. a fresh network),
     then `matches(plan)` times: the loss `loss(images_all, ...)` of the
     trainable images with the frozen earlier subsets concatenated in front
     under `stop_gradient`, its gradient averaged over the T trajectories, one
     optax step on the images (and the backbone's learnable `extras`, e.g.
     MTT's step size) -- or one step per class when `step_per_class` -- and,
     between matches, `net_update` (DC trains its network on the synthetic
     set);
  3. `post_step` on the new state (e.g. an EMA of the images); when in-run
     validation keeps a new best set, `keep_best` stores in `aux` what must
     travel with it (FTD: that iterate's EMA).

Evaluation trains each stage with `eval_lr(extras)`: the learned step size for
MTT, the protocol's `eval.lr` for the others.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from seqmatch_jax.errors import ConfigError

Params = Any

# name -> 'module:Class'. DSA is DC with siamese augmentation (same class).
REGISTRY = {
    'mtt': 'seqmatch_jax.backbones.mtt:MTT',
    'ftd': 'seqmatch_jax.backbones.ftd:FTD',
    'dm': 'seqmatch_jax.backbones.dm:DM',
    'dc': 'seqmatch_jax.backbones.dc:DC',
    'dsa': 'seqmatch_jax.backbones.dc:DSA',
    'idc': 'seqmatch_jax.backbones.idc:IDC',
}


@dataclasses.dataclass(frozen=True)
class SubsetPlan:
  """The hyperparameters of one subset.

  `iterations` and `lr_img` every backbone has; `settings` holds the rest of
  the backbone's sub-dict with its per-subset lists resolved for this subset,
  readable as attributes (`plan.syn_steps`).
  """
  index: int  # 0-based: subset k is index k - 1
  ipc: int  # images per class of this subset
  ipc_before: int  # images per class of the frozen subsets before it
  iterations: int
  lr_img: float
  settings: dict = dataclasses.field(default_factory=dict)

  def __getattr__(self, name: str) -> Any:
    settings = self.__dict__.get('settings', {})
    if name in settings:
      return settings[name]
    raise AttributeError(name)


def plan_from_settings(node: ml_collections.ConfigDict, *, index: int = 0,
                       ipc: int = 1, ipc_before: int = 0, **overrides) -> SubsetPlan:
  """A plan from a backbone's sub-dict (its scalars) and `overrides`: for
  experiments, tests and benchmarks that drive one subset by hand."""
  values = dict(node.to_dict(), **overrides)
  values.pop('per_subset', None)
  return SubsetPlan(index=index, ipc=ipc, ipc_before=ipc_before,
                    iterations=int(values.pop('iterations')),
                    lr_img=float(values.pop('lr_img')), settings=values)


@dataclasses.dataclass
class Done:
  """The subsets distilled so far (frozen while the next one learns)."""
  images: Any  # stored form (model space; IDC: [0,1] pixels), subset-major,
  # class-blocked per subset
  labels: Any
  subset: Any
  lrs: list[float]


class Source:
  """What a subset's distillation draws from, prepared on the host.

  `data` is a pytree of arrays every step reads (replicated on every device),
  e.g. the real images grouped by class; `sample` gives the iteration's T
  resources, stacked on a leading axis (split over the devices), or None.
  """
  data: Any = None

  def sample(self, iteration: int, count: int, mesh=None) -> Any:
    del iteration, count, mesh
    return None


class Backbone:
  """Defaults for every hook; a backbone overrides what differs."""
  name: str = ''  # registry name
  title: str = ''  # how results and labels name it, e.g. 'MTT'
  config_key: str = ''  # its sub-dict of the config
  per_subset: tuple[str, ...] = ('iterations', 'lr_img')  # SeqMatch lists
  learned_lr: bool = False  # evaluation uses a learned step size
  needs_experts: bool = False  # mode=experts has work to do
  has_net_update: bool = False  # net_update runs between matches

  def __init__(self, config: ml_collections.ConfigDict, network):
    self.config = config
    self.network = network

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """The backbone's sub-dict: scalars, plus `per_subset` with an empty
    tuple for each name in `per_subset` (empty = the scalar for every
    subset)."""
    raise NotImplementedError

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict,
               plans: list[SubsetPlan]) -> None:
    """Raises ConfigError for a bad value of the backbone's own settings."""
    for p in plans:
      for name in ('iterations', 'lr_img'):
        if getattr(p, name) <= 0:
          raise ConfigError(f'{cls.config_key}.{name} of subset {p.index + 1} '
                            f'must be positive, got {getattr(p, name)}.')

  # -- state ----------------------------------------------------------------
  def init_extras(self, plan: SubsetPlan) -> dict:
    """Learnable scalars besides the images (MTT: the step size)."""
    return {}

  def optimizers(self, plan: SubsetPlan) -> tuple[optax.GradientTransformation,
                                                  optax.GradientTransformation]:
    """(images, extras) optimizers: SGD with momentum 0.5 on the pixels, as
    every official backbone."""
    return optax.sgd(plan.lr_img, momentum=0.5), optax.identity()

  def project_extras(self, extras: dict, plan: SubsetPlan) -> dict:
    return extras

  def init_aux(self, plan: SubsetPlan, images: jax.Array) -> dict:
    """Extra checkpointed state a `post_step` keeps (e.g. an image EMA)."""
    return {}

  def post_step(self, plan: SubsetPlan, state):
    return state

  def keep_best(self, plan: SubsetPlan, state):
    """Called when validation picks `state` as the best so far: keeps in
    `aux` what must travel with the best images (FTD: their EMA)."""
    return state

  @classmethod
  def eval_protocol(cls, config: ml_collections.ConfigDict, epochs: int):
    """How sets of this backbone are evaluated (and, for SeqMatch, how
    networks learn the earlier subsets): MTT's protocol from `eval.*`."""
    from seqmatch_jax import evaluate  # pylint: disable=g-import-not-at-top
    return evaluate.Protocol(epochs=epochs, batch_size=config.eval.batch_size,
                             momentum=config.eval.momentum,
                             weight_decay=config.eval.weight_decay,
                             augment=config.augment.strategy,
                             parallel=config.eval.parallel,
                             trim_short_batch=config.eval.trim_short_batch)

  def initial_images(self, key: jax.Array, ctx, sizes: list[int]) -> np.ndarray:
    """The whole trainable set at iteration 0 (Algorithm 1 line 1), in the
    backbone's stored form, laid out as `seqmatch.subset_layout`."""
    from seqmatch_jax import seqmatch  # pylint: disable=g-import-not-at-top
    return seqmatch.initial_images(key, ctx.x_train, ctx.y_train, sizes,
                                   ctx.num_classes, self.config.distill.pix_init)

  def decode(self, images, labels, subset, preprocessor=None):
    """(model-space training images, labels, subset ids) of a stored set:
    what evaluation trains on. The identity for every backbone that stores
    model-space images (IDC stores [0,1] tiles that decode to several)."""
    return images, labels, subset

  def eval_lr(self, extras: dict) -> float:
    """The step size evaluation trains this subset's stage with."""
    return float(self.config.eval.lr)

  # -- per iteration ----------------------------------------------------------
  def prepare(self, ctx, plan: SubsetPlan, done: Done) -> Source:
    """Host-side preparation of subset `plan.index` (e.g. staged experts)."""
    raise NotImplementedError

  def matches(self, plan: SubsetPlan) -> int:
    """Image updates per iteration (DC: its outer loop)."""
    return 1

  def step_per_class(self, plan: SubsetPlan) -> bool:
    """One image step per class (IDC) instead of one on the summed loss."""
    return False

  def init_inner(self, plan: SubsetPlan, resource: Any, key: jax.Array,
                 data: Any) -> Any:
    """Per-trajectory state at the start of an iteration (e.g. a fresh
    network); MTT's is its expert window."""
    return resource

  def loss(self, plan: SubsetPlan, images: jax.Array, labels: jax.Array,
           extras: dict, inner: Any, key: jax.Array, data: Any,
           class_index: jax.Array | None = None) -> jax.Array:
    """The matching loss of the whole synthetic set `images` (frozen subsets
    first, already under stop_gradient) for one trajectory; with
    `class_index`, the loss of that class alone."""
    raise NotImplementedError

  def net_update(self, plan: SubsetPlan, inner: Any, images: jax.Array,
                 labels: jax.Array, key: jax.Array, data: Any) -> Any:
    """Between two matches (DC: train the network on the synthetic set)."""
    return inner


def backbone_class(name: str) -> type[Backbone]:
  if name not in REGISTRY:
    raise ConfigError(f'Unknown backbone.name {name!r}; choose one of '
                      f'{", ".join(REGISTRY)}.')
  module, cls = REGISTRY[name].split(':')
  return getattr(importlib.import_module(module), cls)


def create(config: ml_collections.ConfigDict, network) -> Backbone:
  return backbone_class(config.backbone.name)(config, network)


def default_configs() -> dict[str, ml_collections.ConfigDict]:
  """Each backbone's sub-dict, keyed by its config key (shared keys once)."""
  out = {}
  for name in REGISTRY:
    cls = backbone_class(name)
    out.setdefault(cls.config_key, cls.default_config())
  return out


def settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The chosen backbone's sub-dict."""
  return config[backbone_class(config.backbone.name).config_key]


class RealImagesByClass(Source):
  """The real training images grouped by class, for backbones that compare
  per-class statistics of real and synthetic batches inside the step (DM,
  DC/DSA). `data`: the images, an index table [C, max class size] with each
  class's count, and `syn_index` [C, images per class] locating each class
  in the synthetic set (frozen subsets first, then the trainable one)."""

  def __init__(self, x_train, y_train, syn_labels, num_classes: int):
    y = np.asarray(y_train)
    rows = [np.flatnonzero(y == c) for c in range(num_classes)]
    if min(len(r) for r in rows) == 0:
      raise ConfigError('Every class needs real training images; class '
                        f'{[c for c, r in enumerate(rows) if not len(r)][0]} has none.')
    width = max(len(r) for r in rows)
    index = np.zeros((num_classes, width), np.int32)
    for c, r in enumerate(rows):
      index[c, :len(r)] = r
    syn_labels = np.asarray(syn_labels)
    syn_index = np.argsort(syn_labels, kind='stable').reshape(num_classes, -1)
    self.data = dict(x=x_train, index=jnp.asarray(index),
                     count=jnp.asarray([len(r) for r in rows], jnp.int32),
                     syn_index=jnp.asarray(syn_index, jnp.int32))


def sample_class_batches(key: jax.Array, data: dict, batch: int):
  """Per class, `batch` distinct random real images (all of a class that has
  fewer: the rest is masked, as the official code takes what there is).
  Returns (images [C, batch, H, W, ch], mask [C, batch])."""
  index, count = data['index'], data['count']
  batch = min(batch, index.shape[1])
  u = jax.random.uniform(key, index.shape)
  u = jnp.where(jnp.arange(index.shape[1])[None] < count[:, None], u, 2.0)
  rows = jnp.take_along_axis(index, jnp.argsort(u, axis=1)[:, :batch], 1)
  mask = (jnp.arange(batch)[None] < count[:, None]).astype(jnp.float32)
  return data['x'][rows], mask


def synthetic_by_class(images: jax.Array, data: dict) -> jax.Array:
  """The synthetic set as [C, images per class, H, W, ch]."""
  return images[data['syn_index']]


class RealDataBackbone(Backbone):
  """Backbones that compare real and synthetic batches class by class on a
  fresh random network each iteration (DM, DC/DSA)."""

  def prepare(self, ctx, plan, done):
    labels = np.concatenate([np.asarray(done.labels, np.int32),
                             np.repeat(np.arange(ctx.num_classes), plan.ipc)])
    return RealImagesByClass(ctx.x_train, ctx.y_train, labels, ctx.num_classes)

  def init_inner(self, plan, resource, key, data):
    return self.network.init(key)  # a fresh random network per iteration

  def class_batches(self, plan, images, key, data):
    """(real [C, B, ...], its mask [C, B], synthetic [C, n, ...], one
    augmentation key per class) for one match."""
    real_key, aug_key = jax.random.split(key)
    real, mask = sample_class_batches(real_key, data, plan.batch_real)
    syn = synthetic_by_class(images, data)
    return real, mask, syn, jax.random.split(aug_key, real.shape[0])

  @staticmethod
  def over_classes(one_class, num_classes: int, class_index=None) -> jax.Array:
    """`one_class(c)` for `class_index`, or summed over every class (in turn:
    all classes at once would hold C real batches' activations)."""
    if class_index is not None:
      return one_class(class_index)
    return jnp.sum(jax.lax.map(one_class, jnp.arange(num_classes)))
