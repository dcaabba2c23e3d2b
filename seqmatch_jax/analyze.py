"""The paper's analyses of saved synthetic sets, as PNGs plus the numbers (JSON).

  python -m seqmatch_jax.analyze --config=configs/digits.py --workdir=runs/digits

reads WORKDIR/synthetic.npz and every comparison set next to it
(WORKDIR/*/synthetic.npz, e.g. the plain backbone of `seqmatch.compare_backbone`),
or the sets named by --sets, and writes into WORKDIR/analysis/:

* loss_curves.png / loss_heatmap.png / loss_curves.json (Figures 1 and 4):
  a fresh network per set, trained with the evaluation protocol (staged for
  SeqMatch) in epochs of --loss_iterations SGD steps; after every epoch the
  loss of every real training instance (or a subsample: the JSON says so);
  instances split into easy / hard by k-means on their loss curves.
* coupling.png / coupling.json (Figure 2): ||R(s_i, f_θ0)||_1 of Eq. 4 per
  synthetic image at fresh initialisations θ0, the per-class S+ / S- halves
  by that norm, the test-accuracy gap of networks trained on each half against
  the mean norm difference, and a line per set.
* grids.png, grid_<set>_subset<k>.png, grids.json (Figures 3 and 5): one grid
  per subset, rows = classes, the comparison sets beside them.

  python -m seqmatch_jax.analyze --config=configs/digits.py --k_search=runs/ksearch

instead scores every RUNS/k<K>/synthetic.npz on the validation split and plots
validation accuracy against K (launch/k_search.sh makes those runs).
Bad input ends with one line on stderr and exit code 2, as `seqmatch_jax.main`.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from seqmatch_jax import analysis
from seqmatch_jax import files
from seqmatch_jax import visualize
from seqmatch_jax.configuration import validate as validate_config
from seqmatch_jax.errors import DataError
from seqmatch_jax.errors import UserError
from seqmatch_jax.evaluate import evaluate_synthetic
from seqmatch_jax.synthetic import load as load_synthetic
from seqmatch_jax.evaluate import stage_sets
from seqmatch_jax.pipeline import evaluation_protocol
from seqmatch_jax.pipeline import network_for
from seqmatch_jax.pipeline import prepare_data
from seqmatch_jax.pipeline import PreparedData

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags, defined only when run as a program: the
  module stays importable beside seqmatch_jax.main (both have --config)."""
  config_flags.DEFINE_config_file(
      'config', None, 'The config the sets were made with, e.g. configs/digits.py.',
      lock_config=True)
  flags.DEFINE_string('workdir', None, 'Run directory holding synthetic.npz.')
  flags.DEFINE_list('sets', [], 'Synthetic sets to analyse (default: WORKDIR/'
                    'synthetic.npz and WORKDIR/*/synthetic.npz).')
  flags.DEFINE_list('names', [], 'Display names of --sets, same order.')
  flags.DEFINE_string('out', '', 'Output folder; default WORKDIR/analysis.')
  flags.DEFINE_list('analyses', ['loss', 'coupling', 'grids'],
                    'Which of loss, coupling, grids to run.')
  flags.DEFINE_integer('loss_epochs', 20, 'Epochs of the instance-loss run (split '
                       'equally over the stages of a staged set).')
  flags.DEFINE_integer('loss_iterations', 20, 'SGD iterations per epoch (paper: 20).')
  flags.DEFINE_integer('loss_models', 1, 'Networks per set; their losses are averaged.')
  flags.DEFINE_integer('max_instances', 2000, 'Real training instances tracked (a '
                       'seeded random subsample when the training set is larger).')
  flags.DEFINE_integer('coupling_inits', 4, 'Initialisations θ0 per set (scatter '
                       'points).')
  flags.DEFINE_integer('coupling_models', 2, 'Networks trained on S+ and on S- per θ0.')
  flags.DEFINE_integer('coupling_epochs', 100, 'Epochs per S+/S- network (the '
                       'evaluation protocol otherwise; 0 = eval.epochs).')
  flags.DEFINE_integer('r_max_dims', 1024, 'Images with at most this many input '
                       'dimensions get the exact R norm; larger ones the estimator.')
  flags.DEFINE_integer('r_columns', 256, 'Input dimensions the R-norm estimator samples.')
  flags.DEFINE_integer('r_check_images', 4, 'Images on which the estimator is '
                       'checked against the exact norm.')
  flags.DEFINE_string('k_search', '', 'Folder of k<K>/synthetic.npz runs: score '
                      'them on the validation split and plot accuracy against K.')
  flags.DEFINE_integer('k_search_models', 0, 'Networks per K (0 = eval.num_models).')
  flags.DEFINE_integer('k_search_epochs', 0, 'Epochs per network (0 = eval.epochs).')
  flags.DEFINE_integer('seed', 0, 'PRNG seed of every analysis.')


