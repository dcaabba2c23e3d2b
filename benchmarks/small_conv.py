"""Small-map convolutions as matmuls: old vs new path, per network and shape.

One jitted `training.sgd_step` (batch 64, momentum 0.9, weight decay 5e-4,
full DSA) per network and image shape, compiled twice in one process: with
`conv.SMALL_MAP_PIXELS_PER_TAP = 0` (the old path: XLA convolutions at every
map size) and with the new threshold. The two are timed alternately, call by
call, so machine load hits both alike; the speed-up is old / new median.

  python -m benchmarks.small_conv --meta               # the issue-26 grid
  python -m benchmarks.small_conv --nets=resnet18 --shapes=8x8x1 --reps=3
  python -m benchmarks.small_conv --thresholds=0,1,2,8  # threshold sweep

Useful FLOPs are XLA's cost analysis (`compiled.cost_analysis()['flops']`)
of the same step with `conv_impl='xla'`: XLA counts a convolution's
multiply-adds with input data only (not with padding or dilation holes), the
im2col programs also count products with zeros in their matmuls. The matmul
rate is a 2048^3 float32 `jnp.dot` (best of 5) timed in the same process,
before and after the row (the larger is the denominator).

With --meta, the MTT meta-gradient (`matching.meta_gradient`, ConvNet-3 width
128, 32x32x3, 100 images, 10 steps, remat, as benchmarks/distill_step.py) is
timed old vs new the same way; its 3x3 convolutions see 32x32, 16x16 and 8x8
maps (>= 7.1 pixels per tap), so thresholds up to 7 leave its program
unchanged (`same_program`: identical optimised HLO).

Each (network, shape) row runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

_DSA = 'color_crop_cutout_flip_scale_rotate'
_DEPTH = {'8x8x1': 2}  # ConvNet depth per shape (3 elsewhere)


def _matmul_rate(n: int = 2048, reps: int = 5) -> float:
  from benchmarks import distill_step  # pylint: disable=g-import-not-at-top
  return distill_step.matmul_rate(n, reps)


def _name(threshold: float) -> str:
  return f't{threshold:g}'


def _compile(build, threshold: float):
  """Lowers and compiles `build()` with SMALL_MAP_PIXELS_PER_TAP = threshold."""
  from seqmatch_jax.models import conv  # pylint: disable=g-import-not-at-top
  saved = conv.SMALL_MAP_PIXELS_PER_TAP
  conv.SMALL_MAP_PIXELS_PER_TAP = threshold
  try:
    fn, args = build()
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, args, time.perf_counter() - t0
  finally:
    conv.SMALL_MAP_PIXELS_PER_TAP = saved


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', 0.0))


def _step_builder(name: str, shape: tuple[int, int, int], impl: str,
                  batch: int):
  """A fresh jitted SGD step and its arguments (fresh: no trace reuse)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from seqmatch_jax import training
  from seqmatch_jax.models import create_network

  def build():
    depth = _DEPTH.get('x'.join(map(str, shape)), 3)
    net = create_network(name, 10, shape, depth=depth, conv_impl=impl)
    spec = training.SGDSpec(batch_size=batch, momentum=0.9, weight_decay=5e-4,
                            augment=_DSA)
    params, state = net.init(jax.random.key(0))
    opt = spec.transform().init(params)
    x = jax.random.normal(jax.random.key(1), (batch, *shape))
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    mask = jnp.ones(batch)
    fn = jax.jit(lambda p, s, o, k: training.sgd_step(
        net, spec, p, s, o, x, y, mask, k, jnp.float32(0.01)))
    return fn, (params, state, opt, jax.random.key(3))

  return build


def _meta_builder(shape: tuple[int, int, int], steps: int, impl: str):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from seqmatch_jax import matching
  from seqmatch_jax.models import create_network

  def build():
    net = create_network('convnet', 10, shape, width=128, depth=3,
                         conv_impl=impl)
    params, _ = net.init(jax.random.key(0))
    target = jax.tree.map(lambda p: p + 0.01, params)
    images = jax.random.normal(jax.random.key(0), (100, *shape))
    labels = jnp.repeat(jnp.arange(10), 10)
    fn = jax.jit(matching.meta_gradient(net, num_steps=steps, batch_size=100,
                                        augment=_DSA, remat=True))
    return fn, (images, jnp.float32(0.01), images[:0], labels, params, target,
                jax.random.key(1))

  return build


