"""Where the time of one distillation meta-gradient goes, from a profiler trace.

  python -m benchmarks.profile_step --shapes=32x32x3,28x28x1 --steps=10 --remat=1

`--program=expert` (one expert epoch on `--images` images) or `--program=eval`
(an evaluation schedule of `--steps` epochs on 100 images) profile the
first-order training programs the same way.

For each shape: compile the meta-gradient (ConvNet-3 w128, 100 images, DSA on,
same call as `benchmarks.distill_step`), run it once untraced, then `--reps`
times under `jax.profiler.trace(create_perfetto_trace=True)`. XLA:CPU's thunk
executor emits one trace event per executed thunk (`args.hlo_op` = the HLO
instruction). Every thunk is mapped to the compiled module's HLO
(`compiled.as_text()`): a fusion to the instructions it calls, every
instruction to its user-code stack (the module's StackFrames table). Thunk time
is then attributed to a category:

* conv (lax convolution): `convolution` HLO ops -- forward and input gradient
  of `conv2d` at every differentiation order (they share one op family);
* conv (kernel-grad matmul): `dot`s under `conv2d` whose output is
  kernel-shaped (patches^T @ g); conv (other matmuls): the other `dot`s there
  (patches @ dK, few-output-channel convolutions);
* conv (im2col patches): slices / concatenates / pads of the patch matrix and
  their transposes; conv (bias, other) the rest under `conv2d`;
* instance norm, pooling + relu, classifier + loss, SGD update, match loss;
* DSA: ops under `seqmatch_jax/augment.py`, by function (_bilinear_zeros...);
* minibatch gather (`images[i]`, `labels[i]` in the unroll step) and the
  minibatch schedule (permutations);
* scan / copies / other: thunks with no user-code stack (while loops, copies
  XLA inserts, loop-carried buffers) or none of the above.

A fusion that contains a `dot` or `convolution` is attributed to that op's
category (XLA:CPU fuses normalisation reductions and bias adds into the
matmul as epilogues: that time is inseparable in the trace); any other fusion
to the category holding most of its output elements. Thunks run on two
threads (inter-op parallelism), so the category sums are thread-seconds; the
table gives each as a share of the total thunk time and the wall time of the
traced calls. `--ablate` cross-checks with whole-step timings where a
component is removed (norm='none', DSA off).

`--one_core=1` profiles the same call again in a child process pinned to one
CPU (XLA:CPU sizes its thread pool from the affinity mask) and compares every
thunk's time with its one-core time: a thunk that takes as long on two cores as
on one ran on a single thread. Summed one-core thunk time over two is what the
call would take if every thunk used both cores; the table says how far the
two-core wall is from that, and which thunks hold the difference.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

_SHAPE_RE = re.compile(r'^(?:\(|)\w+\[([\d,]*)\]')
_INSTR_RE = re.compile(
    r'^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\(', re.M)


def _section(text: str, name: str) -> list[str]:
  m = re.search(r'^' + name + r'\n(.*?)(?:\n\n|\Z)', text, re.S | re.M)
  return m.group(1).splitlines() if m else []


class HloIndex:
  """Instructions of a compiled module: opcode, shape, callee, user stack."""

  def __init__(self, text: str):
    files = {int(l.split()[0]): l.split(None, 1)[1].strip('"')
             for l in _section(text, 'FileNames')}
    funcs = {int(l.split()[0]): l.split(None, 1)[1].strip('"')
             for l in _section(text, 'FunctionNames')}
    locs = {}
    for l in _section(text, 'FileLocations'):
      d = dict(re.findall(r'(\w+)=(\d+)', l))
      locs[int(l.split()[0])] = (os.path.basename(files[int(d['file_name_id'])]),
                                 funcs[int(d['function_name_id'])],
                                 int(d['line']))
    self.frames = {}
    for l in _section(text, 'StackFrames'):
      d = dict(re.findall(r'(\w+)=(\d+)', l))
      self.frames[int(l.split()[0])] = (locs[int(d['file_location_id'])],
                                        int(d['parent_frame_id']))
    self.instr = {}  # name -> dict(op, dims, calls, frame, comp)
    self.comps = collections.defaultdict(list)
    comp = None
    for line in text.splitlines():
      m = re.match(r'^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$', line)
      if m:
        comp = m.group(1)
        continue
      m = _INSTR_RE.match(line)
      if not m or comp is None:
        continue
      name, shape, op = m.groups()
      dims = _SHAPE_RE.match(shape.strip())
      dims = ([int(v) for v in dims.group(1).split(',') if v]
              if dims else None)
      calls = re.search(r'calls=%([\w.\-]+)', line)
      frame = re.search(r'stack_frame_id=(\d+)', line)
      self.instr[name] = dict(
          op=op, dims=dims, calls=calls.group(1) if calls else None,
          frame=int(frame.group(1)) if frame else None, comp=comp)
      self.comps[comp].append(name)

  def stack(self, frame_id):
    """Innermost-first [(file, function, line)] of one stack frame id."""
    out, seen = [], set()
    while frame_id in self.frames and frame_id not in seen:
      seen.add(frame_id)
      loc, parent = self.frames[frame_id]
      out.append(loc)
      # The text format prints parent_frame_id one above the parent's id
      # (0 = no parent): checked against full stacks of known ops.
      frame_id = parent - 1
    return out

  def leaves(self, name):
    """The instructions a thunk executes (a fusion's body, recursively)."""
    ins = self.instr.get(name)
    if ins is None:
      return []
    if ins['op'] == 'fusion' and ins['calls']:
      out = []
      for n in self.comps.get(ins['calls'], []):
        out.extend(self.leaves(n) if self.instr[n]['op'] == 'fusion'
                   else [n])
      return out
    return [name]


_TRIVIAL = {'parameter', 'constant', 'bitcast', 'get-tuple-element', 'tuple'}


def _numel(dims):
  n = 1
  for d in dims or []:
    n *= d
  return n


def categorize(idx: HloIndex, name: str) -> str:
  ins = idx.instr[name]
  op = ins['op']
  stack = idx.stack(ins['frame']) if ins['frame'] else []
  funcs = [f for _, f, _ in stack]
  files = [f for f, _, _ in stack]
  if op == 'convolution':
    return 'conv: lax convolution (fwd + input-grad, all orders)'
  if 'conv2d' in funcs or 'Conv.__call__' in funcs:
    if op == 'dot':
      if ins['dims'] and len(ins['dims']) == 2 and ins['dims'][0] < 5000:
        return 'conv: kernel-grad matmul (patches^T g)'
      # patches @ dK (the kernel gradient's transpose, before it became a
      # convolution) and the matmul of few-output-channel convolutions.
      return 'conv: other matmuls (patches @ dK, few-output convs)'
    if op in ('slice', 'concatenate', 'pad', 'dynamic-slice',
              'dynamic-update-slice', 'transpose', 'copy', 'reverse'):
      return 'conv: im2col patches / pads / transposes'
    return 'conv: bias + other'
  for f in funcs:
    if f.startswith('InstanceNorm'):
      return 'instance norm'
  if 'augment.py' in files:
    inner = next(f for (fl, f, _) in stack if fl == 'augment.py')
    base = inner.split('.')[0]
    if base in ('_bilinear_zeros', '_affine', '_scale', '_rotate'):
      return 'DSA: scale/rotate (bilinear resampling)'
    if base in ('sample_params', 'augment', 'apply_params', 'augment_siamese'):
      return 'DSA: parameter sampling + switch'
    return 'DSA: ' + base.strip('_')
  if 'batch_schedule' in funcs:
    return 'minibatch schedule (permutations)'
  if stack and stack[0][0] == 'matching.py' and stack[0][1].endswith('step'):
    # `x = images[i]` and `labels[i]` in the step body; the SGD update lambda
    # is a separate function.
    return 'minibatch gather'
  if any('avg_pool' in f or '_pool2x2' in f for f in funcs):
    return 'pool + relu'
  if 'ConvNet.__call__' in funcs:
    return 'pool + relu'
  if 'Dense.__call__' in funcs or 'masked_loss' in funcs:
    return 'classifier + cross-entropy'
  if any('<lambda>' in f for f in funcs) and 'matching.py' in files and \
      'match_loss' not in funcs:
    return 'SGD update'
  if 'match_loss' in funcs or 'squared_distance' in funcs:
    return 'match loss'
  if op in ('while', 'call', 'conditional', 'copy', 'copy-start', 'copy-done'):
    return 'scan / copies / other'
  return 'scan / copies / other'


def thunk_category(idx: HloIndex, name: str) -> str:
  leaves = [n for n in idx.leaves(name) if idx.instr[n]['op'] not in _TRIVIAL]
  if not leaves:
    return 'scan / copies / other'
  heavy = [n for n in leaves if idx.instr[n]['op'] in ('dot', 'convolution')]
  if heavy:
    heavy.sort(key=lambda n: -_numel(idx.instr[n]['dims']))
    return categorize(idx, heavy[0])
  votes = collections.Counter()
  for n in leaves:
    votes[categorize(idx, n)] += _numel(idx.instr[n]['dims'])
  return votes.most_common(1)[0][0]


def _build_training(program, shape, steps, images, norm, augment, width):
  """The compiled first-order programs: one expert epoch on `images` images
  (batch 256, SGD lr 0.01, as `vs_reference`'s expert row) or an evaluation
  schedule of `steps` epochs on 100 images (the evaluation protocol's SGD,
  short batch trimmed, as `vs_reference`'s eval row without the test pass)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from seqmatch_jax import evaluate
  from seqmatch_jax import training
  from seqmatch_jax.models import create_network
  from benchmarks import vs_reference
  if program == 'expert':
    fn, args = vs_reference.expert_epoch(shape, images, width, augment,
                                         norm=norm)
    return fn.lower(*args).compile(), args
  net = create_network('convnet', 10, shape, width=width, depth=3, norm=norm)
  params, state = net.init(jax.random.key(2))
  x = jax.random.normal(jax.random.key(0), (100, *shape))
  y = jnp.repeat(jnp.arange(10), 10)
  spec = evaluate.Protocol(epochs=steps, augment=augment,
                           trim_short_batch=True).sgd()
  fn = jax.jit(lambda p, s, k: training.train_schedule(
      net, spec, p, s, x, y, k, jnp.float32(0.01), steps))
  args = (params, state, jax.random.key(3))
  return fn.lower(*args).compile(), args


def _build(shape, steps, remat, norm='instance',
           augment='color_crop_cutout_flip_scale_rotate', width=128,
           n_images=100, program='step', images=2560):
  """The compiled program and its arguments (ConvNet-3, 10 classes; the key
  last): the meta-gradient, or an expert epoch / evaluation schedule."""
  if program != 'step':
    return _build_training(program, shape, steps, images, norm, augment, width)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from seqmatch_jax import matching
  from seqmatch_jax.models import create_network
  h, w, c = shape
  net = create_network('convnet', 10, (h, w, c), width=width, depth=3, norm=norm)
  key = jax.random.key(0)
  params, _ = net.init(key)
  target = jax.tree.map(lambda p: p + 0.01, params)
  images = jax.random.normal(key, (n_images, h, w, c))
  labels = jnp.repeat(jnp.arange(10), n_images // 10)
  fn = jax.jit(matching.meta_gradient(net, num_steps=steps, batch_size=n_images,
                                      augment=augment, remat=bool(remat)))
  args = (images, jnp.float32(0.01), images[:0], labels, params, target,
          jax.random.key(1))
  compiled = fn.lower(*args).compile()
  return compiled, args


def profile(shape, steps, remat, reps, trace_dir, program='step',
            images=2560):
  import jax  # pylint: disable=g-import-not-at-top
  compiled, args = _build(shape, steps, remat, program=program, images=images)
  idx = HloIndex(compiled.as_text())
  jax.block_until_ready(compiled(*args))
  walls = []
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for i in range(reps):
      t0 = time.time()
      jax.block_until_ready(compiled(*args[:-1], jax.random.key(2 + i)))
      walls.append(time.time() - t0)
  path = sorted(glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'),
                          recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)['traceEvents']
  cat_us = collections.Counter()
  op_us = collections.Counter()
  unknown = 0.0
  for e in events:
    if e.get('ph') != 'X' or e['name'].startswith('end: '):
      continue
    op = (e.get('args') or {}).get('hlo_op')
    if not op:
      continue
    if op not in idx.instr:
      unknown += e['dur']
      cat_us['scan / copies / other'] += e['dur']
      continue
    cat = thunk_category(idx, op)
    cat_us[cat] += e['dur']
    op_us[(op, cat)] += e['dur']
  total = sum(cat_us.values())
  # Every thunk above 1 ms per call, for the one-core comparison.
  per_op = {o: [c, round(v / 1e3 / reps, 2)] for (o, c), v in op_us.items()
            if v / 1e3 / reps >= 1.0}
  return dict(shape='x'.join(map(str, shape)), steps=steps, remat=remat,
              program=program, per_op_ms=per_op,
              reps=reps, wall_s=[round(w, 3) for w in walls],
              thunk_s=round(total / 1e6 / reps, 3),
              categories={k: round(v / 1e6 / reps, 3)
                          for k, v in cat_us.most_common()},
              top_ops=[(o, c, round(v / 1e6 / reps, 3))
                       for (o, c), v in op_us.most_common(15)],
              unmapped_s=round(unknown / 1e6 / reps, 3))


def ablate(shape, steps, remat, reps):
  """Whole-step medians with a component removed (cross-check)."""
  import jax  # pylint: disable=g-import-not-at-top
  out = {}
  for label, kw in (('full', {}), ('norm=none', dict(norm='none')),
                    ('DSA off', dict(augment=''))):
    compiled, args = _build(shape, steps, remat, **kw)
    jax.block_until_ready(compiled(*args))
    ts = []
    for i in range(reps):
      t0 = time.time()
      jax.block_until_ready(compiled(*args[:-1], jax.random.key(2 + i)))
      ts.append(time.time() - t0)
    out[label] = round(statistics.median(ts), 3)
  return out


def profile_one_core(shape, steps, remat, reps, program='step',
                     images=2560) -> dict:
  """`profile` in a child process that may use only one CPU."""
  import subprocess  # pylint: disable=g-import-not-at-top
  cpu = min(os.sched_getaffinity(0))
  args = [sys.executable, '-m', 'benchmarks.profile_step', '--child_json',
          json.dumps(dict(shape=shape, steps=steps, remat=remat, reps=reps,
                          program=program, images=images))]
  proc = subprocess.run(
      args, check=True, capture_output=True, text=True,
      preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
  return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_cores(two: dict, one: dict, serial_below: float = 1.25) -> dict:
  """Per-thunk two-core vs one-core time, and the single-threaded ones.

  A thunk whose one-core time is less than `serial_below` times its two-core
  time gained (almost) nothing from the second core. Thunks are matched by
  name (both processes compile the same program); `unmatched` counts the
  two-core thunks the child did not report.
  """
  rows, serial_ms, unmatched = [], 0.0, 0
  for op, (cat, t2) in two['per_op_ms'].items():
    if op not in one['per_op_ms']:
      unmatched += 1
      continue
    t1 = one['per_op_ms'][op][1]
    gain = t1 / t2  # t2 >= 1 ms: `profile` keeps thunks from 1 ms up
    if gain < serial_below:
      serial_ms += t2
    rows.append((op, cat, t2, t1, round(gain, 2)))
  rows.sort(key=lambda r: -r[2])
  one_thunk_s = one['thunk_s']
  return dict(
      one_core_wall_s=statistics.median(one['wall_s']),
      one_core_thunk_s=one_thunk_s,
      all_parallel_bound_s=round(one_thunk_s / 2, 3),
      serial_thunk_s=round(serial_ms / 1e3, 3),
      serial_below=serial_below, unmatched=unmatched,
      rows=rows[:20])


def to_markdown(results: list[dict], command: str) -> str:
  lines = ['### Profile of one compiled call (jax.profiler thunk trace)', '',
           f'`{command}`', '']
  for r in results:
    walls = r['wall_s']
    program = r.get('program', 'step')
    what = {'step': f"meta-gradient, syn_steps {r['steps']}, remat {r['remat']}",
            'eval': f"evaluation schedule, {r['steps']} epochs on 100 images",
            'expert': 'expert epoch'}[program]
    lines += [f"#### {r['shape']}, {what} ({r['reps']} traced calls)", '',
              f"wall per call (traced): {statistics.median(walls):.3f} s; "
              f"summed thunk time per call: {r['thunk_s']:.3f} thread-s "
              '(two threads run thunks concurrently)', '',
              '| category | s per call | share of thunk time |',
              '|---|---|---|']
    for k, v in r['categories'].items():
      lines.append(f'| {k} | {v:.3f} | {100 * v / r["thunk_s"]:.1f}% |')
    if r.get('ablation'):
      a = r['ablation']
      lines += ['', 'Ablation cross-check (untraced, median s per call): ' +
                ', '.join(f'{k} {v}' for k, v in a.items())]
    lines += ['', 'Top thunks:', '', '| thunk | category | s per call |',
              '|---|---|---|']
    for o, c, v in r['top_ops']:
      lines.append(f'| {o} | {c} | {v:.3f} |')
    lines.append('')
    cores = r.get('one_core')
    if cores:
      lines += [
          'Two cores against one (the same call profiled in a child pinned to '
          f"one CPU): one-core wall {cores['one_core_wall_s']:.3f} s, summed "
          f"one-core thunk time {cores['one_core_thunk_s']:.3f} s, so "
          f"{cores['all_parallel_bound_s']:.3f} s if every thunk used both "
          f"cores, against {statistics.median(walls):.3f} s traced. Thunks "
          f"that gained less than {cores['serial_below']}x from the second "
          f"core: {cores['serial_thunk_s']:.3f} thread-s per call.", '',
          '| thunk | category | ms per call, 2 cores | ms, 1 core | gain |',
          '|---|---|---|---|---|']
      for o, c, t2, t1, g in cores['rows']:
        lines.append(f'| {o} | {c} | {t2:.1f} | {t1:.1f} | {g:.2f} |')
      lines.append('')
  return '\n'.join(lines) + '\n'


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--shapes', default='32x32x3,28x28x1')
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--remat', type=int, default=1)
  p.add_argument('--reps', type=int, default=2)
  p.add_argument('--ablate', type=int, default=0,
                 help='also time norm=none / DSA off (this many reps)')
  p.add_argument('--program', default='step', choices=('step', 'expert', 'eval'),
                 help='the meta-gradient, one expert epoch, or an evaluation '
                 'schedule of --steps epochs')
  p.add_argument('--images', type=int, default=2560,
                 help='images of the expert epoch')
  p.add_argument('--one_core', type=int, default=0,
                 help='also profile pinned to one CPU and compare per thunk')
  p.add_argument('--child_json', help='internal: one profile, JSON out')
  p.add_argument('--out', default='benchmarks/results/profile_step')
  a = p.parse_args()
  if a.ablate and a.program != 'step':
    p.error('--ablate times the meta-gradient only (--program=step)')
  if a.child_json:
    c = json.loads(a.child_json)
    with tempfile.TemporaryDirectory() as d:
      r = profile(tuple(c['shape']), c['steps'], c['remat'], c['reps'], d,
                  c['program'], c['images'])
    print(json.dumps(r), flush=True)
    return
  results = []
  for s in a.shapes.split(','):
    shape = tuple(int(v) for v in s.split('x'))
    with tempfile.TemporaryDirectory() as d:
      r = profile(shape, a.steps, a.remat, a.reps, d, a.program, a.images)
    if a.ablate:
      r['ablation'] = ablate(shape, a.steps, a.remat, a.ablate)
    if a.one_core:
      r['one_core'] = compare_cores(
          r, profile_one_core(shape, a.steps, a.remat, a.reps, a.program,
                              a.images))
    results.append(r)
    print(json.dumps(r), file=sys.stderr, flush=True)
  cmd = 'python -m benchmarks.profile_step ' + ' '.join(sys.argv[1:])
  md = to_markdown(results, cmd)
  os.makedirs(os.path.dirname(a.out) or '.', exist_ok=True)
  with open(a.out + '.json', 'w') as f:
    json.dump(dict(command=cmd, results=results), f, indent=1)
  with open(a.out + '.md', 'w') as f:
    f.write(md)
  print(md)


if __name__ == '__main__':
  main()
