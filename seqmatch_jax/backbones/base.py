"""The interface of a distillation method: what differs between methods, no more.

A method (MTT, FTD, DM, DC, DSA, IDC, DATM, or your own) is one file in this
package: a `Backbone` subclass, registered by one line in `REGISTRY`
(backbones/__init__.py). The distillation loop (distill.py) and SeqMatch's
subset scan (seqmatch.py) are generic over it. Per subset the loop

  1. builds the subset's `SubsetPlan` (its own settings resolved for the
     subset, plus `RunInfo`: what the run decided outside the method's
     section), checked and completed by `validate`;
  2. `prepare`s a `Source` on the host (e.g. expert trajectories);
  3. `init`s the trainable tree {images, labels, extras, aux} and one
     optimizer per learnable group;
  4. per iteration calls `step` inside one jitted function; the default step
     is one update on `loss`, averaged over the iteration's trajectories, and
     methods with a longer iteration compose theirs from `distill.StepIO`'s
     helpers (several matches, training a network between them, one update
     per class).

Conventions instead of hooks: a learned evaluation step size lives in
`extras['syn_lr']` (else the protocol's lr is used); what a method keeps
beside its images (an EMA) lives in `aux`; the best iterate is a copy of the
whole trainable tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from seqmatch_jax import real_data
from seqmatch_jax.errors import ConfigError
from seqmatch_jax.evaluate import Protocol
from seqmatch_jax.experts import ExpertSpec
from seqmatch_jax.parameterization import Parameterization

Trainable = dict  # {'images', 'labels', 'extras', 'aux'}


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """What a plan records from outside the method's own config section,
  resolved once when the plans are built: a method reads its plan, never the
  config."""
  seed: int
  ipc: int  # images per class of the whole set
  num_subsets: int
  augment: str  # the run's DSA strategy (augment.strategy)
  pix_init: str  # 'real' | 'noise'
  param: Parameterization  # stored images -> training images
  # How networks train on synthetic sets: the final evaluation, and the
  # networks SeqMatch trains on the earlier subsets (epochs: eval.epochs).
  protocol: Protocol
  eval_lr: float  # the protocol's step size (methods that learn none)
  experts: ExpertSpec  # real-data experts (epochs: experts.epochs)
  staged_epochs: int  # real-data epochs of SeqMatch's staged experts
  zca: bool
  image_shape: tuple[int, ...] | None  # None: not known before loading
  # distill.trajectories_per_step: 0 = the method decides in `validate`
  # (`one_trajectory`), else the number of devices.
  trajectories: int = 0


@dataclasses.dataclass(frozen=True)
class SubsetPlan:
  """One subset's hyperparameters: `iterations` and `lr_img` every method
  has; `settings` holds the rest of the method's section resolved for this
  subset (its per-subset tuples picked, 'auto' values decided by
  `validate`), readable as attributes (`plan.syn_steps`)."""
  index: int  # 0-based: subset k is index k - 1
  ipc: int  # images per class of this subset
  ipc_before: int  # images per class of the frozen subsets before it
  iterations: int
  lr_img: float
  settings: dict = dataclasses.field(default_factory=dict)
  run: RunInfo | None = None

  def __getattr__(self, name: str) -> Any:
    settings = self.__dict__.get('settings', {})
    if name in settings:
      return settings[name]
    raise AttributeError(name)

  def resolved(self, **settings) -> 'SubsetPlan':
    """This plan with `settings` set (what `validate` decides)."""
    return dataclasses.replace(self, settings=dict(self.settings, **settings))


@dataclasses.dataclass
class Done:
  """The subsets distilled so far (frozen while the next one learns), in
  stored form, subset-major and class-blocked per subset."""
  images: Any
  labels: Any  # integers [n], or soft labels (logits) [n, C]
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


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each stored image of the matched set (frozen subsets first) sits:
  its class and subset. Static (numpy), known when the step is built."""
  classes: np.ndarray
  subset: np.ndarray
  num_classes: int


@dataclasses.dataclass(frozen=True)
class SynSet:
  """The synthetic set a loss sees: the frozen subsets (under stop_gradient)
  then the trainable one, in stored form, with their labels."""
  images: jax.Array  # stored form
  labels: jax.Array  # integers [n] or soft labels [n, C]
  extras: dict  # the trainable subset's learned scalars (e.g. syn_lr)
  layout: Layout
  param: Parameterization

  def decoded(self) -> tuple[jax.Array, jax.Array]:
    """(training images, labels) of the whole set, in the stored space."""
    return (self.param.decode_images(self.images),
            self.param.decode_labels(self.labels))

  def by_class(self) -> jax.Array:
    """Decoded images grouped by class: [C, per class, H, W, ch]."""
    images, _ = self.decoded()
    classes = np.tile(self.layout.classes, self.param.images_per_stored)
    index = np.argsort(classes, kind='stable').reshape(self.layout.num_classes, -1)
    return images[index]


