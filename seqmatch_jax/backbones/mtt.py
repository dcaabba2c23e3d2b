"""MTT: trajectory matching (Cazenavette et al., CVPR 2022) as a method.

Each iteration samples T expert windows (θ_t, θ_{t+M}) from trajectories
trained on real data; the loss unrolls a student from θ_t on the synthetic
set for N steps with a learnable step size and compares where it lands with
θ_{t+M} (matching.py). Under SeqMatch, subset k >= 2 matches its own experts,
which start from networks already trained in stages on S_1..S_{k-1}
(Algorithm 1 line 9, as the official code, shqii1j/seqmatch `seqmatch-mtt/`,
realises it).
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from seqmatch_jax import evaluate as evaluate_lib
from seqmatch_jax import experts as experts_lib
from seqmatch_jax import matching
from seqmatch_jax import parallel
from seqmatch_jax.backbones import base
from seqmatch_jax.errors import CheckpointError, ConfigError, Interrupted
from seqmatch_jax.models import Network

PER_SUBSET = ('iterations', 'lr_img', 'syn_steps', 'expert_epochs',
              'max_start_epoch', 'lr_teacher', 'lr_lr')
START_RULES = ('auto', 'mtt', 'seqmatch')


class MTT(base.Backbone):
  name = 'mtt'
  title = 'MTT'
  config_key = 'mtt'
  needs_experts = True

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """The defaults of the official MTT code (GeorgeCazenavette/mtt-distillation
    `distill.py`)."""
    c = ml_collections.ConfigDict()
    c.iterations = 5000
    c.syn_steps = 20  # N
    c.expert_epochs = 2  # M
    c.max_start_epoch = 20  # T+
    c.lr_img = 1000.0
    c.lr_lr = 1e-5
    c.lr_teacher = 0.01  # initial learnable step size
    c.min_syn_lr = 1e-6  # syn_lr is projected onto [min_syn_lr, inf)
    c.batch_syn = 0  # 0 = the size of the subset being distilled
    c.remat = True  # jax.checkpoint per unrolled step: memory flat in N
    # Start epochs: 'mtt' draws t in [0, T+) (MTT); 'seqmatch' in [0, T+ - M)
    # as the official SeqMatch code (np.random.randint(0, T+ - M)), so T+
    # bounds the target epoch too; 'auto' = seqmatch when K > 1, else mtt.
    c.start_epochs = 'auto'
    c.per_subset = ml_collections.ConfigDict({n: () for n in PER_SUBSET})
    return c

  @classmethod
  def validate(cls, plans):
    plans = super().validate(plans)
    key = cls.config_key
    rule = plans[0].start_epochs
    if rule not in START_RULES:
      raise ConfigError(f"{key}.start_epochs must be auto|mtt|seqmatch, got "
                        f'{rule!r}.')
    if rule == 'auto':
      rule = 'seqmatch' if plans[0].run.num_subsets > 1 else 'mtt'
    out = []
    for p in plans:
      p = p.resolved(start_epochs=rule)
      for name in PER_SUBSET:
        if getattr(p, name) <= 0:
          raise ConfigError(f'{key}.{name} of subset {p.index + 1} must be '
                            f'positive, got {getattr(p, name)}.')
      bound = start_bound(p)
      if bound < 1:
        raise ConfigError(
            f'Subset {p.index + 1}: max_start_epoch {p.max_start_epoch} leaves no '
            f'start epoch before the target: SeqMatch draws starts in [0, T+ - M) '
            f'= [0, {bound}); raise max_start_epoch above expert_epochs '
            f'{p.expert_epochs} (or set --config.{key}.start_epochs=mtt).')
      horizon = p.run.experts.epochs if p.index == 0 else p.run.staged_epochs
      which = 'experts.epochs' if p.index == 0 else 'experts.staged_epochs'
      if bound - 1 + p.expert_epochs > horizon:
        raise ConfigError(
            f'Subset {p.index + 1}: the last start epoch {bound - 1} + '
            f'expert_epochs {p.expert_epochs} exceeds {which}={horizon}; '
            f'lower them or raise {which}.')
      if p.index > 0:  # what trains its staged experts: recorded, compared
        p = p.resolved(staged=staged_record(p.run))
      out.append(p)
    if plans[0].min_syn_lr <= 0:
      raise ConfigError(f'{key}.min_syn_lr must be positive, got '
                        f'{plans[0].min_syn_lr}.')
    if plans[0].batch_syn < 0:
      raise ConfigError(f'{key}.batch_syn must be >= 0, got {plans[0].batch_syn}.')
    return out

  def init(self, plan, source, images, labels):
    """The images and the learnable step size syn_lr (from lr_teacher), each
    with SGD momentum 0.5 (the reference)."""
    trainable, _ = super().init(plan, source, images, labels)
    trainable['extras'] = {'syn_lr': jnp.asarray(plan.lr_teacher, jnp.float32)}
    return trainable, {'images': optax.sgd(plan.lr_img, momentum=0.5),
                       'extras': optax.sgd(plan.lr_lr, momentum=0.5)}

  def batch_syn(self, plan) -> int:
    return plan.batch_syn or plan.ipc * self.network.num_classes

  def loss(self, plan, syn, inner, key, data):
    start, target = inner
    images, labels = syn.decoded()
    params_end = matching.unroll_student(
        self.network, start, images, labels, syn.extras['syn_lr'], key,
        num_steps=plan.syn_steps, batch_size=self.batch_syn(plan),
        augment=plan.run.augment, remat=plan.remat)
    return matching.match_loss(params_end, start, target)

  def step(self, plan, trainable, opt_state, io):
    trainable, opt_state, metrics = super().step(plan, trainable, opt_state, io)
    return project_syn_lr(plan, trainable), opt_state, metrics

  def prepare(self, ctx, plan, done):
    store = (experts_lib.TrajectoryStore(ctx.experts_dir) if plan.index == 0
             else staged_experts(ctx, plan, done))
    return ExpertWindows(store, plan, plan.run.seed, start_bound(plan))


def project_syn_lr(plan, trainable: dict) -> dict:
  """Keeps the step size positive (the reference lets it go negative or
  explode, MTT issues 16/24/31) without changing its dynamics while it is
  positive."""
  extras = dict(trainable['extras'])
  extras['syn_lr'] = jnp.maximum(extras['syn_lr'], plan.min_syn_lr)
  return dict(trainable, extras=extras)


def staged_record(run: base.RunInfo) -> dict:
  """What trains the staged experts of subsets k >= 2: the networks' protocol
  (on S_1..S_{k-1}) and the real-data expert schedule after it."""
  spec = dataclasses.replace(run.experts, epochs=run.staged_epochs)
  return dict(protocol=dataclasses.asdict(run.protocol),
              experts=dataclasses.asdict(spec))


def start_bound(plan: base.SubsetPlan) -> int:
  """Start epochs are drawn from [0, bound): MTT's bound is T+; the official
  SeqMatch code's is T+ - M, for every subset of a SeqMatch run."""
  if plan.start_epochs == 'seqmatch':
    return plan.max_start_epoch - plan.expert_epochs
  return plan.max_start_epoch


