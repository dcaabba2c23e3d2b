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
  * eval: a fresh `--model` trained `--epochs` epochs on `--images` images
    (100 = one batch of 256 per epoch), DSA, SGD lr 0.01 momentum 0.9 weight
    decay 5e-4, lr x0.1 and a fresh optimizer at epochs // 2, then accuracy on
    500 test images (the official `evaluate_synset`).

Models: 'convnet' is the step reference's functional ConvNet-3. 'alexnet',
'vgg11' and 'resnet18' are the DC-benchmark evaluation networks
(VICO-UoE/DatasetCondensation `networks.py`: AlexNet without normalisation,
VGG11 and ResNet18 with instance norm = GroupNorm(C, C)) as torch modules,
shaped like ours (seqmatch_jax/models/networks.py) so both sides time the same
computation: the 28x28-padding rule keyed on 28x28 inputs, 2x2 pools skipped
along sides of length 1, ResNet18's global average pool, the classifier sized
by the final map.

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
  ap.add_argument('--model', default='convnet',
                  choices=('convnet', 'alexnet', 'vgg11', 'resnet18'),
                  help='eval only')
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
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# ----------------------------------------------------------------------------- networks

def _first_pad(h, w, default, padded):
  return padded if (h, w) == (28, 28) else default


def _pool2x2(x, pool):
  """2x2 / stride-2 pooling, skipped along a side of length 1 (as ours)."""
  kh = 2 if x.shape[2] >= 2 else 1
  kw = 2 if x.shape[3] >= 2 else 1
  return x if kh == kw == 1 else pool(x, (kh, kw), (kh, kw))


class AlexNet(nn.Module):
  """5 convs (5x5, 5x5, 3x3 x3), ReLU, 3 max-pools, one linear; no norm."""

  def __init__(self, h, w, c, num_classes=10):
    super().__init__()
    pad0 = _first_pad(h, w, 2, 4)
    specs = [(c, 128, 5, pad0), (128, 192, 5, 2), (192, 256, 3, 1),
             (256, 192, 3, 1), (192, 192, 3, 1)]
    self.convs = nn.ModuleList(
        nn.Conv2d(i, o, k, padding=p) for i, o, k, p in specs)
    self.pool_after = (True, True, False, False, True)
    with torch.no_grad():
      feat = self.features(torch.zeros(2, c, h, w)).shape[1]
    self.fc = nn.Linear(feat, num_classes)

  def features(self, x):
    for conv, pool in zip(self.convs, self.pool_after):
      x = F.relu(conv(x))
      if pool:
        x = _pool2x2(x, F.max_pool2d)
    return x.flatten(1)

  def forward(self, x):
    return self.fc(self.features(x))


class VGG11(nn.Module):
  """VGG11: conv3x3 -> GroupNorm(C, C) -> ReLU blocks, max-pools, a linear."""
  cfg = (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M')

  def __init__(self, h, w, c, num_classes=10):
    super().__init__()
    layers, cin, first = [], c, True
    for item in self.cfg:
      if item == 'M':
        layers.append('M')
        continue
      pad = _first_pad(h, w, 1, 3) if first else 1
      first = False
      layers.append(nn.Sequential(nn.Conv2d(cin, item, 3, padding=pad),
                                  nn.GroupNorm(item, item), nn.ReLU()))
      cin = item
    self.blocks = nn.ModuleList(m for m in layers if m != 'M')
    self.order = ['M' if m == 'M' else 'C' for m in layers]
    with torch.no_grad():
      feat = self.features(torch.zeros(2, c, h, w)).shape[1]
    self.classifier = nn.Linear(feat, num_classes)

  def features(self, x):
    blocks = iter(self.blocks)
    for kind in self.order:
      x = _pool2x2(x, F.max_pool2d) if kind == 'M' else next(blocks)(x)
    return x.flatten(1)

  def forward(self, x):
    return self.classifier(self.features(x))


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.norm1 = nn.GroupNorm(cout, cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.norm2 = nn.GroupNorm(cout, cout)
    self.shortcut = nn.Sequential()
    if stride != 1 or cin != cout:
      self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                    nn.GroupNorm(cout, cout))

  def forward(self, x):
    out = F.relu(self.norm1(self.conv1(x)))
    out = self.norm2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
  """CIFAR ResNet18 (3x3 stem), instance norm, global average pool."""

  def __init__(self, h, w, c, num_classes=10):
    super().__init__()
    del h, w
    self.stem = nn.Sequential(nn.Conv2d(c, 64, 3, 1, 1, bias=False),
                              nn.GroupNorm(64, 64), nn.ReLU())
    blocks, cin = [], 64
    for stage, cout in enumerate((64, 128, 256, 512)):
      for b in range(2):
        blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and b == 0 else 1))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.classifier = nn.Linear(512, num_classes)

  def forward(self, x):
    x = self.blocks(self.stem(x))
    return self.classifier(x.mean(dim=(2, 3)))


NETWORKS = dict(alexnet=AlexNet, vgg11=VGG11, resnet18=ResNet18)


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

  def epoch(forward, opt):
    perm = torch.randperm(args.images)
    for idx in torch.split(perm, args.batch):
      x, y = x_all[idx], y_all[idx]
      if strategy:
        x = ref.diff_augment(x, strategy)
      loss = F.cross_entropy(forward(x), y)
      opt.zero_grad()
      loss.backward()
      opt.step()

  def model():
    """(forward, parameters) of a fresh network."""
    if args.phase == 'expert' or args.model == 'convnet':
      theta = ref.init_params(layout).requires_grad_(True)
      return (lambda x: ref.student_forward(theta, x, layout)), [theta]
    net = NETWORKS[args.model](h, w, c)
    return net, list(net.parameters())

  def run():
    forward, params = model()
    t0 = time.perf_counter()
    if args.phase == 'expert':
      epoch(forward, torch.optim.SGD(params, lr=0.01))
    else:
      opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
      for e in range(args.epochs):
        if e == args.epochs // 2:
          opt = torch.optim.SGD(params, lr=0.001, momentum=0.9,
                                weight_decay=5e-4)
        epoch(forward, opt)
      with torch.no_grad():
        acc = (forward(x_test).argmax(1) == y_test).float().mean()
      del acc
    return time.perf_counter() - t0

  for _ in range(args.warmup):
    run()
  times = [run() for _ in range(args.reps)]
  print(json.dumps(dict(
      phase=args.phase, shape=args.shape, images=args.images,
      model='convnet' if args.phase == 'expert' else args.model,
      epochs=args.epochs if args.phase == 'eval' else 1,
      s=statistics.median(times), s_all=[round(t, 3) for t in times],
      peak_rss_mib=round(
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
      torch=torch.__version__, threads=torch.get_num_threads(),
      dsa=not args.no_dsa)))


if __name__ == '__main__':
  main(ARGS)