# ------------------------------------------------------------------ the sets


@dataclasses.dataclass(frozen=True)
class LoadedSet:
  name: str
  path: str
  images: np.ndarray  # model space
  pixels: np.ndarray  # [0, 1]
  labels: np.ndarray
  subset: np.ndarray | None
  lrs: np.ndarray  # one per subset
  lr_source: str  # 'file' (learned or the run's protocol lr) or 'eval.lr'

  @property
  def num_subsets(self) -> int:
    return 1 if self.subset is None else int(self.subset.max()) + 1


def discover_sets(workdir: str) -> list[tuple[str, str]]:
  """WORKDIR/synthetic.npz, then every WORKDIR/<backbone>/synthetic.npz."""
  out = []
  main = os.path.join(workdir, 'synthetic.npz')
  if os.path.exists(main):
    out.append(('', main))
  for path in sorted(glob.glob(os.path.join(workdir, '*', 'synthetic.npz'))):
    out.append((os.path.basename(os.path.dirname(path)).upper(), path))
  if not out:
    raise DataError(f'no synthetic.npz in {workdir} or its subfolders; run '
                    'seqmatch_jax.main there first or pass --sets=PATH.npz.')
  return out


def load_set(name: str, path: str, data: PreparedData,
             config: ml_collections.ConfigDict) -> LoadedSet:
  """A saved set in model space, with one lr per subset (the file's: MTT's
  learned step sizes or the protocol lr the run used; else `eval.lr`)."""
  syn = load_synthetic(path, data.num_classes, data.image_shape,
                       data.preprocessor, config)
  images = np.asarray(syn.images, np.float32)
  pixels = np.clip(np.asarray(data.preprocessor.to_pixels(images)), 0.0, 1.0)
  k = syn.num_subsets
  if syn.lrs is not None:
    lrs, source = np.broadcast_to(syn.lrs, (k,)).astype(np.float32), 'file'
  else:
    lrs, source = np.full((k,), config.eval.lr, np.float32), 'eval.lr'
  if not name:
    name = f'SeqMatch (K={k})' if k > 1 else 'synthetic'
  return LoadedSet(name, path, images, pixels, syn.labels, syn.subset, lrs,
                   source)


def _slug(name: str) -> str:
  return re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_') or 'set'


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


# ------------------------------------------------- Figures 1 and 4: loss curves


def real_instances(data: PreparedData, max_instances: int, seed: int):
  """(x, y, indices, subsampled): the training set, or a seeded subsample."""
  n = int(data.x_train.shape[0])
  if n <= max_instances:
    return data.x_train, data.y_train, np.arange(n), False
  idx = np.sort(np.random.default_rng(seed).choice(n, max_instances, replace=False))
  return data.x_train[idx], data.y_train[idx], idx, True