class ExpertWindows(base.Source):
  """Samples (θ_t, θ_{t+M}) windows from a fixed list of complete experts."""

  def __init__(self, store: experts_lib.TrajectoryStore, plan: base.SubsetPlan,
               seed: int, bound: int | None = None):
    experts = store.experts()
    wanted = int(store.metadata.get('num_experts', len(experts)))
    if len(experts) < wanted:
      raise CheckpointError(
          f'Only {len(experts)} of {wanted} expert trajectories in {store.path} '
          'are complete; rerun mode=experts (or mode=all) to finish them first.')
    self.bound = plan.max_start_epoch if bound is None else bound
    if self.bound - 1 + plan.expert_epochs > store.epochs:
      raise ConfigError(
          f'Subset {plan.index + 1}: start epochs up to {self.bound - 1} + '
          f'expert_epochs {plan.expert_epochs} exceed the experts\' '
          f'{store.epochs} epochs; lower them or train longer experts.')
    self.store = store
    self.experts = experts[:wanted]  # fixed: resumed runs sample the same windows
    self.plan = plan
    self.seed = seed

  def sample(self, iteration, count, mesh=None):
    picks = sample_picks(self.experts, self.plan, self.seed, iteration, count,
                         self.bound)
    return load_windows(self.store, picks, self.plan, mesh)


