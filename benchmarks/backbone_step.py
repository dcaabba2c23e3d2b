"""Seconds per distillation iteration of every backbone, with its own official
row (`configs/cifar10.py:ipc=N,k=1,backbone=NAME`: ConvNet-3 width 128,
32x32x3, the row's unroll length, batches and inner loops), on random data of
the dataset's shape.

  python -m benchmarks.backbone_step                       # every backbone, ipc 10
  python -m benchmarks.backbone_step --backbones=mtt,idc --ipc=50
  python -m benchmarks.backbone_step --tiny                # toy sizes: checks it on CPU

The iteration is the jitted `distill.make_distill_step` the pipeline runs,
timed after compilation (median of `--reps`), the first call reported apart.
Methods that match expert trajectories (MTT, FTD, DATM) get two experts
trained for the epochs the row's window needs, on 256 images (one batch per
epoch): the step's cost does not depend on how good the experts are. DATM
starts from random real images (`datm.select_correct=False`: random data has
no correctly classified images to pick); FTD's experts use GSAM, as its row
asks. Each row runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

BACKBONES = ('mtt', 'ftd', 'datm', 'idc', 'dm', 'dc', 'dsa')

# --tiny: every loop of the row cut to a few steps (the keys of the backbones'
# own sections), width 8 and 16x16x3 images.
TINY = {
    'mtt': {'mtt.syn_steps': 2, 'mtt.expert_epochs': 1, 'mtt.max_start_epoch': 2},
    'ftd': {'ftd.syn_steps': 2, 'ftd.expert_epochs': 1, 'ftd.max_start_epoch': 2},
    'datm': {'datm.syn_steps': 2, 'datm.expert_epochs': 1, 'datm.min_start_epoch': 0,
             'datm.current_max_start_epoch': 1, 'datm.max_start_epoch': 2},
    'idc': {'idc.inner_loop': 1, 'idc.n_data': 64, 'idc.batch_real': 16},
    'dm': {'dm.batch_real': 16},
    'dc': {'dc.outer_loop': 2, 'dc.inner_loop': 1, 'dc.batch_real': 16},
    'dsa': {'dc.outer_loop': 2, 'dc.inner_loop': 1, 'dc.batch_real': 16},
}


def _expert_epochs(plans) -> int:
  """The epochs of expert trajectory the plans' windows read."""
  return max(int(p.settings.get('max_start_epoch', 0))
             + int(p.settings.get('expert_epochs', 0)) for p in plans)


