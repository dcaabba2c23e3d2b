"""DATM: difficulty-aligned trajectory matching (Guo et al., ICLR 2024, "Towards
Lossless Dataset Distillation via Difficulty-Aligned Trajectory Matching"),
and SeqMatch-DATM, as a method (official code: NUS-HPC-AI-Lab/DATM
`distill/DATM.py`, `configs/`, `utils/cfg.py`).

DATM is MTT on FTD's flat (GSAM) experts with three changes:

* a widening window of start epochs: at iteration `it` the starts are drawn
  from [min_start_epoch, upper) with upper = current_max_start_epoch +
  floor((max_start_epoch - current_max_start_epoch) it / expansion_end_epoch),
  capped at max_start_epoch (easy, early trajectory segments first;
  `sequential_generation=False` draws from [min, max) throughout);
* learnable soft labels: logits learned with SGD(lr_y, momentum_y) beside the
  images and syn_lr; the student's loss is the cross-entropy with softmax
  targets. Each image's logits start as the mean logits of the expert
  snapshots (at `label_timestamp`) that classify it correctly;
* images start from real images an expert classifies correctly
  (`select_correct`, the official `samples_predicted_correctly`), and an
  iteration whose normalised matching loss exceeds `threshold` changes
  nothing (images, labels, syn_lr and their optimizer states; the iteration
  and key still advance).

SeqMatch-DATM: subset k has its own window (its per-subset T+, current max
and expansion) and the expansion runs over that subset's iterations; subsets
k >= 2 match staged experts trained from networks that learned S_1..S_{k-1}
with their soft labels, and those frozen images and soft labels take part in
every student step without a gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from seqmatch_jax import experts as experts_lib
from seqmatch_jax.backbones import base
from seqmatch_jax.backbones import mtt
from seqmatch_jax.errors import ConfigError

PER_SUBSET = ('iterations', 'lr_img', 'syn_steps', 'expert_epochs',
              'min_start_epoch', 'current_max_start_epoch', 'max_start_epoch',
              'expansion_end_epoch', 'lr_teacher', 'lr_lr', 'lr_y')


def window_upper(plan: base.SubsetPlan, iteration: int) -> int:
  """The exclusive upper bound of iteration `iteration`'s start epochs."""
  if not plan.sequential_generation:
    return plan.max_start_epoch
  grown = plan.current_max_start_epoch + int(
      (plan.max_start_epoch - plan.current_max_start_epoch) * iteration
      / plan.expansion_end_epoch)
  return min(grown, plan.max_start_epoch)


def snapshot_epoch(store: experts_lib.TrajectoryStore, timestamp: int) -> int:
  """`label_timestamp` as an epoch of `store`'s experts (-1: the last)."""
  return store.epochs + 1 + timestamp if timestamp < 0 else timestamp


def expert_logits(network, store: experts_lib.TrajectoryStore, experts: list[int],
                  epoch: int, images) -> np.ndarray:
  """[experts, n, C] logits of each expert's snapshot `epoch` on `images`."""
  apply = jax.jit(lambda p, s, x: network.apply(p, s, x, train=False)[0])
  out = []
  for e in experts:
    params, state = store.load(e, epoch, with_state=True)
    logits = [np.asarray(apply(params, state, images[i:i + 256]))
              for i in range(0, len(images), 256)]
    out.append(np.concatenate(logits))
  return np.stack(out)


def initial_logits(logits: np.ndarray, classes: np.ndarray) -> np.ndarray:
  """Per image, the mean logits of the experts that classify it correctly
  (DATM.py: `correct_logits.sum(0) / num_correct`); an image no expert gets
  right takes the mean over all of them (the official code divides by zero
  there, which its own image selection never reaches)."""
  correct = logits.argmax(-1) == np.asarray(classes)[None]  # [experts, n]
  count = correct.sum(0)
  summed = (logits * correct[..., None]).sum(0)
  mean_correct = summed / np.maximum(count, 1)[:, None]
  return np.where((count > 0)[:, None], mean_correct, logits.mean(0)).astype(np.float32)