def loss_analysis(config, data: PreparedData, sets: Sequence[LoadedSet],
                  key: jax.Array, *, epochs: int, iterations: int, models: int,
                  max_instances: int, seed: int) -> dict[str, Any]:
  """Instance loss curves per set ([1 + epochs, N], mean over `models` nets),
  the joint easy/hard split (k-means on all sets' curves side by side, so one
  partition of the real data serves every set) and each set's own split."""
  network = network_for(config, config.model.name, data.num_classes, data.image_shape)
  spec = evaluation_protocol(config).sgd()
  x_real, y_real, idx, subsampled = real_instances(data, max_instances, seed)
  curves, stage_epochs = {}, {}
  for s in sets:
    stages = stage_sets(s.images, s.labels, s.subset)
    per_stage = analysis.split_epochs(epochs, len(stages))
    runs = [analysis.loss_curves(network, spec, jax.random.fold_in(key, m), stages,
                                 s.lrs, per_stage, iterations, x_real, y_real)
            for m in range(models)]
    curves[s.name] = np.mean(runs, 0).T  # [N, 1 + epochs]
    stage_epochs[s.name] = per_stage
  joint_hard = analysis.easy_hard_split(
      np.concatenate([curves[s.name] for s in sets], 1), seed)
  out = dict(
      instances=dict(used=int(len(idx)), train_size=int(data.x_train.shape[0]),
                     subsampled=bool(subsampled)),
      epochs=epochs, iterations_per_epoch=iterations, models_per_set=models,
      joint_split=dict(hard_fraction=float(joint_hard.mean()),
                       easy_fraction=float(1 - joint_hard.mean())),
      sets={})
  for s in sets:
    c = curves[s.name]
    own = analysis.easy_hard_split(c, seed)
    out['sets'][s.name] = dict(
        path=s.path, stage_epochs=stage_epochs[s.name], lrs=s.lrs.tolist(),
        mean_easy=c[~joint_hard].mean(0).tolist() if (~joint_hard).any() else [],
        mean_hard=c[joint_hard].mean(0).tolist() if joint_hard.any() else [],
        mean_all=c.mean(0).tolist(),
        own_split=dict(hard_fraction=float(own.mean()),
                       easy_fraction=float(1 - own.mean())),
        final_mean_easy=float(c[~joint_hard, -1].mean()) if (~joint_hard).any() else None,
        final_mean_hard=float(c[joint_hard, -1].mean()) if joint_hard.any() else None)
  return dict(summary=out, curves=curves, hard=joint_hard)


def plot_losses(result: dict[str, Any], out_dir: str) -> list[str]:
  """Figure 1 (mean loss of easy, dashed, and hard, solid, instances) and
  Figure 4 (per-instance heatmap, hard on top, one panel per set)."""
  plt = _pyplot()
  summary, curves, hard = result['summary'], result['curves'], result['hard']
  names = list(curves)
  inst = summary['instances']
  note = (f"{inst['used']} of {inst['train_size']} training instances (random subsample)"
          if inst['subsampled'] else f"all {inst['used']} training instances")
  split = summary['joint_split']
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for i, name in enumerate(names):
    s = summary['sets'][name]
    color = f'C{i}'
    x = np.arange(len(s['mean_all']))
    if s['mean_hard']:
      ax.plot(x, s['mean_hard'], '-', color=color, label=f'{name}: hard')
    if s['mean_easy']:
      ax.plot(x, s['mean_easy'], '--', color=color, label=f'{name}: easy')
    for b in np.cumsum(s['stage_epochs'])[:-1]:
      ax.axvline(b, color=color, lw=0.6, ls=':')
  ax.set_xlabel(f"epoch ({summary['iterations_per_epoch']} iterations each)")
  ax.set_ylabel('mean loss on real instances')
  ax.set_title(f"easy {100 * split['easy_fraction']:.0f}% / hard "
               f"{100 * split['hard_fraction']:.0f}% (k-means); {note}", fontsize=8)
  ax.legend(fontsize=8)
  fig.tight_layout()
  curves_png = os.path.join(out_dir, 'loss_curves.png')
  fig.savefig(curves_png, dpi=110)
  plt.close(fig)

  # Rows: hard first, each group by mean loss over all sets, descending; the
  # same order in every panel, so rows compare across sets.
  mean = np.mean([curves[n].mean(1) for n in names], 0)
  order = np.lexsort((-mean, ~hard))
  vmax = float(max(np.percentile(curves[n], 99) for n in names))
  fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names) + 0.8, 4.4),
                           squeeze=False)
  for ax, name in zip(axes[0], names):
    im = ax.imshow(curves[name][order], aspect='auto', cmap='Blues', vmin=0.0,
                   vmax=vmax, interpolation='nearest')
    ax.axhline(hard.sum() - 0.5, color='red', lw=0.8)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel('epoch')
  axes[0][0].set_ylabel(f'instance (hard above the red line; {int(hard.sum())} hard)')
  fig.colorbar(im, ax=list(axes[0]), label='loss')
  heatmap_png = os.path.join(out_dir, 'loss_heatmap.png')
  fig.savefig(heatmap_png, dpi=110)
  plt.close(fig)
  return [curves_png, heatmap_png]


