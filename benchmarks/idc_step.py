"""Seconds per IDC outer iteration (the whole inner loop: inner_loop x
{one image step per class, network update on n_data real images}) as one
jitted step, ConvNet-3 width 128 at 32x32x3, 10 classes, IDC's reproduce
settings (real batch 64, at most 128 decoded images per class, n_data 2000).

  python -m benchmarks.idc_step                  # ipc 10 and 50, inner_loop 5
  python -m benchmarks.idc_step --inner_loop=100 # one full official iteration

The step is a scan over matches, so its time is linear in inner_loop: rows
measured with a short inner loop also report the time extrapolated to the
official 100 (`s_per_outer_100`). Each row runs in its own process (its own
peak RSS). The official code runs the same work as a Python loop of
inner_loop x classes optimizer steps plus 32 network steps per match.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def measure(args: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np
  from seqmatch_jax import config_lib
  from seqmatch_jax.models import create_network
  from benchmarks import common
  from benchmarks.backbone_step import prepare_step

  shape, ipc, inner = tuple(args['shape']), args['ipc'], args['inner_loop']
  config = config_lib.base_config()
  config_lib.apply_settings(config, {
      'backbone.name': 'idc', 'ipc': ipc, 'idc.inner_loop': inner,
      'dataset.name': 'cifar10'})
  net = create_network('convnet', 10, shape, width=128, depth=3)
  rng = np.random.default_rng(0)
  per_class = args.get('real_per_class', 500)
  x = rng.normal(size=(10 * per_class,) + shape).astype(np.float32)
  y = np.repeat(np.arange(10), per_class).astype(np.int32)
  step, state, frozen, source, plan, backbone = prepare_step(config, net, x, y)
  call = (state, frozen, source.sample(0, 1), source.data)
  t0 = time.time()
  compiled = step.lower(*call).compile()
  compile_s = time.time() - t0
  times = []
  for _ in range(args.get('reps', 2)):
    t0 = time.time()
    state, metrics = compiled(*call)
    jax.block_until_ready(state.trainable['images'])
    times.append(time.time() - t0)
    call = (state,) + call[1:]
  med = statistics.median(times)
  extra = {}
  if args.get('split'):
    # The network update on real data alone (`IDC.train_network`), the part
    # the official code runs as `train.train_epoch(n_data=...)`.
    resource = jax.tree.map(lambda v: v[0], source.sample(0, 1))
    net_state = backbone.initial_network(plan, resource, jax.random.key(5))
    update = jax.jit(lambda net_state, key: backbone.train_network(
        plan, net_state, key, source.data))
    jax.block_until_ready(update(net_state, jax.random.key(6)))
    upd = []
    for i in range(args.get('reps', 2)):
      t0 = time.time()
      jax.block_until_ready(update(net_state, jax.random.key(7 + i)))
      upd.append(time.time() - t0)
    # The step trains the network between two matches, not after the last
    # one (the next iteration starts a new network): inner_loop matches and
    # inner_loop - 1 updates.
    u = statistics.median(upd)
    extra = dict(update_s=round(u, 3), match_s=round((med - (inner - 1) * u) / inner, 3))
  return dict(**extra,shape='x'.join(map(str, shape)), ipc=ipc, inner_loop=inner,
              s_per_outer=round(med, 2), s_per_match=round(med / inner, 3),
              s_per_outer_100=round(med / inner * 100, 1),
              compile_s=round(compile_s, 1), reps=len(times),
              loss=round(float(metrics['loss']), 3),
              peak_rss_mib=common.self_peak_rss_mib(), backend=jax.default_backend())


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--json', help='one measurement (internal)')
  parser.add_argument('--ipcs', default='10,50')
  parser.add_argument('--inner_loop', type=int, default=5)
  parser.add_argument('--reps', type=int, default=2)
  parser.add_argument('--out', default='benchmarks/results/idc_step')
  a = parser.parse_args(argv)
  if a.json:
    print(json.dumps(measure(json.loads(a.json))))
    return
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  rows = []
  for ipc in [int(v) for v in a.ipcs.split(',')]:
    row = common.run_isolated('benchmarks.idc_step', dict(
        shape=[32, 32, 3], ipc=ipc, inner_loop=a.inner_loop, reps=a.reps))
    print(row, file=sys.stderr)
    rows.append(row)
  cmd = 'python -m benchmarks.idc_step ' + ' '.join(argv or sys.argv[1:])
  print(common.write_outputs(
      rows, ['shape', 'ipc', 'inner_loop', 's_per_outer', 's_per_match',
             's_per_outer_100', 'compile_s', 'peak_rss_mib', 'backend'],
      a.out, 'IDC outer iteration (ConvNet-3 w128, 10 classes)', cmd.strip()))


if __name__ == '__main__':
  main()
