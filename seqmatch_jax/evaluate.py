"""Evaluation: train fresh networks on a synthetic set, report test accuracy.

A `Protocol` says how a network trains on a synthetic set; it is built once
from the config (`protocol_from_config`: the literature's common protocol of
MTT/SeqMatch, SGD momentum 0.9, weight decay 5e-4, batch 256, `eval.epochs`
epochs with lr x0.1 at the half, DSA on) and a method may replace it with its
own official one (`Backbone.protocol`). Everything here takes a network and a
protocol, never the config. SeqMatch's staged evaluation trains each network
on S_1, then S_1 ∪ S_2, ..., carrying its weights, stage k with lr_k; a plain
set is the one-stage case. Labels are integers or soft labels (logits whose
softmax is the target). Several networks (seeds) run vmapped or one by one
(`Protocol.parallel`); both give the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from seqmatch_jax import files
from seqmatch_jax import parallel
from seqmatch_jax import training
from seqmatch_jax.errors import DataError, Interrupted
from seqmatch_jax.models import Network


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How an evaluation network is trained. The defaults are MTT's (lr x0.1
  at the half, DSA); IDC's (backbones/idc.py) sets `schedule='multistep'`,
  IDC-style per-sample augmentation and CutMix."""
  epochs: int
  batch_size: int = 256
  momentum: float = 0.9
  weight_decay: float = 5e-4
  augment: str = 'color_crop_cutout_flip_scale_rotate'
  parallel: str = 'auto'
  schedule: str = 'half'  # 'half': x0.1 at E/2 | 'multistep': x0.2 at 2E/3, 5E/6
  augment_style: str = 'dsa'  # 'dsa' | 'idc' (augment.DSAParams.style)
  align_corners: bool = True
  cutmix: float = 0.0  # CutMix probability per batch
  trim_short_batch: bool = False  # see training.run_epoch

  def sgd(self) -> training.SGDSpec:
    return training.SGDSpec(batch_size=self.batch_size, momentum=self.momentum,
                            weight_decay=self.weight_decay, augment=self.augment,
                            decay_at_half=self.schedule == 'half',
                            multistep=self.schedule == 'multistep',
                            align_corners=self.align_corners,
                            augment_style=self.augment_style, cutmix=self.cutmix,
                            trim_short_batch=self.trim_short_batch)


def protocol_from_config(config: ml_collections.ConfigDict) -> Protocol:
  """The common protocol from `eval.*` and `augment.strategy` (epochs:
  eval.epochs; other lengths via `dataclasses.replace`)."""
  return Protocol(epochs=config.eval.epochs, batch_size=config.eval.batch_size,
                  momentum=config.eval.momentum,
                  weight_decay=config.eval.weight_decay,
                  augment=config.augment.strategy, parallel=config.eval.parallel,
                  trim_short_batch=config.eval.trim_short_batch)


def stage_sets(images, labels, subset) -> list[tuple[jax.Array, jax.Array]]:
  """Cumulative training sets S_1, S_1∪S_2, ... from per-image subset ids
  (labels: integers [n] or soft labels [n, C])."""
  subset = np.zeros(len(labels), np.int32) if subset is None else np.asarray(subset)
  out = []
  for k in range(int(subset.max()) + 1):
    keep = subset <= k
    out.append((jnp.asarray(images[keep]), jnp.asarray(labels[keep])))
  return out


def train_stages(network: Network, protocol: Protocol, key: jax.Array,
                 lrs: jax.Array, stages, x_eval=None, y_eval=None):
  """A fresh network trained on stages[0], then stages[1], ... (SeqMatch's
  staged protocol; one stage = plain evaluation), carrying its weights.

  Returns (params, state, accuracies on (x_eval, y_eval) after each stage).
  """
  sgd = protocol.sgd()
  params, state = network.init(jax.random.fold_in(key, 0))
  accs = []
  for k, (x, y) in enumerate(stages):
    params, state = training.train_schedule(
        network, sgd, params, state, x, y, jax.random.fold_in(key, k + 1), lrs[k],
        protocol.epochs)
    if x_eval is not None:
      accs.append(training.predict_accuracy(network, params, state, x_eval, y_eval))
  return params, state, accs


@functools.lru_cache(maxsize=8)
def staged_trainer(network: Network, protocol: Protocol):
  """Jitted (key, lrs, stages) -> (params, state) of a fresh network trained
  in stages (SeqMatch's starting networks for subset k >= 2)."""
  return jax.jit(lambda key, lrs, stages: train_stages(
      network, protocol, key, lrs, stages)[:2])


