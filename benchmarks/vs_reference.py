"""Our distillation step, expert epoch and evaluation run against PyTorch
references, measured side by side in one session.

Every row runs ours and the reference *alternately* (ours first on even rows,
the reference first on odd ones; with --rounds N each pair N times), each in
its own process so peak RSS is that row's own. The ratio (reference seconds /
our seconds, > 1 = we are faster) is the figure that counts: absolute seconds
move with the machine and its load.

  # the issue's grid (distillation step), both sides:
  TORCH_PYTHON=/work/torchvenv/bin/python python -m benchmarks.vs_reference
  # all three phases, and a seconds-long smoke test:
  python -m benchmarks.vs_reference --phases=step,expert,eval \
      --torch_python=/work/torchvenv/bin/python
  python -m benchmarks.vs_reference --quick

References (run with `--torch_python`, default $TORCH_PYTHON; torch is never a
dependency of the package; without it the torch rows are skipped):
  * step: `torch_mtt_step.py` (`--step_script`, default $TORCH_STEP_SCRIPT or
    ../shared/bench/torch_mtt_step.py), the official MTT inner loop
    re-implemented (functional unroll with create_graph, DSA, 2 threads);
  * idc: `benchmarks/idc_reference.py`, one outer step of the official IDC
    code itself (`--idc_repo`, default $IDC_REPO: a checkout of
    snu-mllab/Efficient-Dataset-Condensation), against ours at the same
    settings (`--phases=idc --shapes=32x32x3`);
  * expert / eval: `benchmarks/torch_ref.py`, benchmark-only PyTorch written
    for this harness on the same networks and DSA. Evaluation rows run each of
    `--eval_models` (default: ConvNet-3 and the cross-architecture AlexNet,
    VGG11 and ResNet18), e.g.
      python -m benchmarks.vs_reference --phases=eval --eval_epochs=20 \
          --shapes=8x8x1,28x28x1,32x32x3 --eval_models=alexnet,vgg11,resnet18

Our side uses the package defaults unless `--ours` names option sets, e.g.
`--ours='{"im2col": {}, "xla": {"conv_impl": "xla"}}'` (one column set per
variant, each run in turn within the row; keys: `matching.meta_gradient`'s
options and `conv_impl`; the expert and eval rows take `conv_impl`, and the
eval rows `trim_short_batch` (config `eval.trim_short_batch`)).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DSA = 'color_crop_cutout_flip_scale_rotate'


def _shape(s) -> tuple[int, int, int]:
  return tuple(int(v) for v in s.split('x')) if isinstance(s, str) else tuple(s)


# ----------------------------------------------------------------------------- ours

def measure_step(a: dict) -> dict:
  """Seconds per meta-gradient (after compilation and `warmup` calls)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from seqmatch_jax import hostmem
  from seqmatch_jax import matching
  from seqmatch_jax.models import create_network
  from benchmarks import common

  h, w, c = _shape(a['shape'])
  opts = dict(remat=True, **(a.get('opts') or {}))
  net = create_network('convnet', 10, (h, w, c), width=a.get('width', 128),
                       depth=3, conv_impl=opts.pop('conv_impl', 'auto'))
  n = a.get('n_images', 100)
  key = jax.random.key(0)
  params, _ = net.init(key)
  target = jax.tree.map(lambda p: p + 0.01, params)
  images = jax.random.normal(key, (n, h, w, c))
  labels = jnp.repeat(jnp.arange(10), n // 10)
  fn = jax.jit(matching.meta_gradient(
      net, num_steps=a['steps'], batch_size=a.get('batch_syn', n),
      augment=_DSA if a.get('dsa', True) else '', **opts))
  call = (images, jnp.float32(0.01), images[:0], labels, params, target)
  t0 = time.perf_counter()
  compiled = fn.lower(*call, jax.random.key(1)).compile()
  compile_s = time.perf_counter() - t0
  # What the distillation loop does once its step is compiled (distill.py).
  hostmem.release_freed_memory()
  times = []
  for i in range(a.get('warmup', 1) + a.get('reps', 3)):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*call, jax.random.key(2 + i)))
    times.append(time.perf_counter() - t0)
  times = times[a.get('warmup', 1):]
  return dict(s=statistics.median(times), s_all=[round(t, 3) for t in times],
              compile_s=round(compile_s, 1), peak_rss_mib=common.self_peak_rss_mib())