def select_correct(network, store: experts_lib.TrajectoryStore, epoch: int,
                   x_train, y_train, per_class: int, num_classes: int,
                   seed: int) -> np.ndarray:
  """Indices [C, per_class] of distinct real images an expert snapshot
  classifies correctly (`samples_predicted_correctly`): each class's images
  in a fixed random order, scanned by the first expert, then by the next one
  while fewer than `per_class` were found, and so on."""
  y = np.asarray(y_train)
  experts = store.experts()
  apply = jax.jit(lambda p, s, x: network.apply(p, s, x, train=False)[0])
  params = {}
  out = np.zeros((num_classes, per_class), np.int64)
  for c in range(num_classes):
    pool = np.random.default_rng([seed, 0xDA7, c]).permutation(np.flatnonzero(y == c))
    found: list[int] = []
    for e in experts:
      if e not in params:
        params[e] = store.load(e, epoch, with_state=True)
      for i in range(0, len(pool), 256):
        rows = pool[i:i + 256]
        pred = np.asarray(apply(*params[e], x_train[rows])).argmax(-1)
        for r in rows[pred == c]:
          if int(r) not in found and len(found) < per_class:
            found.append(int(r))
        if len(found) == per_class:
          break
      if len(found) == per_class:
        break
    if len(found) < per_class:
      raise ConfigError(
          f'Class {c}: the experts classify only {len(found)} of its '
          f'{len(pool)} training images correctly, fewer than the '
          f'{per_class} the initial set takes; lower ipc, train the experts '
          'longer, or set --config.datm.select_correct=False (random real '
          'images, distill.pix_init).')
    out[c] = found
  return out


class DATMWindows(mtt.ExpertWindows):
  """Expert windows whose start epochs come from the subset's widening
  window (the same reproducible draw as MTT's)."""

  def sample(self, iteration, count, mesh=None):
    picks = mtt.sample_picks(self.experts, self.plan, self.seed, iteration, count,
                             window_upper(self.plan, iteration),
                             low=self.plan.min_start_epoch)
    return mtt.load_windows(self.store, picks, self.plan, mesh)