@functools.lru_cache(maxsize=32)
def _compiled_runner(network: Network, protocol: Protocol, num_stages: int,
                     mesh=None):
  """(keys, lrs, stages, x_eval, y_eval) -> accuracies [models, stages].

  Cached so the evaluations inside a distillation run compile once.
  """
  def run(key, lrs, stages, x_eval, y_eval):
    return jnp.stack(train_stages(network, protocol, key, lrs, stages, x_eval,
                                  y_eval)[2])
  return parallel.map_models(run, 2, protocol.parallel, mesh,
                             progress=f'evaluating ({protocol.epochs} epochs/model)')


class _Progress:
  """Per-model accuracies [num_models, num_stages] (NaN: not trained yet) as
  the models of one evaluation finish, the same on every process.

  `check` is map_models' `should_stop`: before each model it merges what has
  finished (across processes: one allgather of every host's finished rows and
  stop flag, so all hosts see the same results and stop at the same model),
  reports new results to `on_progress`, and says whether to stop.
  """

  def __init__(self, accs: np.ndarray, todo: np.ndarray, should_stop, on_progress):
    self.accs = accs
    self.procs = jax.process_count() if parallel.is_multiprocess() else 1
    self.shares = [todo[p::self.procs] for p in range(self.procs)]
    self.mine = self.shares[jax.process_index() if self.procs > 1 else 0]
    self.rounds = len(self.shares[0])  # checks every process makes
    self.should_stop = should_stop
    self.on_progress = on_progress
    self.local: dict[int, np.ndarray] = {}
    self.checks = 0

  def finished(self, i: int, out) -> None:
    """map_models' on_model: model `self.mine[i]` is done (this host)."""
    self.local[int(self.mine[i])] = np.asarray(out, np.float32)

  def _merge(self, flag: bool) -> bool:
    stages = self.accs.shape[1]
    rows = np.full((self.rounds, stages), np.nan, np.float32)
    for j, model in enumerate(self.mine):
      if int(model) in self.local:
        rows[j] = self.local[int(model)]
    payload = np.concatenate([np.float32([flag]), rows.ravel()])
    gathered = parallel.allgather(payload)  # [processes, 1 + rounds * stages]
    changed = False
    for p, share in enumerate(self.shares):
      theirs = gathered[p, 1:].reshape(self.rounds, stages)
      for j, model in enumerate(share):
        if not np.isnan(theirs[j]).any() and np.isnan(self.accs[model]).any():
          self.accs[model] = theirs[j]
          changed = True
    if changed and self.on_progress is not None:
      self.on_progress(self.accs.copy())
    return bool(np.any(gathered[:, 0]))

  def check(self) -> bool:
    self.checks += 1
    return self._merge(self.should_stop is not None and bool(self.should_stop()))

  def finish(self) -> None:
    """The checks a host with a shorter share (or one vmapped program) still
    owes the others, then the last merge."""
    while self.checks < self.rounds:
      if self.check():
        raise Interrupted('stopped between models')
    self._merge(False)


def train_and_score(network: Network, protocol: Protocol, keys: jax.Array,
                    stages: Sequence[tuple[jax.Array, jax.Array]],
                    lrs: jax.Array, x_eval: jax.Array, y_eval: jax.Array,
                    mesh=None, *, should_stop: Callable[[], bool] | None = None,
                    done: np.ndarray | None = None,
                    on_progress: Callable[[np.ndarray], None] | None = None
                    ) -> np.ndarray:
  """Accuracies [num_models, num_stages]; model i uses `keys[i]`. Models run
  one by one or vmapped per `protocol.parallel`, sharded over `mesh` if given.

  Args:
    should_stop: polled before each model (all processes stop at the same
      model); when true, raises `Interrupted` once `on_progress` has seen the
      finished models. In 'vmap' mode the models are one program: a stop
      applies before or after it.
    done: accuracies of models already trained, e.g. by an interrupted run
      (NaN rows: still to train); only the others are trained. Model i's
      numbers depend only on keys[i], so the result is the same either way.
    on_progress: called with the accuracies so far (NaN: not yet) as models
      finish, on every process at the same points.
  """
  n = keys.shape[0]
  lrs = jnp.broadcast_to(jnp.asarray(lrs, jnp.float32), (n, len(stages)))
  accs = np.full((n, len(stages)), np.nan, np.float32)
  if done is not None:
    accs[:] = np.asarray(done, np.float32)
  todo = np.flatnonzero(np.isnan(accs).any(axis=1))
  if not len(todo):
    return accs
  progress = _Progress(accs, todo, should_stop, on_progress)
  if parallel.is_multiprocess():
    # Each process trains its share of the models on its own devices; the
    # accuracies are then gathered, so every process returns all of them.
    mesh = parallel.model_mesh()
  share = progress.mine
  if len(share):
    run = _compiled_runner(network, protocol, len(stages), mesh)
    run(keys[share], lrs[share], tuple(stages), x_eval, y_eval,
        should_stop=progress.check, on_model=progress.finished)
  progress.finish()
  return accs


