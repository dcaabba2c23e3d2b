"""The whole job: experts -> SeqMatch distillation -> evaluation, by `mode`.

`run(config, workdir)` is what `main.py` calls and what a notebook can call.
Every stage is resumable from the workdir: rerunning the same command skips
finished work and continues unfinished work where its checkpoint left it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from seqmatch_jax import backbones
from seqmatch_jax import config_lib
from seqmatch_jax import configuration
from seqmatch_jax import data as data_lib
from seqmatch_jax import evaluate as evaluate_lib
from seqmatch_jax import experts as experts_lib
from seqmatch_jax import files
from seqmatch_jax import parallel
from seqmatch_jax import seqmatch
from seqmatch_jax import synthetic
from seqmatch_jax import visualize
from seqmatch_jax.errors import Interrupted
from seqmatch_jax.models import check_image_size, create_network


@dataclasses.dataclass
class PreparedData:
  """A dataset in model space (normalised / ZCA-whitened), ready to train on."""
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  class_names: tuple[str, ...]
  x_train: jax.Array
  y_train: jax.Array
  x_val: jax.Array
  y_val: jax.Array
  x_test: jax.Array
  y_test: jax.Array
  preprocessor: Any


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> PreparedData:
  ds = data_lib.load_dataset(config.dataset.name, config.dataset.data_dir or None)
  ds, (x_val, y_val) = data_lib.split_validation(ds, config.dataset.val_size,
                                                 config.seed)
  cache = config.dataset.cache_dir or os.path.join(workdir, 'cache')
  pre = data_lib.fit_preprocessor(ds, config.dataset.zca, cache_dir=cache)
  to = lambda x: jnp.asarray(pre.to_model(np.asarray(x, np.float32)), jnp.float32)
  return PreparedData(
      name=ds.name, num_classes=ds.num_classes, image_shape=ds.image_shape,
      class_names=ds.class_names, x_train=to(ds.x_train),
      y_train=jnp.asarray(ds.y_train, jnp.int32), x_val=to(x_val),
      y_val=jnp.asarray(y_val, jnp.int32), x_test=to(ds.x_test),
      y_test=jnp.asarray(ds.y_test, jnp.int32), preprocessor=pre)


class StopFlag:
  """Set by SIGTERM/SIGINT; long loops poll it, save, and stop cleanly."""

  def __init__(self):
    self.raised = False

  def __call__(self) -> bool:
    return self.raised

  @contextlib.contextmanager
  def installed(self):
    def handler(signum, frame):
      if self.raised:  # second signal: give up at once
        raise KeyboardInterrupt
      logging.warning('signal %d: finishing the current step, saving, stopping', signum)
      self.raised = True
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
      yield self
    finally:
      for s, h in old.items():
        signal.signal(s, h)


def _writer(workdir: str):
  if not parallel.is_main_process():
    return None
  from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  return SummaryWriter(os.path.join(workdir, 'tensorboard'))


def expert_metadata(config, data: PreparedData) -> dict:
  return dict(dataset=data.name, image_shape=list(data.image_shape),
              num_classes=data.num_classes, zca=bool(config.dataset.zca),
              seed=config.seed, start='init',
              model=dict(name=config.model.name, width=config.model.width,
                         depth=config.model.depth, norm=config.model.norm),
              val_size=config.dataset.val_size)


def experts_dir(config, workdir: str) -> str:
  return os.path.abspath(os.path.expanduser(config.experts.dir or
                                            os.path.join(workdir, 'experts')))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """Validates, then runs the stages `config.mode` asks for."""
  configuration.validate(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))  # Orbax needs absolute paths
  parallel.maybe_initialize_distributed(
      config.parallel.distributed, config.parallel.coordinator_address,
      config.parallel.num_processes, config.parallel.process_id)
  if not parallel.is_main_process():
    logging.set_verbosity(logging.WARNING)  # process 0 alone logs progress
  os.makedirs(workdir, exist_ok=True)
  data = prepare_data(config, workdir)
  check_image_size(config.model.name, data.image_shape, config.model.depth)
  if config.mode in ('all', 'distill'):
    for tag, cfg in distillation_runs(config):
      seqmatch.check_finished_work(cfg, os.path.join(workdir, tag))
  # Only now is the run known to start: a refused run leaves config.json alone.
  parallel.main_only(lambda: write_config(config, workdir), 'config.json')
  network = create_network(config.model.name, data.num_classes, data.image_shape,
                           width=config.model.width, depth=config.model.depth,
                           norm=config.model.norm, conv_impl=config.model.conv_impl)
  key = jax.random.key(config.seed)
  stop = StopFlag()
  writer = _writer(workdir)
  results = None
  try:
    with stop.installed():
      needs_experts = backbones.backbone_class(config.backbone.name).needs_experts
      if config.mode in ('all', 'experts') and needs_experts:
        train_real_experts(config, workdir, data, network, key, stop, writer)
      elif config.mode == 'experts':
        logging.info('backbone %s trains no experts: nothing to do',
                     config.backbone.name)
      if config.mode in ('all', 'distill'):
        distill(config, workdir, data, network, key, stop, writer)
      if config.mode in ('all', 'evaluate'):
        results = evaluate(config, workdir, data, key)
  finally:
    if writer is not None:
      writer.close()
  return results


def train_real_experts(config, workdir, data, network, key, stop, writer):
  spec = experts_lib.spec_from_config(config, config.experts.epochs)
  path = experts_dir(config, workdir)
  logging.info('training %d experts x %d epochs (%s) in %s', spec.num, spec.epochs,
               spec.optimizer, path)
  store = experts_lib.train_experts(
      network, spec, path, data.x_train, data.y_train, data.x_test, data.y_test,
      jax.random.fold_in(key, 0), expert_metadata(config, data),
      expert_ids=parallel.process_share(spec.num), should_stop=stop,
      writer=writer, mesh=parallel.model_mesh(config.parallel.num_devices),
      progress=parallel.is_main_process())
  parallel.barrier(f'experts {path}')  # every host's share is on disk
  if parallel.agree(len(store.experts()) < spec.num):
    raise Interrupted('stopped while training experts')
  accs = [store.test_accuracy(i).get(spec.epochs, float('nan')) for i in store.experts()]
  logging.info('experts done: final test accuracy %.4f ± %.4f', np.mean(accs),
               np.std(accs))
  return store


def _context(config, workdir, data, network, key, stop, writer, mesh, tag=''):
  def on_eval(k, images_model, it):
    if not parallel.is_main_process():
      return
    sizes = [p.ipc for p in seqmatch.subset_plans(config)][:k + 1]
    labels, _ = seqmatch.subset_layout(sizes, data.num_classes)
    path = os.path.join(workdir, tag, 'images', f'subset{k + 1}_it{it:06d}.png')
    try:  # a progress picture is not worth stopping (or desynchronising) a run
      os.makedirs(os.path.dirname(path), exist_ok=True)
      visualize.save_grid(path, data.preprocessor.to_pixels(images_model), labels,
                          data.num_classes)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('could not write %s: %s', path, e)
  return seqmatch.Context(
      config=config, workdir=workdir, network=network, x_train=data.x_train,
      y_train=data.y_train, x_test=data.x_test, y_test=data.y_test,
      x_val=data.x_val, y_val=data.y_val, num_classes=data.num_classes,
      experts_dir=experts_dir(config, workdir),
      expert_metadata=expert_metadata(config, data), key=jax.random.fold_in(key, 1),
      mesh=mesh, should_stop=stop, writer=writer, on_eval=on_eval,
      progress=parallel.is_main_process())


def plain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The same run with the plain backbone: one subset, its scalar settings."""
  return config_lib.clear_subsets(ml_collections.ConfigDict(config.to_dict()))