# ------------------------------------------------------- Figure 2: coupling


def _r_norm_setup(image_shape, r_max_dims: int, r_columns: int):
  d = int(np.prod(image_shape))
  exact = d <= r_max_dims
  check_columns = min(r_columns, max(1, d // 4)) if exact else min(r_columns, d)
  return d, exact, check_columns


def coupling_analysis(config, data: PreparedData, sets: Sequence[LoadedSet],
                      key: jax.Array, *, inits: int, models: int, epochs: int,
                      r_max_dims: int, r_columns: int,
                      r_check_images: int) -> dict[str, Any]:
  """Per set and θ0 draw: R norms, S+/S- halves, their accuracy gap (test
  split, percentage points) against the mean norm difference; a line per set.

  The norm is exact up to `r_max_dims` input dimensions; beyond, the sampled-
  column estimator with `r_columns` columns. Either way the estimator is
  compared with the exact norm on `r_check_images` images (at `r_columns`
  columns, or d/4 where the exact norm is the one used) and the error reported.
  """
  # The R network differs only in its convolution implementation (forward-
  # differentiable); parameters and outputs are those of the training network.
  xla = ml_collections.ConfigDict(config.to_dict())
  xla.model.conv_impl = 'xla'
  r_net = network_for(xla, config.model.name, data.num_classes, data.image_shape)
  d, exact, check_cols = _r_norm_setup(data.image_shape, r_max_dims, r_columns)
  epochs = epochs or config.eval.epochs
  train_net = network_for(config, config.model.name, data.num_classes,
                          data.image_shape)
  protocol = dataclasses.replace(evaluation_protocol(config), epochs=epochs)
  out = dict(r_norm=dict(method='exact (forward-over-reverse, all input dimensions)'
                         if exact else f'estimator ({r_columns} of {d} input '
                         'dimensions sampled, scaled by d/m; unbiased)',
                         input_dims=d),
             accuracy='test split, percent', epochs=epochs, models=models, sets={})
  rel_errors = []
  for si, s in enumerate(sets):
    points = []
    for i in range(inits):
      k_init, k_cols, k_train = jax.random.split(jax.random.fold_in(key, i), 3)
      params, state = r_net.init(k_init)
      x, y = jnp.asarray(s.images), jnp.asarray(s.labels)
      cols = None if exact else analysis.sample_columns(k_cols, data.image_shape,
                                                         r_columns)
      norms = np.asarray(analysis.r_norms(r_net, params, state, x, y, cols))
      if r_check_images > 0 and i == 0:
        n = min(r_check_images, len(s.labels))
        ref = norms[:n] if exact else np.asarray(
            analysis.r_norms(r_net, params, state, x[:n], y[:n]))
        est = np.asarray(analysis.r_norms(
            r_net, params, state, x[:n], y[:n],
            analysis.sample_columns(jax.random.fold_in(k_cols, 1),
                                    data.image_shape, check_cols)))
        rel_errors += (np.abs(est - ref) / ref).tolist()
      plus, minus = analysis.split_by_norm(norms, s.labels)
      accs = {}
      for half, mask in (('plus', plus), ('minus', minus)):
        subset, lrs = analysis.restage(s.subset, mask, s.lrs)
        r = evaluate_synthetic(s.images[mask], s.labels[mask], lrs, train_net,
                               protocol, k_train, x_eval=data.x_test,
                               y_eval=data.y_test, subset=subset,
                               num_models=models)
        accs[half] = r['mean']
      points.append(dict(
          init=i, norm_diff=float(norms[plus].mean() - norms[minus].mean()),
          mean_norm_plus=float(norms[plus].mean()),
          mean_norm_minus=float(norms[minus].mean()),
          acc_plus=accs['plus'], acc_minus=accs['minus'],
          acc_gap=accs['plus'] - accs['minus']))
      if s.subset is not None:  # where the large-norm half comes from
        points[-1]['plus_per_subset'] = np.bincount(
            s.subset[plus], minlength=s.num_subsets).tolist()
      logging.info('coupling %s θ0 #%d: norm diff %.3g, acc S+ %.2f S- %.2f', s.name,
                   i, points[-1]['norm_diff'], accs['plus'], accs['minus'])
    fit = analysis.linear_fit([p['norm_diff'] for p in points],
                              [p['acc_gap'] for p in points])
    out['sets'][s.name] = dict(path=s.path, points=points, fit=fit,
                               lrs=s.lrs.tolist(), lr_source=s.lr_source)
  out['r_norm']['estimator_check'] = dict(
      columns=check_cols, images=len(rel_errors),
      mean_rel_error=float(np.mean(rel_errors)) if rel_errors else None,
      max_rel_error=float(np.max(rel_errors)) if rel_errors else None)
  return out


def plot_coupling(result: dict[str, Any], out_dir: str) -> str:
  """Figure 2: accuracy gap against mean norm difference, a line per set."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.6, 4.2))
  for i, (name, s) in enumerate(result['sets'].items()):
    x = np.array([p['norm_diff'] for p in s['points']])
    y = np.array([p['acc_gap'] for p in s['points']])
    label = name
    if s['fit']:
      xs = np.linspace(x.min(), x.max(), 2)
      ax.plot(xs, s['fit']['slope'] * xs + s['fit']['intercept'], '-', color=f'C{i}')
      label += f" (slope {s['fit']['slope']:.3g} pp per unit)"
    ax.scatter(x, y, color=f'C{i}', label=label)
  ax.axhline(0.0, color='grey', lw=0.5)
  ax.set_xlabel(r'$E_{S^+}\|R(s,f_{\theta_0})\|_1 - E_{S^-}\|R(s,f_{\theta_0})\|_1$')
  ax.set_ylabel('acc(S+) - acc(S-)  (test, pp)')
  ax.set_title(f"R norm: {result['r_norm']['method'].split(' (')[0]}", fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(out_dir, 'coupling.png')
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ----------------------------------------------- Figures 3 and 5: subset grids


def write_grids(sets: Sequence[LoadedSet], num_classes: int, out_dir: str) -> dict:
  """grid_<set>_subset<k>.png per subset (rows = classes) and grids.png with
  every set's subsets side by side."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  plt = _pyplot()
  panels, files = [], {}
  for s in sets:
    files[s.name] = []
    for k in range(s.num_subsets):
      keep = np.ones(len(s.labels), bool) if s.subset is None else s.subset == k
      path = os.path.join(out_dir, f'grid_{_slug(s.name)}_subset{k + 1}.png')
      visualize.save_grid(path, s.pixels[keep], s.labels[keep], num_classes)
      files[s.name].append(dict(
          file=os.path.basename(path), subset=k + 1,
          images_per_class=int(np.bincount(s.labels[keep], minlength=num_classes).max())))
      title = f'{s.name}: S{k + 1}' if s.num_subsets > 1 else s.name
      panels.append((title, path))
  sizes = [Image.open(p).size for _, p in panels]
  widths = [w for w, _ in sizes]
  height = 4.5  # inches; the width follows the grids' aspect
  fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(
      height * sum(widths) / max(h for _, h in sizes) + 0.4 * len(panels), height),
      gridspec_kw=dict(width_ratios=widths))
  for ax, (title, path) in zip(axes[0], panels):
    img = np.asarray(Image.open(path))
    ax.imshow(img, cmap='gray' if img.ndim == 2 else None, interpolation='nearest')
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  axes[0][0].set_ylabel('class (one row each)')
  fig.tight_layout()
  combined = os.path.join(out_dir, 'grids.png')
  fig.savefig(combined, dpi=110)
  plt.close(fig)
  return dict(combined='grids.png', sets=files)


# ------------------------------------------------------------------ K search


def k_search(config, root: str, key: jax.Array, *, models: int, epochs: int,
             out_dir: str) -> dict[str, Any]:
  """Validation accuracy of every ROOT/k<K>/synthetic.npz, plotted against K."""
  if config.dataset.val_size <= 0:
    raise UserError('the K search scores on the validation split; set '
                    '--config.dataset.val_size=N (as in the K runs).')
  runs = []
  for path in glob.glob(os.path.join(root, 'k*', 'synthetic.npz')):
    m = re.fullmatch(r'k(\d+)', os.path.basename(os.path.dirname(path)))
    if m:
      runs.append((int(m.group(1)), path))
  if not runs:
    raise DataError(f'no k<K>/synthetic.npz under {root}; run launch/k_search.sh '
                    'first.')
  data = prepare_data(config, root)
  out = dict(split='validation', val_size=int(data.x_val.shape[0]),
             models=models or config.eval.num_models,
             epochs=epochs or config.eval.epochs, runs={})
  network = network_for(config, config.model.name, data.num_classes,
                        data.image_shape)
  protocol = dataclasses.replace(evaluation_protocol(config),
                                 epochs=epochs or config.eval.epochs)
  for k, path in sorted(runs):
    s = load_set(f'K={k}', path, data, config)
    r = evaluate_synthetic(s.images, s.labels, s.lrs, network, protocol, key,
                           x_eval=data.x_val, y_eval=data.y_val, subset=s.subset,
                           num_models=models or config.eval.num_models)
    out['runs'][str(k)] = dict(path=path, mean=r['mean'], std=r['std'],
                               per_model=r['per_model'],
                               stages=[st['mean'] for st in r['stages']],
                               lrs=s.lrs.tolist(), lr_source=s.lr_source)
    logging.info('K=%d: validation accuracy %.2f ± %.2f %%', k, r['mean'], r['std'])
  ks = sorted(int(k) for k in out['runs'])
  best = max(ks, key=lambda k: out['runs'][str(k)]['mean'])
  out['best_k'] = best
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5.0, 3.6))
  ax.errorbar(ks, [out['runs'][str(k)]['mean'] for k in ks],
              yerr=[out['runs'][str(k)]['std'] for k in ks], marker='o', capsize=3)
  ax.set_xticks(ks)
  ax.set_xlabel('K (number of subsets)')
  ax.set_ylabel('validation accuracy (%)')
  ax.set_title(f'K search: best K={best}', fontsize=9)
  fig.tight_layout()
  os.makedirs(out_dir, exist_ok=True)
  fig.savefig(os.path.join(out_dir, 'k_search.png'), dpi=110)
  plt.close(fig)
  files.write_json(os.path.join(out_dir, 'k_search.json'), out,
                    indent=1, sort_keys=True)
  return out


