"""The convolution and matmul work of a phase, timed kernel by kernel.

How fast can our distillation step (or expert epoch, or evaluation run) be on
this machine with XLA:CPU's kernels? This script answers with a floor rather
than a guess:

1. it compiles the phase as `vs_reference` times it (step: the ConvNet
   meta-gradient of `matching.meta_gradient`; expert / eval: epochs of
   `training.run_epoch`) and reads every `convolution` and `dot` of the
   compiled HLO, with its operand shapes, window and dimension numbers, each
   weighted by the trip counts of the loops around it (XLA may unroll short
   loops, so text counts alone would be wrong). The step is compiled again at
   twice the syn_steps: `per_step` is the difference, a check that the kernels
   scale with syn_steps;
2. it times each distinct kernel on its own, jitted, on random inputs of the
   same shapes (median of `--reps` calls). A kernel inside a fusion runs here
   without its fused epilogue, so this is what the kernel costs at least;
3. floor = sum over kernels (count x standalone time). Everything else the
   phase does (instance norm, ReLU, pooling, DSA, copies, the loop) is taken
   as free: no implementation of this computation on XLA:CPU's kernels runs
   faster. `--remat=0` gives the floor of the step without its recomputation
   (the unroll whose memory grows with syn_steps).

With `--torch_python` each kernel is also timed with PyTorch (oneDNN, the
reference's 2 threads), as NCHW `conv2d` and `matmul`: the same work list at
the reference's kernel rates, which shows where the gap is.

  python -m benchmarks.kernel_floor --shape=32x32x3 --steps=10 \
      --torch_python=/work/torchvenv/bin/python --ref_s=11.5
  python -m benchmarks.kernel_floor --phase=expert --steps=1 --ref_s=...
  python -m benchmarks.kernel_floor --phase=eval --steps=300 --trim_short_batch=1

`--ref_s` (the reference's seconds for the same work, from `vs_reference`)
turns the floor into the best ratio any XLA:CPU implementation could reach.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

from benchmarks import profile_step
from benchmarks import vs_reference

_DSA = 'color_crop_cutout_flip_scale_rotate'
_SHAPE = r'f32\[([\d,]*)\]'
_INSTR = re.compile(r'%([\w.\-]+) = ' + _SHAPE + r'\S* (\w[\w\-]*)\((.*?)\)(.*)$')


def _dims(s: str) -> tuple[int, ...]:
  return tuple(int(v) for v in s.split(',') if v)


def _shape_of(text: str) -> dict[str, tuple[int, ...]]:
  """Name -> f32 shape of every instruction and parameter in the module."""
  return {m.group(1): _dims(m.group(2)) for m in re.finditer(
      r'%([\w.\-]+) = ' + _SHAPE, text)}


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
  """Computation name -> its instruction lines, and the entry's name."""
  comps, entry, name = {}, None, None
  for line in text.splitlines():
    head = re.match(r'(ENTRY )?%([\w.\-]+) \(', line)
    if head and not line.startswith(' '):
      name = head.group(2)
      comps[name] = []
      if head.group(1):
        entry = name
    elif name is not None and line.startswith('  '):
      comps[name].append(line.strip())
  return comps, entry


