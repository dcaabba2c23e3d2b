"""Seconds per distillation iteration (unroll + meta-gradient), compile time,
peak memory, XLA-counted FLOPs and the achieved fraction of this machine's
float32 matmul rate, for ConvNet-3 (width 128) on 100 synthetic images.

  python -m benchmarks.distill_step   # full grid: both shapes, 10-80 steps, remat 1/0

Each configuration runs in its own process so that peak RSS is its own.
No-remat rows whose peak RSS, extrapolated linearly in steps from the rows
already measured, would exceed the memory budget are recorded as skipped (with
the estimate) instead of run. With --wait_while_exists=FILE, rows wait while
FILE exists (a flag another job on a shared machine sets while it holds the
cores) and record whether it appeared during the row. The matmul rate is measured before and after the grid; the
larger is the denominator. The output ends with a PASS/FAIL line per target.
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


def _mem_total_gib() -> float:
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemTotal:'):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return float('inf')


def _estimate_mib(measured: dict[int, float], steps: int) -> float | None:
  """Peak RSS of a no-remat unroll at `steps`, from the rows measured so far.

  Linear through the two largest measured step counts (the unroll stores every
  step's activations); with one row, proportional to steps (an over-estimate,
  since part of the peak does not grow).
  """
  if not measured:
    return None
  known = sorted(measured)
  if len(known) == 1:
    return measured[known[0]] * steps / known[0]
  a, b = known[-2], known[-1]
  slope = (measured[b] - measured[a]) / (b - a)
  return measured[b] + slope * (steps - b)


def _wait_quiet(busy_file: str, poll_s: float = 10.0) -> float:
  """Blocks while `busy_file` exists (another job holds the cores)."""
  t0 = time.time()
  while busy_file and os.path.exists(busy_file):
    time.sleep(poll_s)
  return time.time() - t0


def summarize(rows: list[dict], rate: float) -> list[str]:
  """PASS/FAIL lines for the issue-6 targets, from the measured rows."""
  ok = [r for r in rows if 's_per_iter' in r]
  get = lambda shape, steps, remat: next(
      (r for r in ok if r['shape'] == shape and r['steps'] == steps
       and r['remat'] == remat), None)
  lines = []
  # 1. >= 40% of the matmul rate at 32x32x3, 20 steps (the remat unroll is the
  # default; the no-remat row is reported too).
  for remat in (1, 0):
    r = get('32x32x3', 20, remat)
    if r is None:
      lines.append(f'- FLOP rate, 32x32x3, 20 steps, remat {remat}: not measured')
      continue
    frac = r.get('frac_matmul') or 0.0
    useful = ''
    r0 = get('32x32x3', 20, 0)
    if remat == 1 and r0 is not None and r0.get('gflop_per_iter'):
      useful = (f'; counting only the no-remat FLOPs (no recomputation) '
                f'{r0["gflop_per_iter"] / r["s_per_iter"] / rate:.1%}')
    verdict = 'PASS' if frac >= 0.40 else 'FAIL'
    lines.append(
        f'- FLOP rate >= 40% of matmul, 32x32x3, 20 steps, remat {remat}: '
        f'**{verdict}** ({frac:.1%} of {rate:.0f} GFLOP/s{useful})')
  # 2. Remat within 1.2x of the fastest no-remat unroll, where both ran.
  pairs = []
  for r in ok:
    if r['remat'] != 1:
      continue
    r0 = get(r['shape'], r['steps'], 0)
    if r0 is not None:
      pairs.append((r['shape'], r['steps'], r['s_per_iter'] / r0['s_per_iter']))
  if pairs:
    worst = max(p[2] for p in pairs)
    lines.append(
        f'- remat within 1.2x of the no-remat unroll: '
        f'**{"PASS" if worst <= 1.2 else "FAIL"}** (remat / no-remat time: ' +
        ', '.join(f'{sh} {st} steps {q:.2f}' for sh, st, q in pairs) + ')')
  else:
    lines.append('- remat within 1.2x of the no-remat unroll: not measured')
  # 3. Remat memory, 80 vs 10 steps.
  for shape in sorted({r['shape'] for r in ok}):
    a, b = get(shape, 10, 1), get(shape, 80, 1)
    if a and b and a.get('peak_rss_mib') and b.get('peak_rss_mib'):
      q = b['peak_rss_mib'] / a['peak_rss_mib']
      lines.append(
          f'- remat memory 80 / 10 steps <= 1.5x, {shape}: '
          f'**{"PASS" if q <= 1.5 else "FAIL"}** ({b["peak_rss_mib"]:.0f} / '
          f'{a["peak_rss_mib"]:.0f} MiB = {q:.2f}x)')
  # 4. Compile time.
  if ok:
    worst = max(ok, key=lambda r: r['compile_s'])
    lines.append(
        f'- compile < 60 s: **{"PASS" if worst["compile_s"] < 60 else "FAIL"}**'
        f' (slowest {worst["compile_s"]} s: {worst["shape"]}, '
        f'{worst["steps"]} steps, remat {worst["remat"]})')
  skipped = [r for r in rows if r.get('skipped')]
  for r in skipped:
    lines.append(f'- skipped {r["shape"]} {r["steps"]} steps remat {r["remat"]}: '
                 f'{r["skipped"]}')
  failed = [r for r in rows if r.get('error')]
  for r in failed:
    lines.append(f'- error {r.get("shape")} {r.get("steps")} steps: {r["error"]}')
  return lines


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--json', help='internal: measure one configuration')
  p.add_argument('--shapes', default='28x28x1,32x32x3')
  p.add_argument('--steps', default='10,20,40,80')
  p.add_argument('--remat', default='1,0')
  p.add_argument('--conv_impl', default='auto')
  p.add_argument('--norm', default='instance', help='ablation: instance|none|...')
  p.add_argument('--augment', default='color_crop_cutout_flip_scale_rotate',
                 help="ablation: '' turns DSA off")
  p.add_argument('--reps', type=int, default=5)
  p.add_argument('--mem_budget_gib', type=float, default=None,
                 help='skip no-remat rows whose estimated peak RSS exceeds '
                 'this (default: 70%% of MemTotal)')
  p.add_argument('--wait_while_exists', default='',
                 help='wait before each row while this file exists (shared machines)')
  p.add_argument('--out', default='benchmarks/results/distill_step')
  a = p.parse_args()
  if a.json:
    print(json.dumps(measure(json.loads(a.json))))
    return
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  budget_mib = 1024 * (a.mem_budget_gib if a.mem_budget_gib is not None
                       else 0.7 * _mem_total_gib())
  waited = _wait_quiet(a.wait_while_exists)
  rate_start = matmul_rate()
  rows = []
  for shape in a.shapes.split(','):
    for remat in [int(r) for r in a.remat.split(',')]:
      measured = {}
      for steps in sorted(int(s) for s in a.steps.split(',')):
        base = dict(shape=shape, steps=steps, remat=remat,
                    conv_impl=a.conv_impl, norm=a.norm,
                    dsa=int(bool(a.augment)))
        est = None if remat else _estimate_mib(measured, steps)
        if est is not None and est > budget_mib:
          row = dict(base, est_peak_rss_mib=round(est),
                     skipped=f'estimated peak RSS {est / 1024:.1f} GiB > '
                     f'budget {budget_mib / 1024:.1f} GiB (linear in steps '
                     'from the rows above)')
          rows.append(row)
          print(json.dumps(row), file=sys.stderr, flush=True)
          continue
        waited += _wait_quiet(a.wait_while_exists)
        row = common.run_isolated('benchmarks.distill_step', dict(
            shape=[int(v) for v in shape.split('x')], steps=steps, remat=remat,
            conv_impl=a.conv_impl, reps=a.reps, norm=a.norm, augment=a.augment))
        row['busy_during'] = int(bool(a.wait_while_exists) and
                                os.path.exists(a.wait_while_exists))
        if row.get('peak_rss_mib'):
          measured[steps] = row['peak_rss_mib']
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
  rate_end = matmul_rate()
  # The larger of the two measurements: the conservative denominator.
  rate = max(rate_start, rate_end)
  for row in rows:
    if row.get('gflops_achieved'):
      row['frac_matmul'] = round(row['gflops_achieved'] / rate, 3)
  cmd = 'python -m benchmarks.distill_step ' + ' '.join(sys.argv[1:])
  summary = summarize(rows, rate)
  table = common.write_outputs(
      rows, ['shape', 'steps', 'remat', 'conv_impl', 'norm', 'dsa', 's_per_iter',
             'compile_s', 'peak_rss_mib', 'gflop_per_iter', 'gflops_achieved',
             'frac_matmul', 'reps', 'skipped'],
      a.out, f'Distillation iteration, ConvNet-3 w128, 100 images (matmul rate '
      f'{rate:.0f} GFLOP/s: 2048^3 float32 jnp.dot, best of 5, max of '
      f'{rate_start:.0f} before / {rate_end:.0f} after the grid)', cmd,
      extra=dict(matmul_gflops_start=round(rate_start, 1),
                 matmul_gflops_end=round(rate_end, 1),
                 matmul_gflops=round(rate, 1), summary=summary,
                 waited_for_busy_s=round(waited),
                 xla_flags=os.environ.get('XLA_FLAGS', '')),
      footer='\n'.join(['', 'Targets (issue 6):', ''] + summary))
  print(table)


if __name__ == '__main__':
  main()
