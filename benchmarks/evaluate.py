"""Wall time of the evaluation protocol for 5 models trained in parallel
(vmap) vs in sequence, on 100 synthetic images.

  python -m benchmarks.evaluate --shape=28x28x1 --epochs=300 --models=5
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def measure(args: dict) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from seqmatch_jax import evaluate
  from seqmatch_jax.models import create_network
  from benchmarks import common

  h, w, c = args['shape']
  net = create_network('convnet', 10, (h, w, c), width=args.get('width', 128), depth=3)
  x = jax.random.normal(jax.random.key(0), (100, h, w, c))
  y = jnp.repeat(jnp.arange(10), 10)
  xt = jax.random.normal(jax.random.key(1), (500, h, w, c))
  yt = jnp.repeat(jnp.arange(10), 50)
  protocol = evaluate.Protocol(epochs=args['epochs'], parallel=args['mode'])
  keys = jax.random.split(jax.random.key(2), args['models'])
  t0 = time.time()
  evaluate.train_and_score(net, protocol, keys[:1], [(x, y)], jnp.ones(1) * 0.01, xt, yt)
  one_s = time.time() - t0  # includes compiling the single-model runner
  t0 = time.time()
  evaluate.train_and_score(net, protocol, keys, [(x, y)], jnp.ones(1) * 0.01, xt, yt)
  total = time.time() - t0
  return dict(shape='x'.join(map(str, args['shape'])), epochs=args['epochs'],
              models=args['models'], mode=args['mode'], first_single_s=round(one_s, 1),
              wall_s_all=round(total, 1), peak_rss_mib=common.self_peak_rss_mib(),
              backend=jax.default_backend())


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--json')
  p.add_argument('--shape', default='28x28x1')
  p.add_argument('--epochs', type=int, default=300)
  p.add_argument('--models', type=int, default=5)
  p.add_argument('--width', type=int, default=128)
  p.add_argument('--modes', default='sequential,vmap')
  p.add_argument('--out', default='benchmarks/results/evaluate')
  a = p.parse_args()
  if a.json:
    print(json.dumps(measure(json.loads(a.json))))
    return
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  rows = []
  for mode in a.modes.split(','):
    row = common.run_isolated('benchmarks.evaluate', dict(
        shape=[int(v) for v in a.shape.split('x')], epochs=a.epochs,
        models=a.models, mode=mode, width=a.width))
    rows.append(row)
    print(json.dumps(row), file=sys.stderr, flush=True)
  cmd = 'python -m benchmarks.evaluate ' + ' '.join(sys.argv[1:])
  print(common.write_outputs(
      rows, ['shape', 'epochs', 'models', 'mode', 'wall_s_all', 'first_single_s',
             'peak_rss_mib'], a.out, 'Evaluation: models in parallel vs in sequence',
      cmd))


if __name__ == '__main__':
  main()