def expert_epoch(shape: tuple[int, ...], images: int, width: int = 128,
                 augment: str = _DSA, conv_impl: str = 'auto',
                 norm: str = 'instance'):
  """The jitted expert epoch (ConvNet-3, batch 256, SGD lr 0.01) on `images`
  random images, and its arguments (params, state, opt, key)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from seqmatch_jax import training
  from seqmatch_jax.models import create_network

  net = create_network('convnet', 10, shape, width=width, depth=3, norm=norm,
                       conv_impl=conv_impl)
  x = jax.random.normal(jax.random.key(0), (images, *shape))
  y = jax.random.randint(jax.random.key(1), (images,), 0, 10)
  spec = training.SGDSpec(batch_size=256, augment=augment)
  params, state = net.init(jax.random.key(2))
  fn = jax.jit(lambda p, s, o, k: training.run_epoch(
      net, spec, p, s, o, x, y, k, jnp.float32(0.01)))
  return fn, (params, state, spec.transform().init(params), jax.random.key(3))


def measure_expert(a: dict) -> dict:
  """Seconds per expert epoch (batch 256, DSA, SGD lr 0.01), after compiling."""
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import common

  fn, (params, state, opt, key) = expert_epoch(
      _shape(a['shape']), a['images'], a.get('width', 128),
      _DSA if a.get('dsa', True) else '',
      (a.get('opts') or {}).get('conv_impl', 'auto'))
  t0 = time.perf_counter()
  jax.block_until_ready(fn(params, state, opt, key))
  first = time.perf_counter() - t0
  times = []
  for i in range(a.get('warmup', 1) + a.get('reps', 3)):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(params, state, opt, jax.random.key(4 + i)))
    times.append(time.perf_counter() - t0)
  times = times[a.get('warmup', 1):]
  return dict(s=statistics.median(times), s_all=[round(t, 3) for t in times],
              first_s=round(first, 2), peak_rss_mib=common.self_peak_rss_mib())


def measure_eval(a: dict) -> dict:
  """One evaluation model (`model`, default ConvNet): `epochs` epochs on
  `images` images, then 500 tests.

  `first_s` includes compiling (what a user waits for once per run; the
  distillation's evaluations reuse the compiled runner), `s` is a second
  model with the runner compiled.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from seqmatch_jax import evaluate
  from seqmatch_jax.models import create_network
  from benchmarks import common

  shape = _shape(a['shape'])
  net = create_network(a.get('model', 'convnet'), 10, shape,
                       width=a.get('width', 128), depth=3,
                       conv_impl=(a.get('opts') or {}).get('conv_impl', 'auto'))
  n = a['images']
  x = jax.random.normal(jax.random.key(0), (n, *shape))
  y = jnp.repeat(jnp.arange(10), n // 10)
  xt = jax.random.normal(jax.random.key(1), (500, *shape))
  yt = jnp.repeat(jnp.arange(10), 50)
  protocol = evaluate.Protocol(
      epochs=a['epochs'], parallel='sequential',
      augment=_DSA if a.get('dsa', True) else '',
      # The package's default (config `eval.trim_short_batch=True`); the
      # reference trains on the n images of its short batch too.
      trim_short_batch=(a.get('opts') or {}).get('trim_short_batch', True))
  times = []
  for i in range(1 + a.get('reps', 1)):
    t0 = time.perf_counter()
    evaluate.train_and_score(net, protocol, jax.random.split(jax.random.key(2 + i), 1),
                             [(x, y)], jnp.ones(1) * 0.01, xt, yt)
    times.append(time.perf_counter() - t0)
  return dict(s=statistics.median(times[1:]), s_all=[round(t, 3) for t in times[1:]],
              first_s=round(times[0], 2), peak_rss_mib=common.self_peak_rss_mib())


def measure_idc(a: dict) -> dict:
  """One IDC outer step (a match over every class, then the network update on
  `n_data` real images) with the package's CIFAR-10 row, after compiling;
  `update_s` times the network update alone (`benchmarks/idc_step.py`)."""
  from benchmarks import idc_step  # pylint: disable=g-import-not-at-top
  row = idc_step.measure(dict(shape=list(_shape(a['shape'])), ipc=a['ipc'],
                              inner_loop=1, reps=a.get('reps', 2), split=True,
                              real_per_class=a.get('real_per_class', 500)))
  # One match over the classes plus one network update, as the reference
  # side times (our step skips the update after its last match: the next
  # iteration starts a fresh network, so it changes nothing).
  return dict(s=round(row['match_s'] + row['update_s'], 3), match_s=row['match_s'],
              update_s=row['update_s'], first_s=row['compile_s'],
              peak_rss_mib=row['peak_rss_mib'])


_MEASURE = dict(step=measure_step, expert=measure_expert, eval=measure_eval,
                idc=measure_idc)


# ----------------------------------------------------------------------------- runs

def _run(cmd: list[str], timeout: float) -> dict:
  """Runs one measurement process; its last stdout line is a JSON row.

  `load1` is the 1-minute load average when it started: on a shared machine,
  a row whose two sides saw different loads is not a fair ratio.
  """
  t0 = time.time()
  load1 = round(os.getloadavg()[0], 2)
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=_REPO)
  except subprocess.TimeoutExpired:
    return dict(error=f'timeout after {timeout:.0f} s')
  if proc.returncode != 0:
    tail = (proc.stderr.strip().splitlines() or ['failed'])[-1]
    return dict(error=tail[-300:])
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  row['wall_s'] = round(time.time() - t0, 1)
  row['load1'] = load1
  return row


def run_ours(phase: str, args: dict, timeout: float) -> dict:
  return _run([sys.executable, '-m', 'benchmarks.vs_reference', '--json',
               json.dumps(dict(args, phase=phase))], timeout)


def torch_available(torch_python: str) -> str:
  """'' if `torch_python` can import torch, else why not."""
  if not torch_python:
    return 'no --torch_python / $TORCH_PYTHON'
  if not (os.path.exists(torch_python) or shutil.which(torch_python)):
    return f'{torch_python} not found'
  proc = subprocess.run([torch_python, '-c', 'import torch'], capture_output=True)
  return '' if proc.returncode == 0 else f'{torch_python} cannot import torch'


def run_reference(phase: str, args: dict, torch_python: str, step_script: str,
                  timeout: float, idc_repo: str = '') -> dict:
  if phase == 'idc':
    if not idc_repo:
      return dict(error='no --idc_repo / $IDC_REPO (a checkout of '
                  'snu-mllab/Efficient-Dataset-Condensation)')
    return _run([torch_python, os.path.join(_REPO, 'benchmarks', 'idc_reference.py'),
                 '--idc_repo', idc_repo, '--shape', args['shape'],
                 '--ipc', str(args['ipc']), '--reps', str(args['reps']),
                 '--warmup', str(args['warmup'])], timeout)
  if phase == 'step':
    cmd = [torch_python, step_script, '--shape', args['shape'],
           '--steps', str(args['steps']), '--n_images', str(args['n_images']),
           '--batch_syn', str(args['batch_syn']), '--reps', str(args['reps']),
           '--warmup', str(args['warmup'])]
    if not args.get('dsa', True):
      cmd.append('--no_dsa')
    row = _run(cmd, timeout)
    if 's_per_iter_median' in row:
      row['s'] = row['s_per_iter_median']
    return row
  cmd = [torch_python, os.path.join(_REPO, 'benchmarks', 'torch_ref.py'),
         '--phase', phase, '--model', args.get('model', 'convnet'),
         '--shape', args['shape'], '--images', str(args['images']),
         '--epochs', str(args.get('epochs', 1)), '--reps', str(args['reps']),
         '--warmup', str(args['warmup']), '--step_script', step_script]
  if not args.get('dsa', True):
    cmd.append('--no_dsa')
  return _run(cmd, timeout)


def grid(a: argparse.Namespace) -> list[tuple[str, dict]]:
  """(phase, args) rows: the step grid, then one expert and one eval row per
  shape."""
  rows = []
  shapes = a.shapes.split(',')
  common = dict(reps=a.reps, warmup=a.warmup, width=a.width, dsa=not a.no_dsa)
  for phase in a.phases.split(','):
    for shape in shapes:
      if phase == 'step':
        for steps in [int(s) for s in a.steps.split(',')]:
          rows.append((phase, dict(common, shape=shape, steps=steps,
                                   n_images=a.n_images, batch_syn=a.batch_syn)))
      elif phase == 'expert':
        rows.append((phase, dict(common, shape=shape, images=a.expert_images)))
      elif phase == 'eval':
        for model in a.eval_models.split(','):
          rows.append((phase, dict(common, shape=shape, images=a.eval_images,
                                   epochs=a.eval_epochs, reps=min(a.reps, 1),
                                   warmup=0, model=model)))
      elif phase == 'idc':
        rows.append((phase, dict(common, shape=shape, ipc=a.idc_ipc)))
      else:
        raise SystemExit(f'unknown phase {phase!r}: step|expert|eval|idc')
  return rows


def _size(phase: str, args: dict) -> str:
  if phase == 'step':
    return f'{args["steps"]} steps'
  if phase == 'expert':
    return f'1 epoch, {args["images"]} images'
  if phase == 'idc':
    return f'1 outer step, ipc {args["ipc"]}'
  return f'{args["epochs"]} epochs, {args["images"]} images'


def _med(rows: list[dict], key: str):
  vals = [r[key] for r in rows if r.get(key) is not None]
  return statistics.median(vals) if vals else None


def _phase_opts(phase: str, opts: dict) -> dict:
  """The options of a variant that apply to `phase`."""
  if phase == 'step':
    return {k: v for k, v in opts.items() if k != 'trim_short_batch'}
  return {k: v for k, v in opts.items() if k in ('conv_impl', 'trim_short_batch')}


def run_grid(a: argparse.Namespace) -> tuple[list[dict], str]:
  variants = json.loads(a.ours) if a.ours else {'ours': {}}
  why_no_torch = '' if a.no_torch else torch_available(a.torch_python)
  if a.no_torch:
    why_no_torch = '--no_torch'
  if not why_no_torch and a.width != 128:
    why_no_torch = 'the reference is width 128 only'
  out = []
  for r, (phase, args) in enumerate(grid(a)):
    samples = {name: [] for name in variants}
    ref = []
    for k in range(a.rounds):
      def ours_all():
        seen = []
        for name, opts in variants.items():
          opts = _phase_opts(phase, opts)
          if opts in seen:  # same program as an earlier variant in this phase
            continue
          seen.append(opts)
          samples[name].append(run_ours(phase, dict(args, opts=opts), a.timeout))
      def reference():
        if not why_no_torch:
          ref.append(run_reference(phase, args, a.torch_python, a.step_script,
                                   a.timeout, a.idc_repo))
      order = (ours_all, reference) if (r + k) % 2 == 0 else (reference, ours_all)
      for f in order:
        f()
    row = dict(phase=phase, model=args.get('model', 'convnet'),
               shape=args['shape'], size=_size(phase, args), rounds=a.rounds)
    ref_s = _med(ref, 's')
    row['ref_s'] = None if ref_s is None else round(ref_s, 3)
    row['ref_rss_mib'] = _med(ref, 'peak_rss_mib')
    row['ref_load1'] = _med(ref, 'load1')
    if phase == 'idc':  # where each side spends the outer step
      row['ref_match_s'], row['ref_update_s'] = _med(ref, 'match_s'), _med(ref, 'update_s')
    errors = [x['error'] for x in ref if 'error' in x]
    if why_no_torch:
      row['note'] = f'reference skipped: {why_no_torch}'
    elif errors:
      row['note'] = f'reference failed: {errors[0]}'
    for name, rs in samples.items():
      if not rs:
        continue
      s = _med(rs, 's')
      p = '' if len(variants) == 1 else f'{name}_'
      row[p + 'ours_s'] = None if s is None else round(s, 3)
      row[p + 'ours_rss_mib'] = _med(rs, 'peak_rss_mib')
      row[p + 'ours_compile_s'] = _med(rs, 'compile_s') or _med(rs, 'first_s')
      row[p + 'ours_load1'] = _med(rs, 'load1')
      if phase == 'idc':
        row[p + 'ours_match_s'] = _med(rs, 'match_s')
        row[p + 'ours_update_s'] = _med(rs, 'update_s')
      if s and ref_s:
        row[p + 'ratio'] = round(ref_s / s, 2)
        if row[p + 'ours_rss_mib'] and row['ref_rss_mib']:
          row[p + 'rss_frac'] = round(row[p + 'ours_rss_mib'] / row['ref_rss_mib'], 2)
      if phase == 'eval' and _med(rs, 'first_s') and ref_s:
        row[p + 'ratio_incl_compile'] = round(ref_s / _med(rs, 'first_s'), 2)
      bad = [x['error'] for x in rs if 'error' in x]
      if bad:
        row['note'] = (row.get('note', '') + f' ours failed: {bad[0]}').strip()
    out.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  return out, why_no_torch


def summary(rows: list[dict]) -> list[str]:
  """Verdicts against issue 17's targets, where the rows allow them."""
  lines = []
  step = [r for r in rows if r['phase'] == 'step' and r.get('ratio')]
  if step:
    worst = min(step, key=lambda r: r['ratio'])
    lines.append(f'- step >= 2x the reference at every row: '
                 f'**{"PASS" if worst["ratio"] >= 2 else "FAIL"}** (worst '
                 f'{worst["ratio"]}x: {worst["shape"]}, {worst["size"]})')
    fr = [r['rss_frac'] for r in step if r.get('rss_frac')]
    if fr:
      lines.append(f'- step peak RSS <= 1/4 of the reference: '
                   f'**{"PASS" if max(fr) <= 0.25 else "FAIL"}** (worst {max(fr)})')
  for shape in sorted({r['shape'] for r in rows if r['phase'] == 'step'}):
    by = {r['size']: r for r in rows if r['phase'] == 'step' and r['shape'] == shape}
    a, b = by.get('10 steps'), by.get('80 steps')
    if a and b and a.get('ours_rss_mib') and b.get('ours_rss_mib'):
      q = b['ours_rss_mib'] / a['ours_rss_mib']
      lines.append(f'- memory 80 / 10 steps <= 1.5x, {shape}: '
                   f'**{"PASS" if q <= 1.5 else "FAIL"}** ({q:.2f}x)')
  for phase in ('expert', 'eval', 'idc'):
    rs = [r for r in rows if r['phase'] == phase and r.get('ratio')]
    if rs:
      worst = min(r['ratio'] for r in rs)
      lines.append(f'- {phase} >= 1.5x the reference: '
                   f'**{"PASS" if worst >= 1.5 else "FAIL"}** (worst {worst}x)')
  return lines


def parse(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--json', help='internal: measure one row of ours')
  p.add_argument('--phases', default='step')
  p.add_argument('--shapes', default='28x28x1,32x32x3')
  p.add_argument('--steps', default='10,20,40')
  p.add_argument('--n_images', type=int, default=100)
  p.add_argument('--batch_syn', type=int, default=100)
  p.add_argument('--expert_images', type=int, default=2560,
                 help='images per expert epoch (10 batches of 256)')
  p.add_argument('--eval_images', type=int, default=100)
  p.add_argument('--eval_epochs', type=int, default=300)
  p.add_argument('--eval_models', default='convnet,alexnet,vgg11,resnet18',
                 help='evaluation networks, one row each (--quick: convnet)')
  p.add_argument('--idc_ipc', type=int, default=10)
  p.add_argument('--idc_repo', default=os.environ.get('IDC_REPO', ''),
                 help='checkout of the official IDC code (phase idc)')
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--rounds', type=int, default=1,
                 help='alternate ours / reference this many times per row')
  p.add_argument('--width', type=int, default=128)
  p.add_argument('--no_dsa', action='store_true')
  p.add_argument('--ours', default='', help='JSON {name: step options}')
  p.add_argument('--torch_python', default=os.environ.get('TORCH_PYTHON', ''),
                 help='interpreter with torch (default $TORCH_PYTHON)')
  p.add_argument('--no_torch', action='store_true', help='our side only')
  p.add_argument('--step_script', default=os.environ.get(
      'TORCH_STEP_SCRIPT',
      os.path.join(os.path.dirname(_REPO), 'shared', 'bench', 'torch_mtt_step.py')))
  p.add_argument('--timeout', type=float, default=3600)
  p.add_argument('--quick', action='store_true',
                 help='smoke test: 32x32x3, 1-2 steps on 20 images, 1 rep, '
                 'a 256-image expert epoch, 3 eval epochs')
  p.add_argument('--out', default='benchmarks/results/vs_reference')
  a = p.parse_args(argv)
  if a.quick:  # defaults for the smoke test; explicit flags still win
    p.set_defaults(shapes='32x32x3', steps='1,2', n_images=20, batch_syn=20,
                   expert_images=256, eval_epochs=3, reps=1, warmup=1,
                   phases='step,expert,eval', eval_models='convnet')
    a = p.parse_args(argv)
  return a


def main(argv=None) -> list[dict]:
  a = parse(argv)
  if a.json:
    args = json.loads(a.json)
    print(json.dumps(_MEASURE[args['phase']](args)))
    return []
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  rows, why_no_torch = run_grid(a)
  cmd = 'python -m benchmarks.vs_reference ' + ' '.join(sys.argv[1:] if argv is None else argv)
  cols = ['phase', 'model', 'shape', 'size']
  for k in rows[0] if rows else []:
    pass
  keys = []
  for r in rows:
    keys += [k for k in r if k not in keys and k not in cols + ['rounds', 'note']]
  cols += keys + ['note']
  lines = summary(rows)
  table = common.write_outputs(
      rows, cols, a.out,
      'Ours vs the PyTorch reference (ratio = reference s / our s; one process '
      'per measurement, alternating)', cmd,
      extra=dict(summary=lines, torch_python=a.torch_python,
                 step_script=a.step_script, torch_skipped=why_no_torch,
                 load_avg=os.getloadavg(), xla_flags=os.environ.get('XLA_FLAGS', '')),
      footer='\n'.join(['', 'Targets (issue 17):', ''] + lines) if lines else '')
  print(table)
  return rows


if __name__ == '__main__':
  main()