def sample_picks(experts: list[int], plan: base.SubsetPlan, seed: int,
                 iteration: int, count: int, bound: int | None = None,
                 low: int = 0) -> list[tuple[int, int]]:
  """(expert id, start epoch in [low, bound)) per trajectory: a pure function
  of (seed, subset, iteration, count), so a resumed run, on any number of
  hosts, samples exactly what the uninterrupted one did."""
  bound = plan.max_start_epoch if bound is None else bound
  rng = np.random.default_rng([seed, plan.index, iteration])
  picks = []
  for _ in range(count):
    e = int(rng.choice(experts))
    t = int(rng.integers(low, bound))
    picks.append((e, t))
  return picks


def load_windows(store: experts_lib.TrajectoryStore,
                 picks: list[tuple[int, int]], plan: base.SubsetPlan, mesh=None):
  """Start and target parameters of `picks`, stacked on a leading axis.

  With a mesh they come back as global arrays split over `data`, and each
  process reads from disk only the windows its own devices use.
  """
  def load(rows):
    stack = lambda trees: jax.tree.map(lambda *x: np.stack(x), *trees)
    starts = [store.load(*picks[r]) for r in rows]
    targets = [store.load(picks[r][0], picks[r][1] + plan.expert_epochs)
               for r in rows]
    return stack(starts), stack(targets)
  if mesh is None:
    return load(range(len(picks)))
  return parallel.shard_from_loader(len(picks), mesh, load)


def staged_init_fn(network: Network, protocol: evaluate_lib.Protocol,
                   stages: list[tuple[jax.Array, jax.Array]],
                   lrs: list[float]) -> experts_lib.InitFn:
  """Starting weights of subset k's experts: a fresh network trained on S_1,
  then S_1 ∪ S_2, ... S_1..S_{k-1} with the evaluation protocol and each
  stage's learned lr (the staged evaluation, carried into the experts)."""
  trainer = evaluate_lib.staged_trainer(network, protocol)
  lrs = jnp.asarray(lrs, jnp.float32)
  return lambda i, key: trainer(key, lrs, tuple(stages))


def staged_experts(ctx, plan: base.SubsetPlan,
                   done: base.Done) -> experts_lib.TrajectoryStore:
  """Subset k+1's experts (k >= 1): built, or finished, in
  WORKDIR/experts_staged/subset_{k+1}."""
  k = plan.index
  run = plan.run
  images, labels, subset = run.param.decode_set(
      done.images, done.labels, done.subset,
      ctx.preprocessor.to_model if ctx.preprocessor else None)
  stages = evaluate_lib.stage_sets(images, labels, subset)
  # Same optimiser as the real-data experts: SeqMatch-FTD's are GSAM too.
  spec = dataclasses.replace(run.experts, epochs=run.staged_epochs)
  subsets = [done.images[done.subset == i] for i in range(k)]
  meta = dict(ctx.expert_metadata, start=f'staged on subsets 1..{k}',
              stage_lrs=[float(v) for v in done.lrs[:k]],
              stages_crc=experts_lib.tree_crc32(subsets),
              stage_protocol=dataclasses.asdict(run.protocol))
  if np.ndim(done.labels) == 2:  # learned soft labels train the stages too
    meta['stage_labels_crc'] = experts_lib.tree_crc32([done.labels])
  path = os.path.join(ctx.workdir, 'experts_staged', f'subset_{k + 1}')
  logging.info('building %d staged experts for subset %d in %s', spec.num, k + 1,
               path)
  store = experts_lib.train_experts(
      ctx.network, spec, path, ctx.x_train, ctx.y_train, ctx.x_test, ctx.y_test,
      jax.random.fold_in(ctx.key, 200 + k), meta,
      init_fn=staged_init_fn(ctx.network, run.protocol, stages, done.lrs[:k]),
      expert_ids=parallel.process_share(spec.num),
      should_stop=ctx.should_stop, writer=ctx.writer, mesh=ctx.model_mesh,
      progress=ctx.progress)
  parallel.barrier(f'staged experts {ctx.workdir} {k + 1}')
  if parallel.agree(len(store.experts()) < spec.num):
    raise Interrupted(f'stopped while training staged experts for subset {k + 1}')
  return store
