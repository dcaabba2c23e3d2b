"""Expert-epochs per second with 1, 4 and 8 experts per batch (vmapped) vs the
same experts one after another, for ConvNet-3 on random 32x32x3 data and on
digits; `--optimizers=sgd,gsam` also times FTD's GSAM experts (two
forward/backward passes per step).

  python -m benchmarks.experts --images=1024 --groups=1,4,8
  python -m benchmarks.experts --data=digits --groups=1 --modes=sequential \
      --optimizers=sgd,gsam

One process per configuration; the epoch is timed after compilation.
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
  from seqmatch_jax import training
  from seqmatch_jax.models import create_network
  from benchmarks import common

  if args['data'] == 'digits':
    from seqmatch_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    ds = data_lib.load_dataset('digits')
    pre = data_lib.fit_preprocessor(ds, zca=False)
    x = jnp.asarray(pre.to_model(ds.x_train))
    y = jnp.asarray(ds.y_train)
    net = create_network('convnet', 10, (8, 8, 1), width=64, depth=2)
  else:
    x = jax.random.normal(jax.random.key(0), (args['images'], 32, 32, 3))
    y = jax.random.randint(jax.random.key(1), (args['images'],), 0, 10)
    net = create_network('convnet', 10, (32, 32, 3), width=128, depth=3)
  gsam = (0.01, 0.3) if args.get('optimizer', 'sgd') == 'gsam' else None
  spec = training.SGDSpec(batch_size=256, augment='color_crop_cutout_flip_scale_rotate',
                          gsam=gsam)
  g = args['group']
  keys = jax.random.split(jax.random.key(2), g)
  params, state = jax.vmap(net.init)(keys)
  opt = jax.vmap(spec.transform().init)(params)
  one = lambda p, s, o, k: training.run_epoch(net, spec, p, s, o, x, y, k,
                                              jnp.float32(0.01))
  if args['mode'] == 'vmap':
    fn = jax.jit(jax.vmap(one))
    run = lambda: fn(params, state, opt, keys)
  else:
    fn = jax.jit(one)
    run = lambda: [fn(*jax.tree.map(lambda a, i=i: a[i], (params, state, opt)),
                      keys[i]) for i in range(g)]
  t0 = time.time()
  jax.block_until_ready(run())
  first = time.time() - t0
  times = []
  for _ in range(args.get('reps', 3)):
    t0 = time.time()
    jax.block_until_ready(run())
    times.append(time.time() - t0)
  med = statistics.median(times)
  return dict(data=args['data'], images=int(x.shape[0]), experts=g,
              mode=args['mode'], optimizer=args.get('optimizer', 'sgd'),
              s_per_group_epoch=round(med, 3),
              expert_epochs_per_s=round(g / med, 3), first_call_s=round(first, 1),
              peak_rss_mib=common.self_peak_rss_mib(), backend=jax.default_backend())


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--json')
  p.add_argument('--data', default='random32,digits')
  p.add_argument('--images', type=int, default=1024)
  p.add_argument('--groups', default='1,4,8')
  p.add_argument('--modes', default='vmap,sequential')
  p.add_argument('--optimizers', default='sgd')  # sgd,gsam
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--out', default='benchmarks/results/experts')
  a = p.parse_args()
  if a.json:
    print(json.dumps(measure(json.loads(a.json))))
    return
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  rows = []
  for data in a.data.split(','):
    for g in [int(v) for v in a.groups.split(',')]:
      for mode in a.modes.split(','):
        for opt in a.optimizers.split(','):
          if g == 1 and mode == 'vmap':
            continue
          row = common.run_isolated('benchmarks.experts', dict(
              data=data, images=a.images, group=g, mode=mode, reps=a.reps,
              optimizer=opt))
          rows.append(row)
          print(json.dumps(row), file=sys.stderr, flush=True)
  cmd = 'python -m benchmarks.experts ' + ' '.join(sys.argv[1:])
  print(common.write_outputs(
      rows, ['data', 'images', 'experts', 'mode', 'optimizer', 's_per_group_epoch',
             'expert_epochs_per_s', 'first_call_s', 'peak_rss_mib'],
      a.out, 'Expert training throughput', cmd))


if __name__ == '__main__':
  main()
