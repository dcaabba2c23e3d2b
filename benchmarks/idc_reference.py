"""The reference side of the IDC row of `vs_reference.py`: one outer step of
the official IDC code (Kim et al., ICML 2022,
https://github.com/snu-mllab/Efficient-Dataset-Condensation), run from a
checkout of it on the CPU, with its own functions.

  IDC_REPO=/path/to/Efficient-Dataset-Condensation \
      /path/to/torch/python benchmarks/idc_reference.py --reps=2

One outer step is what `condense.condense` does per inner-loop iteration at
CIFAR-10 ipc 10 (`misc/reproduce.py`: ConvNet-3 width 128, instance norm,
factor 2, gradient matching with mse, real batch 64, at most 128 decoded
synthetic images per class): for each of the 10 classes, `loader_real.
class_sample` -> `synset.sample` -> the batch-shared `DiffAug` -> `matchloss`
-> an SGD step on the images; then `train.train_epoch` on real data with
`n_data=2000` (32 batches of 64, per-sample `DiffAug('color_crop')` and
CutMix with p 0.5). Data are random images of CIFAR's shape in [0, 1]; time
does not depend on their content. Runs with 2 threads, as our side's XLA.

The official code assumes CUDA; to run it unchanged on a CPU this script
(a) answers the imports it does not need here (torchvision,
efficientnet_pytorch, matplotlib) with empty modules, (b) creates tensors
that ask for 'cuda' on the CPU, and (c) restores `np.int` (NumPy >= 1.24
removed it; `misc/utils.rand_bbox` uses it). Nothing of the timed work is
replaced. Prints one JSON row (the last stdout line).
"""

from __future__ import annotations

import argparse
import functools
import importlib.abc
import importlib.machinery
import json
import os
import resource
import statistics
import sys
import time
import types

_STUBBED = ('torchvision', 'efficientnet_pytorch', 'matplotlib')


class _AnyType(type):
  """A class whose every attribute exists (another such class), e.g. the
  `datasets.folder.default_loader` a default argument names at import."""

  def __getattr__(cls, name):
    if name.startswith('__'):
      raise AttributeError(name)
    return _AnyType(name, (), {'__init__': lambda self, *a, **k: None})


class _Anything(types.ModuleType):
  """A module whose every attribute exists (a class it never instantiates)."""

  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    return _AnyType(name, (), {'__init__': lambda self, *a, **k: None})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):

  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in _STUBBED:
      return importlib.machinery.ModuleSpec(name, self, is_package=True)
    return None

  def create_module(self, spec):
    module = _Anything(spec.name)
    module.__path__ = []
    module.use = lambda *a, **k: None  # matplotlib.use('Agg')
    return module

  def exec_module(self, module):
    pass


def _cpu_factories(torch) -> None:
  """Tensor factories and `.to`/`.cuda` that ask for 'cuda' use the CPU."""
  def cpu(device):
    return 'cpu' if device is not None and 'cuda' in str(device) else device

  for name in ('tensor', 'zeros', 'ones', 'randn', 'rand', 'arange', 'randperm',
               'empty', 'full'):
    fn = getattr(torch, name)

    @functools.wraps(fn)
    def wrapped(*args, _fn=fn, **kwargs):
      if 'device' in kwargs:
        kwargs['device'] = cpu(kwargs['device'])
      return _fn(*args, **kwargs)
    setattr(torch, name, wrapped)
  to = torch.Tensor.to

  def to_cpu(self, *args, **kwargs):
    args = tuple(cpu(a) if isinstance(a, (str, torch.device)) else a for a in args)
    if 'device' in kwargs:
      kwargs['device'] = cpu(kwargs['device'])
    return to(self, *args, **kwargs)
  torch.Tensor.to = to_cpu
  torch.Tensor.cuda = lambda self, *a, **k: self
  torch.nn.Module.cuda = lambda self, *a, **k: self


