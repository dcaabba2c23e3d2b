"""Seconds per distillation iteration (unroll + meta-gradient), compile time,
peak memory, XLA-counted FLOPs and the achieved fraction of this machine's
float32 matmul rate, for ConvNet-3 (width 128) on 100 synthetic images.

  python -m benchmarks.distill_step --shapes=28x28x1 --steps=10,20,40,80 --remat=1,0

Each configuration runs in its own process so that peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def measure(args: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from seqmatch_jax import matching
  from seqmatch_jax.models import create_network
  from benchmarks import common

  h, w, c = args['shape']
  net = create_network('convnet', 10, (h, w, c), width=args.get('width', 128),
                       depth=3, conv_impl=args.get('conv_impl', 'auto'),
                       norm=args.get('norm', 'instance'))
  key = jax.random.key(0)
  params, _ = net.init(key)
  target = jax.tree.map(lambda p: p + 0.01, params)
  images = jax.random.normal(key, (100, h, w, c))
  labels = jnp.repeat(jnp.arange(10), 10)
  fn = jax.jit(matching.meta_gradient(
      net, num_steps=args['steps'], batch_size=100,
      augment=args.get('augment', 'color_crop_cutout_flip_scale_rotate'),
      remat=bool(args['remat'])))
  call_args = (images, jnp.float32(0.01), images[:0], labels, params, target,
               jax.random.key(1))
  t0 = time.time()
  compiled = fn.lower(*call_args).compile()
  compile_s = time.time() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # XLA's cost analysis counts a loop body once, whatever its trip count: the
  # unroll (forward and backward scans) is one student step, so the iteration
  # does about `steps` times that (the loss outside the loops is negligible).
  flops = float(cost.get('flops', 0.0)) * args['steps'] if cost else 0.0
  times = []
  for i in range(args.get('reps', 5)):
    t0 = time.time()
    jax.block_until_ready(compiled(*call_args[:-1], jax.random.key(2 + i)))
    times.append(time.time() - t0)
  med = statistics.median(times)
  row = dict(shape='x'.join(map(str, args['shape'])), steps=args['steps'],
             remat=int(args['remat']), conv_impl=args.get('conv_impl', 'auto'),
             norm=args.get('norm', 'instance'), dsa=int(bool(args.get('augment', 1))),
             s_per_iter=round(med, 3), compile_s=round(compile_s, 1),
             gflop_per_iter=round(flops / 1e9, 1),
             gflops_achieved=round(flops / med / 1e9, 1) if flops else None,
             reps=len(times), peak_rss_mib=common.self_peak_rss_mib(),
             backend=jax.default_backend())
  if jax.default_backend() != 'cpu':
    stats = jax.devices()[0].memory_stats() or {}
    row['peak_device_mib'] = round(stats.get('peak_bytes_in_use', 0) / 2**20, 1)
  return row


def matmul_rate(n: int = 2048, reps: int = 5) -> float:
  """Dense float32 matmul GFLOP/s of this machine (the roofline we compare to)."""
  import jax  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (n, n))
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  best = float('inf')
  for _ in range(reps):
    t0 = time.time()
    jax.block_until_ready(f(a))
    best = min(best, time.time() - t0)
  return 2 * n ** 3 / best / 1e9


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--json', help='internal: measure one configuration')
  p.add_argument('--shapes', default='28x28x1')
  p.add_argument('--steps', default='10,20,40,80')
  p.add_argument('--remat', default='1,0')
  p.add_argument('--conv_impl', default='auto')
  p.add_argument('--norm', default='instance', help='ablation: instance|none|...')
  p.add_argument('--augment', default='color_crop_cutout_flip_scale_rotate',
                 help="ablation: '' turns DSA off")
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--out', default='benchmarks/results/distill_step')
  a = p.parse_args()
  if a.json:
    print(json.dumps(measure(json.loads(a.json))))
    return
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  rate = matmul_rate()
  rows = []
  for shape in a.shapes.split(','):
    for remat in [int(r) for r in a.remat.split(',')]:
      for steps in [int(s) for s in a.steps.split(',')]:
        row = common.run_isolated('benchmarks.distill_step', dict(
            shape=[int(v) for v in shape.split('x')], steps=steps, remat=remat,
            conv_impl=a.conv_impl, reps=a.reps, norm=a.norm, augment=a.augment))
        if row.get('gflops_achieved'):
          row['frac_matmul'] = round(row['gflops_achieved'] / rate, 3)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
  cmd = 'python -m benchmarks.distill_step ' + ' '.join(sys.argv[1:])
  print(common.write_outputs(
      rows, ['shape', 'steps', 'remat', 'conv_impl', 'norm', 'dsa', 's_per_iter',
             'compile_s',
             'peak_rss_mib', 'gflop_per_iter', 'gflops_achieved', 'frac_matmul',
             'reps'],
      a.out, f'Distillation iteration (matmul rate {rate:.0f} GFLOP/s)', cmd))


if __name__ == '__main__':
  main()