def measure(a: dict) -> dict:
  """One row: every threshold compiled, then timed alternately."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import common

  shape = tuple(int(v) for v in a['shape'].split('x'))
  thresholds = a['thresholds']
  rate0 = _matmul_rate()
  if a['net'] == 'meta':
    build = lambda impl: _meta_builder(shape, a['steps'], impl)
  else:
    build = lambda impl: _step_builder(a['net'], shape, impl, a['batch'])
  # XLA's loop-body-once cost analysis: the meta-gradient's scans run `steps`
  # student steps (as benchmarks/distill_step.py counts them).
  loops = a['steps'] if a['net'] == 'meta' else 1
  useful = _flops(_compile(build('xla'), 0.0)[0]) * loops
  runs = []
  for t in thresholds:
    compiled, args, compile_s = _compile(build('im2col'), t)
    runs.append(dict(compiled=compiled, args=args, compile_s=compile_s,
                     flops=_flops(compiled) * loops, hlo=compiled.as_text(),
                     times=[]))
  for r in runs:  # warm-up
    jax.block_until_ready(r['compiled'](*r['args']))
  for i in range(a['reps']):
    # Alternate the order too, so neither path always runs first.
    for r in (runs if i % 2 == 0 else runs[::-1]):
      t0 = time.perf_counter()
      jax.block_until_ready(r['compiled'](*r['args']))
      r['times'].append(time.perf_counter() - t0)
  rate = max(rate0, _matmul_rate())
  old = statistics.median(runs[0]['times'])
  row = dict(net=a['net'] if a['net'] != 'meta' else f'meta {a["steps"]} steps',
             shape=a['shape'], batch=a['batch'] if a['net'] != 'meta' else 100,
             useful_gflop=round(useful / 1e9, 2),
             matmul_gflops=round(rate, 1), reps=a['reps'],
             peak_rss_mib=common.self_peak_rss_mib())
  for t, r in zip(thresholds, runs):
    s = statistics.median(r['times'])
    p = _name(t) + '_'
    row[p + 'ms'] = round(s * 1e3, 1)
    row[p + 'all_ms'] = [round(v * 1e3, 1) for v in r['times']]
    row[p + 'compile_s'] = round(r['compile_s'], 1)
    row[p + 'program_gflop'] = round(r['flops'] / 1e9, 2)
    row[p + 'speedup'] = round(old / s, 2)
    row[p + 'useful_gflops'] = round(useful / s / 1e9, 1)
    row[p + 'frac_matmul'] = round(useful / s / 1e9 / rate, 3)
    row[p + 'same_hlo'] = r['hlo'] == runs[0]['hlo']
  return row


def _table_rows(rows: list[dict], old: str, new: str) -> list[dict]:
  """The old-vs-new columns of the Markdown table (`old`, `new`: names)."""
  out = []
  for r in rows:
    if 'error' in r:
      out.append(dict(net=r.get('net'), shape=r.get('shape'),
                      note=str(r['error'])[:200]))
      continue
    out.append(dict(
        net=r['net'], shape=r['shape'], old_ms=r[f'{old}_ms'],
        new_ms=r[f'{new}_ms'], speedup=r[f'{new}_speedup'],
        useful_gflop=r['useful_gflop'],
        old_gflops=r[f'{old}_useful_gflops'],
        new_gflops=r[f'{new}_useful_gflops'],
        new_frac_matmul=r[f'{new}_frac_matmul'],
        matmul_gflops=r['matmul_gflops'],
        same_program=r[f'{new}_same_hlo'],
        compile_s=f'{r[f"{old}_compile_s"]} / {r[f"{new}_compile_s"]}',
        **{f'{t}_ms': r[k] for k in r if k.endswith('_ms') and
           not k.endswith('all_ms') and (t := k[:-3]) not in
           (f'{old}', f'{new}')}))
  return out


def main(argv=None):
  from seqmatch_jax.models import conv  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--json', help='internal: measure one row')
  p.add_argument('--nets', default='alexnet,vgg11,resnet18,convnet')
  p.add_argument('--shapes', default='8x8x1,28x28x1,32x32x3')
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--thresholds',
                 default=f'0,{conv.SMALL_MAP_PIXELS_PER_TAP:g}',
                 help='conv.SMALL_MAP_PIXELS_PER_TAP values, timed in turn; the '
                 'first is the old path (0: no small-map matmuls), the last '
                 'the new one')
  p.add_argument('--meta', action='store_true',
                 help='also the ConvNet-3 meta-gradient (32x32x3, 10 steps)')
  p.add_argument('--meta_steps', type=int, default=10)
  p.add_argument('--meta_reps', type=int, default=3)
  p.add_argument('--out', default='benchmarks/results/small_conv')
  a = p.parse_args(argv)
  if a.json:
    print(json.dumps(measure(json.loads(a.json))))
    return []
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  thresholds = [float(t) for t in a.thresholds.split(',')]
  jobs = [dict(net=n, shape=s, batch=a.batch, reps=a.reps,
               thresholds=thresholds)
          for n in a.nets.split(',') if n for s in a.shapes.split(',')]
  if a.meta:
    jobs.append(dict(net='meta', shape='32x32x3', steps=a.meta_steps,
                     reps=a.meta_reps, thresholds=thresholds, batch=100))
  rows = []
  for job in jobs:
    row = common.run_isolated('benchmarks.small_conv', job)
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if 'all_ms' not in k}),
          file=sys.stderr, flush=True)
  table = _table_rows(rows, _name(thresholds[0]), _name(thresholds[-1]))
  cols = []
  for r in table:
    cols += [k for k in r if k not in cols]
  cmd = 'python -m benchmarks.small_conv ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  rates = [r['matmul_gflops'] for r in rows if 'matmul_gflops' in r]
  text = common.write_outputs(
      table, cols, a.out,
      f'sgd_step (batch {a.batch}, DSA): old path (SMALL_MAP_PIXELS_PER_TAP='
      f'{thresholds[0]:g}) vs new ({thresholds[-1]:g}), timed alternately in '
      'one process; useful GFLOP = XLA cost analysis of the conv_impl=xla '
      'step; '
      f'matmul rate {min(rates, default=0):.0f}-{max(rates, default=0):.0f} '
      'GFLOP/s (2048^3 float32, per row)', cmd,
      extra=dict(raw_rows=rows, thresholds=thresholds,
                 load_avg=os.getloadavg(),
                 xla_flags=os.environ.get('XLA_FLAGS', '')))
  print(text)
  return rows


if __name__ == '__main__':
  main()