class DATM(mtt.MTT):
  name = 'datm'
  title = 'DATM'
  config_key = 'datm'

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """The official defaults (`utils/cfg.py`); the dataset rows set the
    official `configs/` values."""
    c = ml_collections.ConfigDict()
    c.iterations = 5000
    c.syn_steps = 80
    c.expert_epochs = 2
    c.min_start_epoch = 0
    c.current_max_start_epoch = 20
    c.max_start_epoch = 25
    c.expansion_end_epoch = 3000
    c.sequential_generation = True  # False: starts from [min, max) throughout
    c.lr_img = 1000.0
    c.lr_lr = 1e-5
    c.lr_teacher = 0.01
    c.lr_y = 2.0  # soft labels: SGD(lr_y, momentum_y)
    c.momentum_y = 0.9
    c.threshold = 1.0  # no update when the matching loss exceeds it
    c.label_timestamp = -1  # expert snapshot that initialises labels (-1: last)
    c.select_correct = True  # images an expert classifies correctly
    c.min_syn_lr = 1e-6  # syn_lr is projected onto [min_syn_lr, inf)
    c.batch_syn = 0  # 0 = the size of the subset being distilled
    c.remat = True
    c.eval_batch = 128  # the official evaluation's batch_train
    c.per_subset = ml_collections.ConfigDict({n: () for n in PER_SUBSET})
    return c

  @classmethod
  def validate(cls, plans):
    plans = base.Backbone.validate(plans)
    run = plans[0].run
    if run.experts.optimizer != 'gsam':
      raise ConfigError(
          'backbone.name=datm matches flat (GSAM) expert trajectories as FTD; '
          'add --config.experts.optimizer=gsam, or use backbone.name=mtt for '
          'SGD experts.')
    out = []
    for p in plans:
      where = f'datm.* of subset {p.index + 1}'
      for name in ('syn_steps', 'expert_epochs', 'lr_teacher', 'lr_lr',
                   'expansion_end_epoch'):
        if getattr(p, name) <= 0:
          raise ConfigError(f'datm.{name} of subset {p.index + 1} must be '
                            f'positive, got {getattr(p, name)}.')
      if not 0 <= p.min_start_epoch < min(p.current_max_start_epoch,
                                          p.max_start_epoch):
        raise ConfigError(
            f'{where}: the window needs 0 <= min_start_epoch '
            f'({p.min_start_epoch}) < current_max_start_epoch '
            f'({p.current_max_start_epoch}) and < max_start_epoch '
            f'({p.max_start_epoch}): starts are drawn from [min, upper).')
      if p.current_max_start_epoch > p.max_start_epoch:
        raise ConfigError(f'{where}: current_max_start_epoch '
                          f'{p.current_max_start_epoch} exceeds max_start_epoch '
                          f'{p.max_start_epoch}.')
      horizon = run.experts.epochs if p.index == 0 else run.staged_epochs
      which = 'experts.epochs' if p.index == 0 else 'experts.staged_epochs'
      if p.max_start_epoch - 1 + p.expert_epochs > horizon:
        raise ConfigError(
            f'Subset {p.index + 1}: the last start epoch {p.max_start_epoch - 1} '
            f'+ expert_epochs {p.expert_epochs} exceeds {which}={horizon}; lower '
            f'datm.max_start_epoch (or its per_subset value) or raise {which}.')
      if p.lr_y < 0 or not 0 <= p.momentum_y < 1 or p.threshold <= 0:
        raise ConfigError(f'{where}: need lr_y >= 0, momentum_y in [0, 1) and '
                          f'threshold > 0, got {p.lr_y}, {p.momentum_y}, '
                          f'{p.threshold}.')
      if p.index > 0:
        p = p.resolved(staged=mtt.staged_record(run))
      out.append(p)
    if plans[0].min_syn_lr <= 0 or plans[0].batch_syn < 0 or plans[0].eval_batch < 1:
      raise ConfigError('datm.min_syn_lr and datm.eval_batch must be positive and '
                        'datm.batch_syn >= 0.')
    return out

  @classmethod
  def protocol(cls, common, settings):
    """DATM's evaluation: the common protocol (lr x0.1 at the half, DSA) with
    its batch of 128 (`batch_train`), soft labels and the learned lr."""
    import dataclasses  # pylint: disable=g-import-not-at-top
    return dataclasses.replace(common, batch_size=settings.eval_batch)

  def prepare(self, ctx, plan, done):
    real = experts_lib.TrajectoryStore(ctx.experts_dir)
    if real.metadata.get('optimizer', 'sgd') != 'gsam':
      raise ConfigError(
          f'backbone.name=datm needs GSAM experts, but {ctx.experts_dir} holds '
          f'{real.metadata.get("optimizer", "sgd")} experts; point experts.dir '
          'at GSAM experts or train them with --config.experts.optimizer=gsam.')
    store = real if plan.index == 0 else mtt.staged_experts(ctx, plan, done)
    source = DATMWindows(store, plan, plan.run.seed, plan.max_start_epoch)
    if plan.select_correct and plan.run.pix_init == 'real':
      rows = select_correct(
          self.network, real, snapshot_epoch(real, plan.label_timestamp),
          ctx.x_train, ctx.y_train, plan.ipc_before + plan.ipc, ctx.num_classes,
          plan.run.seed)
      mine = rows[:, plan.ipc_before:plan.ipc_before + plan.ipc].reshape(-1)
      source.initial_images = np.asarray(ctx.x_train)[mine]
    return source

  def init(self, plan, source, images, labels):
    """The images (real ones the experts get right, with `select_correct`),
    soft labels from the experts' logits, and syn_lr; SGD on each: lr_img
    (momentum 0.5), lr_y (momentum_y), lr_lr (momentum 0.5)."""
    images = getattr(source, 'initial_images', images)
    trainable, optimizers = super().init(plan, source, images, labels)
    store = source.store
    logits = expert_logits(self.network, store, source.experts,
                           snapshot_epoch(store, plan.label_timestamp),
                           jnp.asarray(images))
    trainable['labels'] = jnp.asarray(initial_logits(logits, labels))
    optimizers['labels'] = optax.sgd(plan.lr_y, momentum=plan.momentum_y)
    return trainable, optimizers

  def step(self, plan, trainable, opt_state, io):
    """MTT's step on the soft labels too; an iteration whose loss exceeds
    `threshold` keeps the old tree and optimizer states."""
    new, new_opt, metrics = super().step(plan, trainable, opt_state, io)
    skip = metrics['loss'] > plan.threshold
    keep = lambda old, upd: jnp.where(skip, old, upd)
    return (jax.tree.map(keep, trainable, new), jax.tree.map(keep, opt_state, new_opt),
            dict(metrics, skipped=skip.astype(jnp.float32)))


