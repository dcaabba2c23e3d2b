"""The GPU suite of issue 17, as one table: distillation step grid, trajectories
batched per step, experts batched vs sequential, evaluation models vmapped vs
sequential. Driven by `benchmarks/gpu_suite.sh` (which see); `--tiny` runs
the same rows at toy sizes so the script can be checked on a CPU.

Each row is its own process (`common.run_isolated`), timed after compilation;
`peak_device_mib` is the accelerator's peak allocation where the backend
reports it, `peak_rss_mib` the host process's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from benchmarks import backbone_step

_DSA = 'color_crop_cutout_flip_scale_rotate'


def _device_peak() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return dict(peak_device_mib=round(stats['peak_bytes_in_use'] / 2**20, 1))
  return {}


def _timed(run, reps: int) -> tuple[float, float]:
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  jax.block_until_ready(run(0))
  first = time.perf_counter() - t0
  times = []
  for i in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(run(i + 1))
    times.append(time.perf_counter() - t0)
  return statistics.median(times), first


def measure(a: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from seqmatch_jax import evaluate, matching, training
  from seqmatch_jax.models import create_network
  from benchmarks import common

  shape = tuple(a['shape'])
  arch = a.get('arch', 'convnet')
  # As the pipeline's cross-architecture evaluation: AlexNet without norm.
  net = create_network(arch, 10, shape, width=a['width'], depth=3,
                       norm='none' if arch == 'alexnet' else 'instance')
  kind = a['kind']
  row = dict(kind=kind, shape='x'.join(map(str, shape)), arch=arch)
  if kind == 'step':
    n, t = a['n_images'], a['trajectories']
    keys = jax.random.split(jax.random.key(0), t)
    starts = jax.vmap(lambda k: net.init(k)[0])(keys)
    targets = jax.tree.map(lambda p: p + 0.01, starts)
    images = jax.random.normal(jax.random.key(1), (n, *shape))
    labels = jnp.repeat(jnp.arange(10), n // 10)
    mg = matching.meta_gradient(net, num_steps=a['steps'], batch_size=n,
                                augment=_DSA, remat=True)

    def batched(images, lr, start, target, key):
      # T trajectories against the same images in one program, gradients
      # averaged (what trajectories-per-step does on one device).
      out = jax.vmap(lambda s, g, k: mg(images, lr, images[:0], labels, s, g, k))(
          start, target, jax.random.split(key, t))
      return jax.tree.map(lambda v: jnp.mean(v, 0), out)

    fn = jax.jit(batched)
    s, first = _timed(lambda i: fn(images, jnp.float32(0.01), starts, targets,
                                   jax.random.key(2 + i)), a['reps'])
    row.update(steps=a['steps'], trajectories=t, s=round(s, 3),
               s_per_trajectory=round(s / t, 3), first_s=round(first, 1))
  elif kind == 'experts':
    g = a['experts']
    x = jax.random.normal(jax.random.key(0), (a['images'], *shape))
    y = jax.random.randint(jax.random.key(1), (a['images'],), 0, 10)
    spec = training.SGDSpec(batch_size=256, augment=_DSA)
    keys = jax.random.split(jax.random.key(2), g)
    params, state = jax.vmap(net.init)(keys)
    opt = jax.vmap(spec.transform().init)(params)
    one = lambda p, s, o, k: training.run_epoch(net, spec, p, s, o, x, y, k,
                                                jnp.float32(0.01))
    if a['mode'] == 'vmap':
      fn = jax.jit(jax.vmap(one))
      run = lambda i: fn(params, state, opt, keys)
    else:
      fn = jax.jit(one)
      run = lambda i: [fn(*jax.tree.map(lambda v, j=j: v[j], (params, state, opt)),
                          keys[j]) for j in range(g)]
    s, first = _timed(run, a['reps'])
    row.update(experts=g, mode=a['mode'], images=a['images'], s=round(s, 3),
               first_s=round(first, 1))
  elif kind == 'eval':
    m = a['models']
    x = jax.random.normal(jax.random.key(0), (100, *shape))
    y = jnp.repeat(jnp.arange(10), 10)
    xt = jax.random.normal(jax.random.key(1), (500, *shape))
    yt = jnp.repeat(jnp.arange(10), 50)
    protocol = evaluate.Protocol(epochs=a['epochs'], parallel=a['mode'])
    run = lambda i: evaluate.train_and_score(
        net, protocol, jax.random.split(jax.random.key(2 + i), m), [(x, y)],
        jnp.ones(1) * 0.01, xt, yt)
    s, first = _timed(run, a['reps'])
    row.update(models=m, mode=a['mode'], epochs=a['epochs'], s=round(s, 3),
               first_s=round(first, 1))
  row.update(_device_peak(), peak_rss_mib=common.self_peak_rss_mib(),
             backend=jax.default_backend(), device=str(jax.devices()[0].device_kind))
  return row


def rows_for(a: argparse.Namespace) -> list[dict]:
  shape = [int(v) for v in a.shape.split('x')]
  base = dict(shape=shape, width=a.width, reps=a.reps)
  rows = [dict(base, kind='step', steps=s, trajectories=1, n_images=a.n_images)
          for s in (int(v) for v in a.steps.split(','))]
  rows += [dict(base, kind='step', steps=int(a.steps.split(',')[0]),
                trajectories=t, n_images=a.n_images)
           for t in (int(v) for v in a.trajectories.split(',')) if t > 1]
  rows += [dict(base, kind='experts', experts=a.experts, mode=m,
                images=a.expert_images) for m in ('vmap', 'sequential')]
  rows += [dict(base, kind='eval', models=a.models, mode=m, epochs=a.eval_epochs)
           for m in ('vmap', 'sequential')]
  rows += [dict(base, kind='eval', models=1, mode='sequential', epochs=a.eval_epochs)]
  # One cross-architecture evaluation (the paper's Table 2): the same 5 models
  # x eval_epochs on each other network.
  # 'auto' as the pipeline: vmapped on an accelerator, one by one on a CPU
  # (vmapped AlexNet at 32x32 takes 10 GB and minutes there).
  rows += [dict(base, kind='eval', models=a.models, mode='auto', epochs=a.eval_epochs,
                arch=arch) for arch in a.architectures.split(',') if arch]
  return rows


def summary(rows: list[dict]) -> list[str]:
  ok = lambda **kw: next((r for r in rows if 's' in r and all(
      r.get(k) == v for k, v in kw.items())), None)
  lines = []
  ev, es = ok(kind='experts', mode='vmap'), ok(kind='experts', mode='sequential')
  if ev and es:
    q = ev['s'] / es['s']
    lines.append(f'- {ev["experts"]} experts batched < 1/2 sequential: '
                 f'**{"PASS" if q < 0.5 else "FAIL"}** ({q:.2f}x)')
  one = ok(kind='eval', models=1, arch='convnet')
  many = next((r.get('models') for r in rows
               if r.get('kind') == 'eval' and r.get('models', 1) > 1), None)
  for mode in ('vmap', 'sequential'):
    r = ok(kind='eval', mode=mode, models=many, arch='convnet')
    if r and one:
      q = r['s'] / one['s']
      lines.append(f'- {r["models"]} evaluation models ({mode}) within 1.5x of '
                   f'one: **{"PASS" if q <= 1.5 else "FAIL"}** ({q:.2f}x)')
  total = sum(r.get('wall_s', 0) for r in rows)
  lines.append(f'- whole suite within 8 minutes: **{"PASS" if total <= 480 else "FAIL"}** '
               f'({total:.0f} s of row processes)')
  lines.append('- step >= 3x the reference: compare the step rows with the '
               'reference step measured on the same GPU (not in this suite: '
               'torch_mtt_step.py is CPU-only).')
  return lines


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--json')
  p.add_argument('--tiny', action='store_true', help='toy sizes (CPU check)')
  p.add_argument('--shape', default='32x32x3')
  p.add_argument('--steps', default='10,20,40,80')
  p.add_argument('--trajectories', default='4,8')
  p.add_argument('--n_images', type=int, default=100)
  p.add_argument('--width', type=int, default=128)
  p.add_argument('--experts', type=int, default=8)
  p.add_argument('--expert_images', type=int, default=5120)
  p.add_argument('--models', type=int, default=5)
  p.add_argument('--eval_epochs', type=int, default=300)
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--architectures', default='alexnet,vgg11,resnet18',
                 help='cross-architecture evaluation rows ("" for none)')
  p.add_argument('--backbones', default=','.join(backbone_step.BACKBONES),
                 help='one-iteration rows, each backbone\'s CIFAR-10 ipc-10 row')
  p.add_argument('--out', default='benchmarks/results/gpu_suite')
  a = p.parse_args()
  if a.json:
    print(json.dumps(measure(json.loads(a.json))))
    return
  if a.tiny:
    a.steps, a.trajectories, a.n_images, a.width = '1,2', '2', 20, 8
    a.experts, a.expert_images, a.models, a.eval_epochs, a.reps = 2, 256, 2, 2, 1
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  rows = []
  for args in rows_for(a):
    row = common.run_isolated('benchmarks.gpu_suite', args, timeout=600)
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  # One distillation iteration of every backbone (its CIFAR-10 ipc-10 row).
  for args in backbone_step.rows_for(a.backbones, 10, a.tiny, a.reps):
    row = common.run_isolated('benchmarks.backbone_step', args, timeout=600)
    row['kind'] = 'backbone'
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  lines = summary(rows)
  cmd = 'python -m benchmarks.gpu_suite ' + ' '.join(sys.argv[1:])
  print(common.write_outputs(
      rows, ['kind', 'arch', 'backbone', 'shape', 'steps', 'trajectories', 'experts', 'models', 'mode',
             'epochs', 's', 's_per_iteration', 's_per_trajectory', 'first_s', 'peak_device_mib',
             'peak_rss_mib', 'wall_s', 'device', 'error'],
      a.out, 'GPU suite (issues 17, 26)', cmd, extra=dict(summary=lines),
      footer='\n'.join(['', 'Targets (issue 17):', ''] + lines)))


if __name__ == '__main__':
  main()
