"""Distillation trajectories per second on 1, 2 and 4 devices at fixed work per
device (one expert trajectory per device per step), through the sharded step.

  python -m benchmarks.scaling --devices=1,2,4
  python -m benchmarks.scaling --devices=2,4 --processes=2   # via jax.distributed

On CPU the devices are forced host devices (XLA_FLAGS) sharing the same cores,
so this checks the sharded path and its overhead, not real scaling; on a
multi-GPU machine the same command measures scaling. With --processes=P each
row runs P local processes (devices/P each) joined by jax.distributed, the
synthetic state replicated and each process loading only its devices' windows,
as a multi-host run does: against the one-process row with the same device
count, it measures the cost of the cross-process path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def measure(args: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import numpy as np
  from seqmatch_jax import backbones, config_lib, distill, parallel, seqmatch
  from seqmatch_jax.models import create_network
  from benchmarks import common

  d = args['devices']
  procs = args.get('processes', 1)
  if procs > 1:
    jax.distributed.initialize(f"localhost:{args['port']}", num_processes=procs,
                               process_id=args['process_id'])
  h, w, c = args['shape']
  net = create_network('convnet', 10, (h, w, c), width=args['width'],
                       depth=args['depth'])
  keys = jax.random.split(jax.random.key(0), d)
  starts = jax.vmap(lambda k: net.init(k)[0])(keys)
  targets = jax.tree.map(lambda p: p * 1.01 + 0.001, starts)
  images = jax.random.normal(jax.random.key(1), (100, h, w, c))
  labels = jnp.repeat(jnp.arange(10), 10)
  config = config_lib.base_config()
  config.augment.strategy = args['augment']
  backbone = backbones.create(config, net)
  plan = seqmatch.single_plan(
      config, ipc=10, iterations=1, lr_img=100.0, syn_steps=args['steps'],
      expert_epochs=2, max_start_epoch=1, batch_syn=100, remat=True)
  mesh = parallel.make_mesh(d) if d > 1 else None
  trainable, optimizers = backbone.init(plan, None, images, labels)
  layout = backbones.Layout(np.asarray(labels), np.zeros(100, np.int32), 10)
  step = distill.make_distill_step(backbone, plan, optimizers, layout,
                                   trajectories=d, mesh=mesh)
  state = parallel.replicate(
      distill.init_state(trainable, optimizers, jax.random.key(2)), mesh)
  empty = parallel.replicate(dict(images=images[:0], labels=labels[:0]), mesh)
  if mesh is not None:  # each process holds only its devices' trajectories
    host = jax.tree.map(np.asarray, (starts, targets))
    starts, targets = parallel.shard_from_loader(
        d, mesh, lambda rows: jax.tree.map(lambda a: a[rows], host))
  state, m = step(state, empty, (starts, targets), None)
  jax.block_until_ready(m)
  times = []
  for _ in range(args['reps']):
    t0 = time.time()
    state, m = step(state, empty, (starts, targets), None)
    jax.block_until_ready(m)
    times.append(time.time() - t0)
  med = statistics.median(times)
  return dict(devices=d, processes=procs, trajectories_per_step=d,
              s_per_step=round(med, 3),
              trajectories_per_s=round(d / med, 3),
              peak_rss_mib=common.self_peak_rss_mib(),
              backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind)


def _run_processes(args: dict, processes: int) -> dict:
  """One row as `processes` local processes joined by jax.distributed (each
  with devices/processes forced CPU devices); process 0's measurement."""
  import socket  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, XLA_FLAGS=os.environ.get('XLA_FLAGS', '') +
             f' --xla_force_host_platform_device_count={args["devices"] // processes}')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  children = [subprocess.Popen(
      [sys.executable, '-m', 'benchmarks.scaling', '--json',
       json.dumps(dict(args, processes=processes, port=port, process_id=i))],
      cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(processes)]
  outs = [c.communicate(timeout=3600) for c in children]
  if any(c.returncode for c in children):
    return dict(args, processes=processes,
                error=outs[0][1].strip().splitlines()[-1:] or ['failed'])
  return json.loads(outs[0][0].strip().splitlines()[-1])


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--json')
  p.add_argument('--devices', default='1,2,4')
  p.add_argument('--shape', default='28x28x1')
  p.add_argument('--width', type=int, default=64)
  p.add_argument('--depth', type=int, default=3)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--augment', default='color_crop_cutout_flip_scale_rotate')
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--processes', type=int, default=1)
  p.add_argument('--out', default='')
  a = p.parse_args()
  if a.json:
    row = measure(json.loads(a.json))
    if row is not None:
      print(json.dumps(row))
    return
  a.out = a.out or ('benchmarks/results/scaling' if a.processes == 1 else
                    f'benchmarks/results/scaling_{a.processes}proc')
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  counts = [int(v) for v in a.devices.split(',')]
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() == 'cpu':  # force host devices in the children
    if a.processes > 1 and any(c % a.processes for c in counts):
      sys.exit(f'--devices must be multiples of --processes={a.processes}')
    per = max(counts) if a.processes == 1 else None
    if per:
      os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                                 f' --xla_force_host_platform_device_count={per}')
  rows = []
  for d in counts:
    args = dict(devices=d, shape=[int(v) for v in a.shape.split('x')],
                width=a.width, depth=a.depth, steps=a.steps, augment=a.augment,
                reps=a.reps)
    if a.processes > 1:
      row = _run_processes(args, a.processes)
    else:
      row = common.run_isolated('benchmarks.scaling', args)
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  base = rows[0].get('trajectories_per_s')
  for r in rows:
    if base and r.get('trajectories_per_s'):
      r['speedup'] = round(r['trajectories_per_s'] / base, 2)
      r['efficiency'] = round(r['speedup'] / (r['devices'] / rows[0]['devices']), 2)
  cmd = 'python -m benchmarks.scaling ' + ' '.join(sys.argv[1:])
  print(common.write_outputs(
      rows, ['devices', 'processes', 'trajectories_per_step', 's_per_step', 'trajectories_per_s',
             'speedup', 'efficiency', 'peak_rss_mib', 'backend'],
      a.out, 'Distillation scaling over devices (fixed work per device)'
      + (f', {a.processes} processes' if a.processes > 1 else ''), cmd))


if __name__ == '__main__':
  main()