def _multiplicity(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
  """How many times each computation runs per call of the entry.

  A while body runs its loop's `known_trip_count` times per run of the
  computation holding the loop; fusions, calls and reductions once (a
  reduction's `to_apply` holds no kernel); each branch of a conditional is
  counted as if taken (an upper bound; no kernel of the step sits in one).
  """
  edges = collections.defaultdict(list)   # callee -> [(caller, factor)]
  for caller, lines in comps.items():
    for line in lines:
      trip = 1
      if ' while(' in line:
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
        if not m:
          raise SystemExit(f'while loop without a known trip count: {line[:200]}')
        trip = int(m.group(1))
      for attr, callee in re.findall(
          r'(calls|body|condition|to_apply)=%([\w.\-]+)', line):
        edges[callee].append((caller, trip if attr == 'body' else 1))
      for group in re.findall(r'branch_computations=\{([^}]*)\}', line):
        for callee in re.findall(r'%([\w.\-]+)', group):
          edges[callee].append((caller, 1))
  memo = {entry: 1}

  def mult(comp: str) -> int:
    if comp not in memo:
      memo[comp] = sum(mult(c) * f for c, f in edges.get(comp, []))
    return memo[comp]
  return {c: mult(c) for c in comps}


def kernels(text: str) -> collections.Counter:
  """(kind, lhs, rhs, attrs) -> executions per call, over every convolution
  and dot of the compiled module, weighted by the loops around it."""
  shapes = _shape_of(text)
  comps, entry = _computations(text)
  times = _multiplicity(comps, entry)
  found = collections.Counter()
  for comp, lines in comps.items():
    for line in lines:
      m = _INSTR.search(line)
      if not m or m.group(3) not in ('convolution', 'dot'):
        continue
      operands = [o.strip().lstrip('%') for o in m.group(4).split(',')]
      if len(operands) != 2 or any(o not in shapes for o in operands):
        raise SystemExit(f'cannot read the operands of: {line[:200]}')
      attrs = m.group(5)
      if m.group(3) == 'convolution':
        window = re.search(r'window=\{([^}]*)\}', attrs)
        labels = re.search(r'dim_labels=(\S+?),', attrs + ',')
        key = ('conv', shapes[operands[0]], shapes[operands[1]],
               (window.group(1) if window else '', labels.group(1)))
      else:
        def dims(name, attrs=attrs):
          d = re.search(name + r'=\{([\d,]*)\}', attrs)
          return _dims(d.group(1)) if d else ()
        key = ('dot', shapes[operands[0]], shapes[operands[1]],
               (dims('lhs_contracting_dims'), dims('rhs_contracting_dims'),
                dims('lhs_batch_dims'), dims('rhs_batch_dims')))
      found[key] += times[comp]
  return found


def _window(spec: str, ndim: int):
  """HLO window text -> (strides, padding, lhs_dilation, rhs_dilation)."""
  def field(name, default):
    m = re.search(name + r'=([\d_x\-]+)', spec)
    if not m:
      return [default] * ndim
    return [tuple(int(v) for v in p.split('_')) if '_' in p else int(p)
            for p in m.group(1).split('x')]
  return (tuple(field('stride', 1)), tuple(field('pad', (0, 0))),
          tuple(field('lhs_dilate', 1)), tuple(field('rhs_dilate', 1)))


def build_op(kind: str, attrs):
  """A standalone JAX function for one kernel, or None if it is not supported."""
  from jax import lax  # pylint: disable=g-import-not-at-top
  if kind == 'dot':
    lc, rc, lb, rb = attrs
    return lambda a, b: lax.dot_general(a, b, ((lc, rc), (lb, rb)))
  window, labels = attrs
  if labels != 'b01f_01io->b01f':
    return None
  strides, padding, lhs_d, rhs_d = _window(window, 2)
  return lambda a, b: lax.conv_general_dilated(
      a, b, strides, padding, lhs_d, rhs_d,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def time_ours(work: list[dict], reps: int) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  key = jax.random.key(0)
  for w in work:
    fn = build_op(w['kind'], w['attrs'])
    if fn is None:
      w['ours_ms'] = None
      continue
    a = jax.random.normal(key, w['lhs'])
    b = jax.random.normal(key, w['rhs'])
    fn = jax.jit(fn)
    jax.block_until_ready(fn(a, b))
    times = []
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(a, b))
      times.append(time.perf_counter() - t0)
    w['ours_ms'] = round(statistics.median(times) * 1e3, 3)


_TORCH_KERNELS = r'''
import json, statistics, sys, time, torch
torch.set_num_threads(2)
work = json.loads(sys.argv[1]); reps = int(sys.argv[2]); out = []
for w in work:
  a, b = torch.randn(*w['lhs']), torch.randn(*w['rhs'])
  if w['kind'] == 'conv':
    if w.get('torch_conv') is None:
      out.append(None); continue
    pad, stride = w['torch_conv']
    a = a.permute(0, 3, 1, 2).contiguous(); b = b.permute(3, 2, 0, 1).contiguous()
    fn = lambda: torch.nn.functional.conv2d(a, b, padding=pad, stride=stride)
  else:
    lc, rc = w['attrs'][0], w['attrs'][1]
    if w['attrs'][2] or len(lc) != 1 or len(rc) != 1:
      out.append(None); continue
    am = a if lc[0] == 1 else a.t()
    bm = b if rc[0] == 0 else b.t()
    fn = lambda: am @ bm
  with torch.no_grad():
    fn(); ts = []
    for _ in range(reps):
      t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
  out.append(round(statistics.median(ts) * 1e3, 3))
print(json.dumps(out))
'''


def _torch_conv(w: dict):
  """(padding, stride) for torch's conv2d, when the HLO window is symmetric."""
  strides, padding, lhs_d, rhs_d = _window(w['attrs'][0], 2)
  if any(d != 1 for d in lhs_d + rhs_d) or any(lo != hi for lo, hi in padding):
    return None
  return [p[0] for p in padding], list(strides)


def time_torch(work: list[dict], reps: int, torch_python: str) -> None:
  payload = []
  for w in work:
    p = dict(kind=w['kind'], lhs=w['lhs'], rhs=w['rhs'], attrs=w['attrs'])
    if w['kind'] == 'conv':
      p['torch_conv'] = (_torch_conv(w) if w['attrs'][1] == 'b01f_01io->b01f'
                         else None)
    payload.append(p)
  proc = subprocess.run([torch_python, '-c', _TORCH_KERNELS, json.dumps(payload),
                         str(reps)], capture_output=True, text=True, check=True)
  for w, ms in zip(work, json.loads(proc.stdout.strip().splitlines()[-1])):
    w['torch_ms'] = ms


def compiled_text(phase: str, shape: tuple[int, int, int], steps: int,
                  a: argparse.Namespace) -> str:
  """The compiled HLO of one phase, built as `vs_reference` times it.

  step: the meta-gradient over `steps` unrolled steps on `n_images` images;
  expert: one epoch on `expert_images` images (batch 256, DSA); eval: one
  epoch of an evaluation model on `eval_images` images (batch 256, so a short
  batch, padded unless --trim_short_batch).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from seqmatch_jax import training
  from seqmatch_jax.models import create_network
  if phase == 'step':
    build = profile_step._build  # pylint: disable=protected-access
    compiled, _ = build(shape, steps, a.remat, width=a.width, n_images=a.n_images)
    return compiled.as_text()
  net = create_network('convnet', 10, shape, width=a.width, depth=3)
  key = jax.random.key(0)
  params, state = net.init(key)
  n = a.expert_images if phase == 'expert' else a.eval_images
  x = jax.random.normal(key, (n,) + shape)
  y = jnp.repeat(jnp.arange(10), n // 10)
  spec = training.SGDSpec(batch_size=256, augment=_DSA,
                          trim_short_batch=phase == 'eval' and a.trim_short_batch)
  opt = spec.transform().init(params)
  fn = jax.jit(lambda p, s, o, k: training.run_epoch(
      net, spec, p, s, o, x, y, k, jnp.float32(0.01)))
  return fn.lower(params, state, opt, jax.random.key(1)).compile().as_text()


def measure_phase(phase: str, shape, a: argparse.Namespace) -> float:
  """Our whole step / epoch with `vs_reference`'s own timer, for the floor's
  share of it."""
  common = dict(shape='x'.join(map(str, shape)), width=a.width,
                reps=a.step_reps, warmup=1)
  if phase == 'step':
    return vs_reference.measure_step(dict(common, steps=a.steps,
                                          n_images=a.n_images))['s']
  if phase == 'expert':
    return vs_reference.measure_expert(dict(common, images=a.expert_images))['s']
  return vs_reference.measure_eval(dict(
      common, images=a.eval_images, epochs=a.steps,
      opts=dict(trim_short_batch=a.trim_short_batch)))['s']


def floor(a: argparse.Namespace) -> tuple[list[dict], dict]:
  shape = tuple(int(v) for v in a.shape.split('x'))
  if a.phase == 'step':
    counts = kernels(compiled_text('step', shape, a.steps, a)).items()
    doubled = kernels(compiled_text('step', shape, 2 * a.steps, a))
    per_step = {k: (doubled[k] - n) / a.steps for k, n in counts}
  else:  # one epoch compiled; a run is `steps` epochs of it
    epoch = kernels(compiled_text(a.phase, shape, 1, a))
    counts = [(k, n * a.steps) for k, n in epoch.items()]
    per_step = dict(epoch)
  work = [dict(kind=k[0], lhs=list(k[1]), rhs=list(k[2]),
               attrs=[list(x) if isinstance(x, tuple) else x for x in k[3]],
               count=n, per_step=per_step[k]) for k, n in sorted(counts)]
  time_ours(work, a.reps)
  if a.torch_python:
    time_torch(work, a.reps, a.torch_python)
  for w in work:
    w['gflop'] = round(_flops(w) / 1e9, 3)
    if w.get('ours_ms'):
      w['ours_gflops'] = round(w['gflop'] / w['ours_ms'] * 1e3, 1)
    if w.get('torch_ms'):
      w['torch_gflops'] = round(w['gflop'] / w['torch_ms'] * 1e3, 1)
  summary = dict(phase=a.phase, shape=a.shape, steps=a.steps,
                 remat=a.remat if a.phase == 'step' else '',
                 kernel_calls=sum(w['count'] for w in work),
                 unsupported=sum(w['count'] for w in work if w['ours_ms'] is None),
                 floor_s=round(sum(w['count'] * (w['ours_ms'] or 0)
                                   for w in work) / 1e3, 3))
  if a.torch_python and all(w.get('torch_ms') is not None for w in work):
    summary['same_kernels_torch_s'] = round(
        sum(w['count'] * w['torch_ms'] for w in work) / 1e3, 3)
  if a.measure_step:
    summary['ours_s'] = round(measure_phase(a.phase, shape, a), 3)
    summary['floor_share'] = round(summary['floor_s'] / summary['ours_s'], 2)
  if a.ref_s:
    summary['ref_s'] = a.ref_s
    summary['best_ratio'] = round(a.ref_s / summary['floor_s'], 2)
  return work, summary


def _flops(w: dict) -> float:
  if w['kind'] == 'conv':
    # out = B x H' x W' x O; each output sums KH*KW*C products. Output size from
    # the window (exact for the SAME / VALID / strided windows seen here).
    strides, padding, lhs_d, _ = _window(w['attrs'][0], 2)
    b, h, wd, c = w['lhs']
    kh, kw, _, o = w['rhs']
    out = []
    for n, k, s, (lo, hi), d in zip((h, wd), (kh, kw), strides, padding, lhs_d):
      out.append(((n - 1) * d + 1 + lo + hi - k) // s + 1)
    return 2.0 * b * out[0] * out[1] * o * kh * kw * c
  lc = w['attrs'][0]
  k = math.prod(w['lhs'][i] for i in lc)
  return 2.0 * math.prod(w['lhs']) * math.prod(w['rhs']) / k


def to_markdown(work: list[dict], summary: dict, command: str) -> str:
  cols = ['kind', 'lhs', 'rhs', 'count', 'per_step', 'gflop', 'ours_ms', 'ours_gflops',
          'torch_ms', 'torch_gflops']
  lines = [f"### Kernel floor of the {summary['phase']} phase (XLA:CPU kernels alone)",
           '', f'`{command}`', '',
           '| ' + ' | '.join(cols) + ' |', '|' + '---|' * len(cols)]
  for w in work:
    lines.append('| ' + ' | '.join(
        'x'.join(map(str, w[c])) if c in ('lhs', 'rhs') else str(w.get(c, ''))
        for c in cols) + ' |')
  lines += ['', '| ' + ' | '.join(summary) + ' |', '|' + '---|' * len(summary),
            '| ' + ' | '.join(str(v) for v in summary.values()) + ' |', '']
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--phase', default='step', choices=('step', 'expert', 'eval'))
  p.add_argument('--shape', default='32x32x3')
  p.add_argument('--steps', type=int, default=10,
                 help='syn_steps (step), or epochs (expert: 1, eval: 300)')
  p.add_argument('--remat', type=int, default=1, help='step: jax.checkpoint per step')
  p.add_argument('--expert_images', type=int, default=2560)
  p.add_argument('--eval_images', type=int, default=100)
  p.add_argument('--trim_short_batch', type=int, default=0)
  p.add_argument('--width', type=int, default=128)
  p.add_argument('--n_images', type=int, default=100)
  p.add_argument('--reps', type=int, default=10)
  p.add_argument('--torch_python', default=os.environ.get('TORCH_PYTHON', ''))
  p.add_argument('--ref_s', type=float, default=None,
                 help="the reference's seconds for the same work (vs_reference)")
  p.add_argument('--measure_step', type=int, default=1,
                 help='also time our whole step / run, for the floor share')
  p.add_argument('--step_reps', type=int, default=2)
  p.add_argument('--out', default='benchmarks/results/kernel_floor')
  a = p.parse_args(argv)
  command = 'python -m benchmarks.kernel_floor ' + ' '.join(
      sys.argv[1:] if argv is None else argv)
  work, summary = floor(a)
  text = to_markdown(work, summary, command)
  print(text)
  if a.out:
    os.makedirs(os.path.dirname(a.out) or '.', exist_ok=True)
    with open(a.out + '.json', 'w') as f:
      json.dump(dict(command=command, kernels=work, summary=summary), f, indent=1)
    with open(a.out + '.md', 'w') as f:
      f.write(text)
  return work, summary


if __name__ == '__main__':
  main()