class Backbone:
  """A distillation method. Override what differs; the defaults are the
  common case (one update per iteration on `loss`)."""
  name: str = ''  # registry name
  title: str = ''  # how results name it, e.g. 'MTT' (default: NAME)
  config_key: str = ''  # its section of the config (default: name)
  needs_experts: bool = False  # mode=experts has work to do
  # How its stored images decode, unless param.name says otherwise (IDC:
  # multi-formation tiles in [0, 1] pixel space).
  parameterization: Parameterization = Parameterization()

  def __init__(self, network):
    self.network = network

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    cls.config_key = cls.config_key or cls.name
    cls.title = cls.title or cls.name.upper()

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """The method's section: scalars, plus `per_subset` with an empty tuple
    for each setting SeqMatch may set per subset (empty = the scalar for
    every subset). `iterations` and `lr_img` are required."""
    c = ml_collections.ConfigDict()
    c.iterations = 1000
    c.lr_img = 1.0
    c.per_subset = ml_collections.ConfigDict({'iterations': (), 'lr_img': ()})
    return c

  @classmethod
  def validate(cls, plans: list[SubsetPlan]) -> list[SubsetPlan]:
    """Checks the method's settings (ConfigError naming the key) and returns
    the plans with its automatic values decided; they are recorded with each
    subset and compared when a run resumes."""
    for p in plans:
      for name in ('iterations', 'lr_img'):
        if getattr(p, name) <= 0:
          raise ConfigError(f'{cls.config_key}.{name} of subset {p.index + 1} '
                            f'must be positive, got {getattr(p, name)}.')
    return plans

  @classmethod
  def protocol(cls, common: Protocol, settings: ml_collections.ConfigDict) -> Protocol:
    """How the method's sets are evaluated (and its staged networks trained):
    the common protocol from `eval.*`, or the method's official one."""
    del settings
    return common

  def prepare(self, ctx, plan: SubsetPlan, done: Done) -> Source:
    """Host-side preparation of subset `plan.index` (e.g. staged experts).
    Default: the real training images by class (`real_data`), which a loss
    samples per class inside the step."""
    del plan, done
    return real_data.RealImagesByClass(ctx.x_train, ctx.y_train, ctx.num_classes)

  def init(self, plan: SubsetPlan, source: Source, images: np.ndarray,
           labels: np.ndarray) -> tuple[Trainable, dict]:
    """(trainable tree, optimizers): the subset's initial stored images and
    integer labels become {images, labels, extras, aux}; one optimizer per
    learnable group (absent groups are not learned). Default: SGD(lr_img,
    momentum 0.5) on the pixels, as every official backbone; fixed labels."""
    del source
    trainable = dict(images=jnp.asarray(images), labels=jnp.asarray(labels),
                     extras={}, aux={})
    return trainable, {'images': optax.sgd(plan.lr_img, momentum=0.5)}

  def loss(self, plan: SubsetPlan, syn: SynSet, inner: Any, key: jax.Array,
           data: Any) -> jax.Array:
    """The matching loss of the whole synthetic set `syn` for one trajectory
    (`inner`: its resource, e.g. an expert window)."""
    raise NotImplementedError

  def step(self, plan: SubsetPlan, trainable: Trainable, opt_state: dict, io):
    """One distillation iteration inside the jitted step: returns
    (trainable, opt_state, metrics). `io` is distill.StepIO."""
    loss_fn = lambda t, inner, key: self.loss(plan, io.synset(t), inner, key, io.data)
    trainable, opt_state, loss, grads = io.matches(
        1, loss_fn, trainable, opt_state, io.resources)
    return trainable, opt_state, io.metrics(loss, grads)


def one_trajectory(plans: list[SubsetPlan]) -> list[SubsetPlan]:
  """One network (or real batch) per iteration unless
  distill.trajectories_per_step says otherwise: the official loops of DM, DC,
  DSA and IDC, whose step size assumes it; more devices then replicate the
  step instead of averaging T gradients."""
  return [p.resolved(trajectories=p.run.trajectories or 1) for p in plans]


def per_subset_names(cls: type[Backbone]) -> tuple[str, ...]:
  """The settings SeqMatch may set per subset: the keys of the method's
  `per_subset` sub-dict."""
  return tuple(cls.default_config().per_subset.keys())