def official_row(*, syn_steps: int, expert_epochs: int, lr_img: float,
                 lr_y: float, batch_syn: int, window: tuple[int, int, int],
                 lr_lr: float, expansion_end: int = 3000, sequential: bool = True,
                 threshold: float = 1.0, select_correct: bool = True,
                 num_subsets: int = 1, iterations: int = 10000) -> dict:
  """A row of DATM's official `configs/<dataset>/ConvIN/IPC<n>.yaml` as
  `datm.*` settings (window: min / current max / max start epoch), on GSAM
  experts of 100 epochs (its README's buffer_FTD.py command: 100 experts,
  rho 0.01, alpha 0.3, lr 0.01, momentum 0) and ZCA, 10,000 iterations.

  SeqMatch-DATM (num_subsets > 1; no published values anywhere): subset 1
  keeps DATM's window; the later subsets match 20-epoch staged experts with
  the window [0, 5 -> 10), expanding over the same iterations."""
  low, current, high = window
  row = {'datm.syn_steps': syn_steps, 'datm.expert_epochs': expert_epochs,
         'datm.lr_img': lr_img, 'datm.lr_y': lr_y, 'datm.batch_syn': batch_syn,
         'datm.min_start_epoch': low,
         'datm.current_max_start_epoch': current if sequential else high,
         'datm.max_start_epoch': high, 'datm.expansion_end_epoch': expansion_end,
         'datm.sequential_generation': sequential, 'datm.threshold': threshold,
         'datm.select_correct': select_correct, 'datm.lr_lr': lr_lr,
         'datm.lr_teacher': 0.01, 'datm.iterations': iterations,
         'dataset.zca': True, 'experts.optimizer': 'gsam', 'experts.num': 100,
         'experts.epochs': 100, 'experts.lr': 0.01, 'experts.momentum': 0.0,
         'experts.rho': 0.01, 'experts.alpha': 0.3,
         'seqmatch.num_subsets': num_subsets}
  if num_subsets > 1:
    later = num_subsets - 1
    row.update({'datm.per_subset.min_start_epoch': (low,) + (0,) * later,
                'datm.per_subset.current_max_start_epoch':
                    (row['datm.current_max_start_epoch'],) + (5,) * later,
                'datm.per_subset.max_start_epoch': (high,) + (10,) * later})
    if not sequential:  # later subsets still widen their own window
      row['datm.sequential_generation'] = True
      row['datm.per_subset.current_max_start_epoch'] = (high,) + (5,) * later
  return row