def prepare_step(config, net, x, y, experts_dir: str = ''):
  """What the pipeline builds for subset 1 of `config` on real data (x, y)
  (random stand-ins; 10 classes, pixels normalised with mean 0.5, std 0.25):
  (jitted step, state, frozen, source, plan, backbone), one trajectory per
  step."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  from seqmatch_jax import backbones, distill, seqmatch
  from seqmatch_jax.data.preprocess import Preprocessor

  shape = tuple(net.image_shape)
  x, y = jnp.asarray(x), jnp.asarray(y)
  ctx = seqmatch.Context(
      workdir='', network=net, x_train=x, y_train=y, x_test=x[:100],
      y_test=y[:100], x_val=None, y_val=None, num_classes=10,
      experts_dir=experts_dir, expert_metadata={}, key=jax.random.key(0),
      preprocessor=Preprocessor(mean=np.full(shape[-1], 0.5, np.float32),
                                std=np.full(shape[-1], 0.25, np.float32)))
  backbone = backbones.create(config, net)
  plan = seqmatch.subset_plans(config, shape)[0]
  images = seqmatch.initial_images(jax.random.key(1), x, y, [plan.ipc], 10,
                                   config.distill.pix_init, plan.run.param,
                                   ctx.preprocessor.to_pixels)
  labels = seqmatch.subset_layout([plan.ipc], 10)[0]
  done = backbones.Done(images[:0], labels[:0], labels[:0], [])
  source = backbone.prepare(ctx, plan, done)
  trainable, optimizers = backbone.init(plan, source, images, labels)
  layout = backbones.Layout(labels, np.zeros(len(labels), np.int32), 10)
  step = distill.make_distill_step(backbone, plan, optimizers, layout,
                                   trajectories=1)
  state = distill.init_state(trainable, optimizers, jax.random.key(2))
  frozen = dict(images=jnp.asarray(images[:0]), labels=jnp.asarray(labels[:0]))
  return step, state, frozen, source, plan, backbone


def measure(args: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  from seqmatch_jax import backbones, config_lib, pipeline, seqmatch
  from seqmatch_jax import experts as experts_lib
  from benchmarks import common

  name, ipc, tiny = args['backbone'], args['ipc'], args.get('tiny', False)
  config = config_lib.load_config(
      f'configs/cifar10.py:ipc={ipc},k=1,backbone={name}')
  shape = (16, 16, 3) if tiny else (32, 32, 3)
  settings = {'dataset.zca': False, 'experts.num': 2}
  if name == 'datm':
    settings['datm.select_correct'] = False
  if name == 'ftd':  # FTD's row leaves it to the command line (configs/cifar10.py)
    settings['experts.optimizer'] = 'gsam'
  if tiny:
    settings.update(TINY[name], **{'model.width': 8})
  config_lib.apply_settings(config, settings)
  net = pipeline.network_for(config, config.model.name, 10, shape)
  rng = np.random.default_rng(0)
  per_class = args.get('real_per_class', 50 if tiny else 500)
  x = jnp.asarray(rng.normal(size=(10 * per_class,) + shape).astype(np.float32))
  y = jnp.asarray(np.tile(np.arange(10), per_class).astype(np.int32))
  plans = seqmatch.subset_plans(config, shape)
  workdir = tempfile.mkdtemp(prefix='backbone_step_')
  experts_s = 0.0
  if backbones.backbone_class(name).needs_experts:
    config.experts.epochs = _expert_epochs(plans)
    spec = experts_lib.spec_from_config(config, config.experts.epochs)
    t0 = time.perf_counter()
    experts_lib.train_experts(
        net, spec, os.path.join(workdir, 'experts'), x[:256], y[:256], x[:100],
        y[:100], jax.random.key(3), dict(seed=0, image_shape=list(shape)),
        progress=False)
    experts_s = time.perf_counter() - t0
  step, state, frozen, source, plan, _ = prepare_step(
      config, net, x, y, os.path.join(workdir, 'experts'))
  trajectories = 1

  def call(i, state):
    new, metrics = step(state, frozen, source.sample(i, trajectories), source.data)
    jax.block_until_ready(new)
    return new, metrics

  t0 = time.perf_counter()
  state, metrics = call(0, state)
  first = time.perf_counter() - t0
  times = []
  for i in range(args.get('reps', 3)):
    t0 = time.perf_counter()
    state, metrics = call(i + 1, state)
    times.append(time.perf_counter() - t0)
  loss = float(metrics['loss'])
  row = dict(backbone=name, ipc=ipc, shape='x'.join(map(str, shape)),
             iterations=plan.iterations,
             s_per_iteration=round(statistics.median(times), 4),
             first_s=round(first, 1), experts_s=round(experts_s, 1),
             loss=round(loss, 4) if np.isfinite(loss) else str(loss),
             peak_rss_mib=common.self_peak_rss_mib(),
             backend=jax.default_backend(),
             device=str(jax.devices()[0].device_kind))
  row['official_run_h'] = round(row['s_per_iteration'] * plan.iterations / 3600, 2)
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    row['peak_device_mib'] = round(stats['peak_bytes_in_use'] / 2**20, 1)
  return row


COLUMNS = ['backbone', 'ipc', 'shape', 's_per_iteration', 'iterations',
           'official_run_h', 'first_s', 'experts_s', 'loss', 'peak_device_mib',
           'peak_rss_mib', 'wall_s', 'device', 'error']


def rows_for(backbones: str, ipc: int, tiny: bool, reps: int) -> list[dict]:
  names = [b for b in backbones.split(',') if b]
  unknown = sorted(set(names) - set(BACKBONES))
  if unknown:
    raise SystemExit(f'unknown backbone(s) {unknown}; choose from {BACKBONES}')
  return [dict(backbone=b, ipc=ipc, tiny=tiny, reps=1 if tiny else reps)
          for b in names]


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--json')
  p.add_argument('--backbones', default=','.join(BACKBONES))
  p.add_argument('--ipc', type=int, default=10)
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--tiny', action='store_true', help='toy sizes (CPU check)')
  p.add_argument('--out', default='benchmarks/results/backbone_step')
  a = p.parse_args()
  if a.json:
    print(json.dumps(measure(json.loads(a.json))))
    return
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  rows = []
  for args in rows_for(a.backbones, a.ipc, a.tiny, a.reps):
    rows.append(common.run_isolated('benchmarks.backbone_step', args, timeout=900))
    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  cmd = 'python -m benchmarks.backbone_step ' + ' '.join(sys.argv[1:])
  print(common.write_outputs(rows, COLUMNS, a.out,
                             'One distillation iteration per backbone', cmd))


if __name__ == '__main__':
  main()