def set_names(config) -> tuple[str, str]:
  """(this run's set, the plain-backbone comparison), as results name them."""
  title = backbones.backbone_class(config.backbone.name).title
  k = config.seqmatch.num_subsets
  return (f'SeqMatch-{title} (K={k})' if k > 1 else title), title


def distillation_runs(config) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(folder tag, config) of this run and of its plain-backbone comparison."""
  runs = [('', config)]
  if config.seqmatch.compare_backbone and config.seqmatch.num_subsets > 1:
    runs.append((config.backbone.name, plain_config(config)))
  return runs


def write_config(config, workdir: str) -> None:
  """config.json; an earlier, different one is kept as config.previous-N.json."""
  path = os.path.join(workdir, 'config.json')
  text = config.to_json_best_effort(indent=1, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return
    n = 1
    while os.path.exists(os.path.join(workdir, f'config.previous-{n}.json')):
      n += 1
    os.replace(path, os.path.join(workdir, f'config.previous-{n}.json'))
  files.write_text(path, text)


def distill(config, workdir, data, network, key, stop, writer):
  mesh = parallel.make_mesh(config.parallel.num_devices)
  for tag, cfg in distillation_runs(config):
    out = os.path.join(workdir, tag, 'synthetic.npz')
    if parallel.agree(os.path.exists(out)):
      logging.info('%s exists: distillation done', out)
      continue
    syn = seqmatch.distill_all(_context(cfg, workdir, data, network, key, stop,
                                        writer, mesh, tag), tag=tag)
    def write(out=out, syn=syn, cfg=cfg):
      synthetic.save(out, syn, data.preprocessor, cfg)
      visualize.save_grid(out.replace('.npz', '.png'),
                          data.preprocessor.to_pixels(syn.images), syn.labels,
                          data.num_classes)
      logging.info('wrote %s (%d images, lr %s)', out, len(syn.labels), syn.lrs)
    parallel.main_only(write, f'synthetic set {out}')


def kept_version(raw: dict, ema: dict) -> dict:
  """Which of a set's raw and EMA images is kept: the higher mean test
  accuracy, on the first architecture evaluated. Both stay in synthetic.npz;
  this is a report of the two rows (test accuracy), not a selection that
  feeds back into anything."""
  arch = next(iter(raw))
  better = ema[arch]['mean'] > raw[arch]['mean']
  return dict(kept='EMA' if better else 'raw', architecture=arch,
              raw=raw[arch]['mean'], ema=ema[arch]['mean'])


def evaluate(config, workdir, data: PreparedData, key) -> dict:
  t0 = time.time()
  mesh = parallel.model_mesh(config.parallel.num_devices)
  eval_key = jax.random.fold_in(key, 2)
  sets = []
  if config.eval.synthetic:
    sets.append(('synthetic', config.eval.synthetic))
  else:
    name, plain = set_names(config)
    sets.append((name, os.path.join(workdir, 'synthetic.npz')))
    if config.seqmatch.compare_backbone and config.seqmatch.num_subsets > 1:
      sets.append((plain, os.path.join(workdir, config.backbone.name,
                                       'synthetic.npz')))
  rows: dict[str, dict] = {}
  ema_kept: dict[str, dict] = {}
  for name, path in sets:
    syn = synthetic.load(path, data.num_classes, data.image_shape,
                         data.preprocessor, config)
    lr = syn.lrs if syn.lrs is not None else np.float32(config.eval.lr)
    # An EMA set (FTD) is scored on its own fresh networks, with the same
    # keys and protocol as the raw set (the official code warm-starts it on
    # the network the raw set already trained; we do not).
    versions = [(name, syn.images)]
    if syn.ema is not None:
      versions.append((f'{name} (EMA)', syn.ema))
    for row, images in versions:
      rows[row] = {}
      for arch in config.eval.architectures:
        r = evaluate_lib.evaluate_synthetic(
            images, syn.labels, lr, config, eval_key, x_eval=data.x_test,
            y_eval=data.y_test, num_classes=data.num_classes, subset=syn.subset,
            architecture=arch, mesh=mesh)
        rows[row][arch] = r
        logging.info('%s / %s: %.2f ± %.2f %%', row, arch, r['mean'], r['std'])
    if syn.ema is not None:
      ema_kept[name] = kept_version(rows[name], rows[f'{name} (EMA)'])
  ipc = config.ipc
  for base in config.eval.baselines:
    if base == 'random_real':
      x, y = evaluate_lib.random_real(data.x_train, data.y_train, ipc,
                                      data.num_classes, config.seed)
      name, epochs = f'random real (ipc {ipc})', None
    else:
      x, y = data.x_train, data.y_train
      name, epochs = 'whole training set', config.eval.whole_epochs
    rows[name] = {}
    for arch in config.eval.architectures:
      r = evaluate_lib.evaluate_synthetic(
          x, y, config.eval.lr, config, eval_key, x_eval=data.x_test,
          y_eval=data.y_test, num_classes=data.num_classes, architecture=arch,
          epochs=epochs, mesh=mesh)
      rows[name][arch] = r
      logging.info('%s / %s: %.2f ± %.2f %%', name, arch, r['mean'], r['std'])
  results = dict(rows=rows, config=json.loads(config.to_json_best_effort()),
                 **({'ema_kept': ema_kept} if ema_kept else {}),
                 wall_time_s=time.time() - t0, dataset=data.name,
                 devices=[str(d) for d in jax.devices()])
  if parallel.is_main_process():
    evaluate_lib.write_results(workdir, results)
    summary = '; '.join(f"{n}: {r[a]['mean']:.2f}±{r[a]['std']:.2f}"
                        for n, r in rows.items() for a in r)
    print(f'results ({data.name}, test accuracy %): {summary}')
  return results