def load_official(repo: str):
  """(condense, train, utils, augment) modules of the official code."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(os.path.join(repo, 'condense.py')):
    raise SystemExit(f'{repo!r} is not a checkout of snu-mllab/'
                     'Efficient-Dataset-Condensation (no condense.py); pass '
                     '--idc_repo or set $IDC_REPO.')
  if not hasattr(np, 'int'):
    np.int = int
  _cpu_factories(torch)
  sys.meta_path.insert(0, _StubFinder())
  sys.path.insert(0, repo)
  import condense  # pylint: disable=g-import-not-at-top
  import train  # pylint: disable=g-import-not-at-top
  from misc import augment, utils  # pylint: disable=g-import-not-at-top
  return condense, train, utils, augment


class _RealData:
  """The official loaders' two calls on in-memory images: `class_sample(c)`
  (ClassMemDataLoader: batch_real images of class c) and iteration (a
  shuffled stream of mixed-class batches, as the DataLoader train_epoch
  reads). `device` is not 'cpu', so train_epoch does not call `.cuda()`."""
  device = 'cuda'

  def __init__(self, images, labels, batch_size: int, nclass: int):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.images, self.labels, self.batch = images, labels, batch_size
    self.by_class = [torch.nonzero(labels == c).view(-1) for c in range(nclass)]

  def class_sample(self, c, ipc=-1):
    idx = self.by_class[c]
    n = self.batch if ipc < 0 else ipc
    pick = idx[self.torch.randperm(len(idx))[:n]]
    return self.images[pick], self.labels[pick]

  def __len__(self):
    return len(self.images) // self.batch

  def __iter__(self):
    perm = self.torch.randperm(len(self.images))
    for i in range(len(self)):
      j = perm[i * self.batch:(i + 1) * self.batch]
      yield self.images[j], self.labels[j]


def measure(a: argparse.Namespace) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  np.random.seed(0)
  condense, train, utils, augment = load_official(a.idc_repo)
  h, w, ch = (int(v) for v in a.shape.split('x'))
  nclass = 10
  args = argparse.Namespace(
      # misc/reproduce.py (CIFAR-10, ipc 10) and argument.py defaults.
      ipc=a.ipc, factor=2, decode_type='single', dataset='cifar10',
      net_type='convnet', depth=3, width=1.0, norm_type='instance', size=h,
      nch=ch, nclass=nclass, match='grad', metric='mse', bias=False, fc=False,
      batch_real=64, batch_syn_max=128, lr_img=5e-3 * a.ipc / 10, mom_img=0.5,
      lr=0.01, momentum=0.9, weight_decay=5e-4, mix_p=0.5, beta=1.0,
      n_data=2000, aug_type='color_crop_cutout', mixup_net='cut',
      print_freq=10, verbose=False, epoch_print_freq=10, epochs=1)
  per_class = a.real_per_class
  images = torch.rand(nclass * per_class, ch, h, w)
  labels = torch.arange(nclass).repeat_interleave(per_class)
  loader_real = _RealData(images, labels, args.batch_real, nclass)
  synset = condense.Synthesizer(args, nclass, ch, h, w, device='cpu')
  # condense.diffaug composes these with torchvision's Compose; the same
  # two calls in a row here.
  normalize = utils.Normalize(mean=[0.4914, 0.4822, 0.4465],
                              std=[0.2023, 0.1994, 0.2010], device='cpu')
  aug_match = augment.DiffAug(strategy=args.aug_type, batch=True)
  aug_net = augment.DiffAug(
      strategy=condense.remove_aug(args.aug_type, 'cutout'), batch=False)
  aug = lambda x: aug_match(normalize(x))
  aug_rand = lambda x: aug_net(normalize(x))
  model = train.define_model(args, nclass)
  model.train()
  optim_net = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum,
                              weight_decay=args.weight_decay)
  criterion = torch.nn.CrossEntropyLoss()
  optim_img = torch.optim.SGD(synset.parameters(), lr=args.lr_img,
                              momentum=args.mom_img)

  def outer_step():
    t0 = time.perf_counter()
    synset.data.data = torch.clamp(synset.data.data, min=0., max=1.)
    for c in range(nclass):  # condense.py's class loop, as written there
      img, lab = loader_real.class_sample(c)
      img_syn, lab_syn = synset.sample(c, max_size=args.batch_syn_max)
      n = img.shape[0]
      img_aug = aug(torch.cat([img, img_syn]))
      loss = condense.matchloss(args, img_aug[:n], img_aug[n:], lab, lab_syn, model)
      optim_img.zero_grad()
      loss.backward()
      optim_img.step()
    t1 = time.perf_counter()
    train.train_epoch(args, loader_real, model, criterion, optim_net,
                      n_data=args.n_data, aug=aug_rand, mixup=args.mixup_net)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1

  for _ in range(a.warmup):
    outer_step()
  times = [outer_step() for _ in range(a.reps)]
  match = statistics.median(t[0] for t in times)
  update = statistics.median(t[1] for t in times)
  total = statistics.median(t[0] + t[1] for t in times)
  return dict(s=round(total, 3), match_s=round(match, 3), update_s=round(update, 3),
              s_all=[round(t[0] + t[1], 3) for t in times],
              peak_rss_mib=round(resource.getrusage(
                  resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              torch=torch.__version__, threads=a.threads)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--idc_repo', default=os.environ.get('IDC_REPO', ''))
  p.add_argument('--shape', default='32x32x3')
  p.add_argument('--ipc', type=int, default=10)
  p.add_argument('--real_per_class', type=int, default=500)
  p.add_argument('--reps', type=int, default=2)
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--threads', type=int, default=2)
  a = p.parse_args()
  print(json.dumps(measure(a)))


if __name__ == '__main__':
  main()
