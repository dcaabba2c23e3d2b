#!/usr/bin/env python
"""BENCHMARK-ONLY PyTorch reference code: an expert epoch and an evaluation run.

Not part of the package and never imported by it: `benchmarks/vs_reference.py`
runs this file with a separate interpreter that has torch (`--torch_python`,
default $TORCH_PYTHON). Written for the benchmark (nothing copied from the
official repositories); the network, the functional forward and DSA come from
the step reference `torch_mtt_step.py` (shared/bench, itself checked against the
official code), loaded from `--step_script`.

Phases (what the official code does, as our JAX side does it):
  * expert: one epoch of a ConvNet-3 (width 128) on `--images` stand-in images
    (random normal; timing needs no real pixels), shuffled batches of 256
    (last one short), DSA per batch, cross-entropy, SGD lr 0.01, no momentum
    (the MTT buffer's teacher);
  * eval: a fresh ConvNet-3 trained `--epochs` epochs on `--images` images
    (100 = one batch of 256 per epoch), DSA, SGD lr 0.01 momentum 0.9 weight
    decay 5e-4, lr x0.1 and a fresh optimizer at epochs // 2, then accuracy on
    500 test images (the official `evaluate_synset`).

Prints one JSON line: phase, shape, s (median timed run), s_all, peak_rss_mib.
"""
import argparse
import importlib.util
import json
import os
import resource
import statistics
import sys
import time


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--phase', choices=('expert', 'eval'), required=True)
  ap.add_argument('--shape', default='32x32x3')
  ap.add_argument('--images', type=int, default=2560)
  ap.add_argument('--epochs', type=int, default=300, help='eval only')
  ap.add_argument('--test_images', type=int, default=500)
  ap.add_argument('--batch', type=int, default=256)
  ap.add_argument('--reps', type=int, default=3)
  ap.add_argument('--warmup', type=int, default=1)
  ap.add_argument('--threads', type=int, default=2)
  ap.add_argument('--no_dsa', action='store_true')
  ap.add_argument('--step_script', default=os.environ.get(
      'TORCH_STEP_SCRIPT', os.path.join(os.path.dirname(__file__), '..', '..',
                                        'shared', 'bench', 'torch_mtt_step.py')))
  return ap.parse_args(argv)


ARGS = parse_args()
for _var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
  os.environ[_var] = str(ARGS.threads)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def load_step_module(path):
  spec = importlib.util.spec_from_file_location('torch_mtt_step', path)
  mod = importlib.util.module_from_spec(spec)
  saved = sys.argv
  sys.argv = [path]  # it parses args only under __main__, but be safe
  try:
    spec.loader.exec_module(mod)
  finally:
    sys.argv = saved
  return mod


def main(args):
  torch.set_num_threads(args.threads)
  ref = load_step_module(args.step_script)
  h, w, c = (int(v) for v in args.shape.split('x'))
  torch.manual_seed(0)
  layout = ref.Layout(h, w, c)
  x_all = torch.randn(args.images, c, h, w)
  y_all = torch.randint(0, 10, (args.images,))
  x_test = torch.randn(args.test_images, c, h, w)
  y_test = torch.randint(0, 10, (args.test_images,))
  strategy = None if args.no_dsa else ref.DSA_STRATEGY

  def epoch(theta, opt):
    perm = torch.randperm(args.images)
    for idx in torch.split(perm, args.batch):
      x, y = x_all[idx], y_all[idx]
      if strategy:
        x = ref.diff_augment(x, strategy)
      loss = F.cross_entropy(ref.student_forward(theta, x, layout), y)
      opt.zero_grad()
      loss.backward()
      opt.step()

  def run():
    theta = ref.init_params(layout).requires_grad_(True)
    t0 = time.perf_counter()
    if args.phase == 'expert':
      epoch(theta, torch.optim.SGD([theta], lr=0.01))
    else:
      opt = torch.optim.SGD([theta], lr=0.01, momentum=0.9, weight_decay=5e-4)
      for e in range(args.epochs):
        if e == args.epochs // 2:
          opt = torch.optim.SGD([theta], lr=0.001, momentum=0.9,
                                weight_decay=5e-4)
        epoch(theta, opt)
      with torch.no_grad():
        acc = (ref.student_forward(theta, x_test, layout).argmax(1)
               == y_test).float().mean()
      del acc
    return time.perf_counter() - t0

  for _ in range(args.warmup):
    run()
  times = [run() for _ in range(args.reps)]
  print(json.dumps(dict(
      phase=args.phase, shape=args.shape, images=args.images,
      epochs=args.epochs if args.phase == 'eval' else 1,
      s=statistics.median(times), s_all=[round(t, 3) for t in times],
      peak_rss_mib=round(
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
      torch=torch.__version__, threads=torch.get_num_threads(),
      dsa=not args.no_dsa)))


if __name__ == '__main__':
  main(ARGS)