def summarize(accs: np.ndarray) -> dict[str, Any]:
  """{'mean', 'std', 'per_model'} in percent (population std, as numpy)."""
  accs = 100.0 * np.asarray(accs, np.float64)
  return dict(mean=float(accs.mean()), std=float(accs.std()),
              per_model=[round(float(a), 4) for a in accs])


def evaluate_synthetic(images, labels, lr, network: Network, protocol: Protocol,
                       key: jax.Array, *, x_eval, y_eval, num_models: int,
                       subset=None, mesh=None,
                       should_stop: Callable[[], bool] | None = None,
                       done: np.ndarray | None = None,
                       on_progress: Callable[[np.ndarray], None] | None = None
                       ) -> dict[str, Any]:
  """Trains `num_models` fresh `network`s on (images, labels) with
  `protocol`, in stages when `subset` is given (lr then holds one value per
  subset), and scores them on (x_eval, y_eval). Returns summary dicts: final
  and after each stage. `labels` are integers or soft labels [n, C].

  `should_stop`, `done` and `on_progress` are `train_and_score`'s: stop between
  models (raising `Interrupted`), skip models already trained, see progress.
  """
  images = jnp.asarray(images)
  stages = stage_sets(images, np.asarray(labels), subset)
  lrs = np.atleast_1d(np.asarray(lr, np.float32))
  if lrs.shape[0] not in (1, len(stages)):
    raise DataError(f'{lrs.shape[0]} learning rates for {len(stages)} subsets.')
  lrs = np.broadcast_to(lrs, (len(stages),))
  keys = jax.random.split(key, num_models)
  accs = train_and_score(network, protocol, keys, stages, jnp.asarray(lrs),
                         jnp.asarray(x_eval), jnp.asarray(y_eval), mesh,
                         should_stop=should_stop, done=done,
                         on_progress=on_progress)
  return summarize_stages(accs, lrs)


def summarize_stages(accs: np.ndarray, lrs) -> dict[str, Any]:
  """The result of an evaluation from its accuracies [num_models, num_stages]."""
  out = summarize(accs[:, -1])
  out['stages'] = [summarize(accs[:, k]) for k in range(accs.shape[1])]
  out['lr'] = [float(v) for v in lrs]
  return out


def random_real(x_train, y_train, ipc: int, num_classes: int, seed: int):
  """`ipc` random real training images per class (the anchor baseline)."""
  rng = np.random.default_rng(seed)
  idx = np.concatenate([rng.choice(np.flatnonzero(np.asarray(y_train) == c), ipc,
                                   replace=False) for c in range(num_classes)])
  return np.asarray(x_train)[idx], np.asarray(y_train)[idx]


def describe(protocol: Protocol) -> str:
  """One line naming how a row's networks were trained."""
  augment = protocol.augment or 'no augmentation'
  if protocol.augment and protocol.augment_style == 'idc':
    augment = f'{augment} (IDC style)'
  extra = f', CutMix {protocol.cutmix:g}' if protocol.cutmix else ''
  decay = 'x0.1 at E/2' if protocol.schedule == 'half' else 'x0.2 at 2E/3, 5E/6'
  return (f'{protocol.epochs} epochs, batch {protocol.batch_size}, lr {decay}, '
          f'{augment}{extra}, align_corners={protocol.align_corners}')


def write_results(workdir: str, results: dict[str, Any]) -> None:
  """results.json and a Markdown table (mean ± std per row, and the protocol
  each row was trained with)."""
  files.write_json(os.path.join(workdir, 'results.json'), results, indent=1,
                   sort_keys=True)
  name = results.get('protocol', {}).get('name', '')
  lines = ([f'Evaluation protocol: {name}.', ''] if name else []) + [
      '| set | architecture | accuracy (%) | per stage | protocol |',
      '|---|---|---|---|---|']
  for row_name, per_arch in results.get('rows', {}).items():
    for arch, r in per_arch.items():
      stages = ' → '.join(f"{s['mean']:.2f}" for s in r.get('stages', [])) \
          if len(r.get('stages', [])) > 1 else ''
      lines.append(f"| {row_name} | {arch} | {r['mean']:.2f} ± {r['std']:.2f} | "
                   f"{stages} | {r.get('protocol', '')} |")
  for name, k in results.get('ema_kept', {}).items():
    lines.append(f"\n{name}: kept **{k['kept']}** images ({k['architecture']}: "
                 f"raw {k['raw']:.2f}, EMA {k['ema']:.2f}).")
  files.write_text(os.path.join(workdir, 'results.md'), '\n'.join(lines) + '\n')