# ----------------------------------------------------------------- entry point


def run(config: ml_collections.ConfigDict, workdir: str, *,
        sets: Sequence[str] = (), names: Sequence[str] = (), out_dir: str = '',
        analyses: Sequence[str] = ('loss', 'coupling', 'grids'), loss_epochs: int = 20,
        loss_iterations: int = 20, loss_models: int = 1, max_instances: int = 2000,
        coupling_inits: int = 4, coupling_models: int = 2, coupling_epochs: int = 100,
        r_max_dims: int = 1024, r_columns: int = 256, r_check_images: int = 4,
        seed: int = 0) -> dict[str, Any]:
  """All requested analyses of the sets; returns what the JSON files hold."""
  unknown = set(analyses) - {'loss', 'coupling', 'grids'}
  if unknown:
    raise UserError(f'unknown analyses {sorted(unknown)}; use --analyses='
                    'loss,coupling,grids (or a part of it).')
  if names and len(names) != len(sets):
    raise UserError(f'{len(names)} --names for {len(sets)} --sets; give one each.')
  validate_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  listed = list(zip(names or [''] * len(sets), sets)) if sets else discover_sets(workdir)
  out_dir = out_dir or os.path.join(workdir, 'analysis')
  os.makedirs(out_dir, exist_ok=True)
  data = prepare_data(config, workdir)
  loaded = [load_set(n or ('' if i == 0 else os.path.basename(os.path.dirname(p)).upper()),
                     p, data, config) for i, (n, p) in enumerate(listed)]
  if len({s.name for s in loaded}) != len(loaded):
    raise UserError(f'sets share a name ({[s.name for s in loaded]}); pass --names.')
  key = jax.random.key(seed)
  report: dict[str, Any] = dict(sets={s.name: s.path for s in loaded}, files=[])
  if 'grids' in analyses:
    report['grids'] = write_grids(loaded, data.num_classes, out_dir)
    files.write_json(os.path.join(out_dir, 'grids.json'), report['grids'],
                    indent=1, sort_keys=True)
    report['files'] += ['grids.png', 'grids.json']
  if 'loss' in analyses:
    t0 = time.time()
    res = loss_analysis(config, data, loaded, jax.random.fold_in(key, 1),
                        epochs=loss_epochs, iterations=loss_iterations,
                        models=loss_models, max_instances=max_instances, seed=seed)
    res['summary']['wall_time_s'] = time.time() - t0
    plot_losses(res, out_dir)
    files.write_json(os.path.join(out_dir, 'loss_curves.json'), res['summary'],
                    indent=1, sort_keys=True)
    report['loss'] = res['summary']
    report['files'] += ['loss_curves.png', 'loss_heatmap.png', 'loss_curves.json']
    split = res['summary']['joint_split']
    logging.info('easy/hard split: %.1f%% / %.1f%%', 100 * split['easy_fraction'],
                 100 * split['hard_fraction'])
  if 'coupling' in analyses:
    t0 = time.time()
    res = coupling_analysis(config, data, loaded, jax.random.fold_in(key, 2),
                            inits=coupling_inits, models=coupling_models,
                            epochs=coupling_epochs, r_max_dims=r_max_dims,
                            r_columns=r_columns, r_check_images=r_check_images)
    res['wall_time_s'] = time.time() - t0
    plot_coupling(res, out_dir)
    files.write_json(os.path.join(out_dir, 'coupling.json'), res,
                    indent=1, sort_keys=True)
    report['coupling'] = res
    report['files'] += ['coupling.png', 'coupling.json']
  logging.info('wrote %s to %s', ', '.join(report['files']), out_dir)
  return report


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  """absl parsing, with flag and config-file errors as one line and exit 2."""
  try:
    return FLAGS(argv)
  except SystemExit:
    if any(a.lstrip('-') in ('help', 'helpshort', 'helpfull', '?') for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:
    _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  except Exception as e:  # errors raised while loading the config file
    _fail(f'cannot load the config: {type(e).__name__}: {str(e).splitlines()[0]}')


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; use --flag=value.')
  logging.set_verbosity(logging.INFO)
  try:
    config = FLAGS.config
    if config is None:
      _fail('--config is required, e.g. --config=configs/digits.py.')
    config.mode  # pylint: disable=pointless-statement  (loading errors surface here)
  except SystemExit:
    raise
  except Exception as e:  # pylint: disable=broad-except
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(f'cannot load the config file: {lines[-1] if lines else type(e).__name__}')
  try:
    if FLAGS.k_search:
      root = os.path.abspath(os.path.expanduser(FLAGS.k_search))
      validate_config(config)
      res = k_search(config, root, jax.random.key(FLAGS.seed),
                     models=FLAGS.k_search_models, epochs=FLAGS.k_search_epochs,
                     out_dir=FLAGS.out or os.path.join(root, 'analysis'))
      print('K search (validation accuracy %): ' + '; '.join(
          f"K={k}: {r['mean']:.2f}±{r['std']:.2f}" for k, r in res['runs'].items())
          + f"; best K={res['best_k']}")
      return
    if not FLAGS.workdir:
      _fail('--workdir is required (the run folder holding synthetic.npz).')
    report = run(config, FLAGS.workdir, sets=FLAGS.sets, names=FLAGS.names,
                 out_dir=FLAGS.out, analyses=FLAGS.analyses,
                 loss_epochs=FLAGS.loss_epochs, loss_iterations=FLAGS.loss_iterations,
                 loss_models=FLAGS.loss_models, max_instances=FLAGS.max_instances,
                 coupling_inits=FLAGS.coupling_inits,
                 coupling_models=FLAGS.coupling_models,
                 coupling_epochs=FLAGS.coupling_epochs, r_max_dims=FLAGS.r_max_dims,
                 r_columns=FLAGS.r_columns, r_check_images=FLAGS.r_check_images,
                 seed=FLAGS.seed)
  except UserError as e:
    _fail(str(e))
  if 'loss' in report:
    split = report['loss']['joint_split']
    print(f"easy/hard split: {100 * split['easy_fraction']:.1f}% / "
          f"{100 * split['hard_fraction']:.1f}%")
  if 'coupling' in report:
    print('coupling slopes (pp per unit norm difference): ' + '; '.join(
        f"{n}: {s['fit']['slope']:.4g}" if s['fit'] else f'{n}: n/a'
        for n, s in report['coupling']['sets'].items()))


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
