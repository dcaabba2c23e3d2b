"""IDC (Kim et al., ICML 2022): gradient matching on multi-formation images,
and SeqMatch-IDC, as a backbone (official code: snu-mllab/Efficient-Dataset-
Condensation `condense.py`, `train.py`; SeqMatch-IDC: shqii1j/seqmatch
`seqmatch-idc/condense_new.py`).

Stored images live in pixel space [0, 1]; each holds factor x factor tiles
that decode (bilinear upsampling, crop-major) into factor^2 training images of
its class. One iteration is IDC's outer iteration: a network and a fresh SGD
(0.01, 0.9, 5e-4) start it, then `inner_loop` times: per class, in turn, the
conv-weight gradients of a real batch (64) and of the class's decoded images
(at most 128 per subset) under one shared IDC augmentation draw are compared
with Σ(g_real - g_syn)^2 and the images take one SGD(lr_img, 0.5) step; then
the network trains on `n_data` real images (per-sample colour + crop, CutMix).
Images are clamped to [0, 1] after each outer iteration.

The network: IDC starts a random one every `fix_iter` (1) iterations.
SeqMatch-IDC (K > 1) re-derives it every `fix_iter` (50) iterations -- for
subset k >= 2 a fresh network trained on S_1, S_1 ∪ S_2, ... with IDC's
evaluation protocol -- and resets every iteration to a copy of it. The frozen
subsets are decoded and subsampled each on its own and joined to the current
one in every match (one cross-entropy over the union); they get no gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from seqmatch_jax import augment as augment_lib
from seqmatch_jax import evaluate as evaluate_lib
from seqmatch_jax import parallel
from seqmatch_jax import training
from seqmatch_jax.backbones import base
from seqmatch_jax.backbones import dc
from seqmatch_jax.errors import ConfigError

METRICS = ('mse', 'l1', 'cos')
# SeqMatch-IDC's network refresh (the official run.sh), and IDC's default.
SEQMATCH_FIX_ITER = 50


def upsample_matrix(src: int, dst: int) -> np.ndarray:
  """[dst, src] weights of torch's bilinear upsampling with
  align_corners=False (`nn.Upsample(mode='bilinear')`) along one axis."""
  m = np.zeros((dst, src), np.float32)
  for i in range(dst):
    x = max((i + 0.5) * src / dst - 0.5, 0.0)
    i0 = min(int(math.floor(x)), src - 1)
    i1 = min(i0 + 1, src - 1)
    w1 = x - i0
    m[i, i0] += 1.0 - w1
    m[i, i1] += w1
  return m


def decode_tiles(images: jax.Array, factor: int) -> jax.Array:
  """IDC's `decode_zoom`: [n, H, W, C] stored images -> [n factor^2, H, W, C].

  Each image is padded with 0.5 to a multiple of `factor`, cut into
  factor x factor tiles of side ceil(H / factor), row-major, and every tile is
  upsampled to H x W. The output is crop-major: tile (0, 0) of every image,
  then tile (0, 1) of every image, ...; labels repeat the same way.
  """
  if factor == 1:
    return images
  n, h, w, c = images.shape
  sh, sw = -(-h // factor), -(-w // factor)
  x = jnp.pad(images, ((0, 0), (0, sh * factor - h), (0, sw * factor - w), (0, 0)),
              constant_values=0.5)
  x = x.reshape(n, factor, sh, factor, sw, c)
  x = jnp.transpose(x, (1, 3, 0, 2, 4, 5)).reshape(factor * factor * n, sh, sw, c)
  mh = jnp.asarray(upsample_matrix(sh, h))
  mw = jnp.asarray(upsample_matrix(sw, w))
  return jnp.einsum('hy,nyxc,wx->nhwc', mh, x, mw,
                    precision=jax.lax.Precision.HIGHEST)


def decode_labels(labels, factor: int):
  return np.tile(np.asarray(labels), factor * factor)


def tile_sizes(size: int, factor: int) -> list[int]:
  """IDC's mix-init tile sides along one axis: size // factor, the first
  size % factor of them one larger."""
  s, extra = divmod(size, factor)
  return [s + 1 if i < extra else s for i in range(factor)]


def nearest_resize(images: np.ndarray, h: int, w: int) -> np.ndarray:
  """torch `F.interpolate(mode='nearest')`: out[i] = in[floor(i * in / out)]."""
  rows = np.floor(np.arange(h) * images.shape[1] / h).astype(int)
  cols = np.floor(np.arange(w) * images.shape[2] / w).astype(int)
  return images[:, rows][:, :, cols]


def mix_init(pixels: np.ndarray, factor: int) -> np.ndarray:
  """IDC's 'mix' initialisation from [n factor^2, H, W, C] real pixels: tile
  k = (i, j) of stored image t is real image k n + t, downsampled (nearest)."""
  n = pixels.shape[0] // (factor * factor)
  h, w = pixels.shape[1:3]
  out = np.zeros((n,) + pixels.shape[1:], np.float32)
  k, top = 0, 0
  for th in tile_sizes(h, factor):
    left = 0
    for tw in tile_sizes(w, factor):
      out[:, top:top + th, left:left + tw] = nearest_resize(
          pixels[k * n:(k + 1) * n], th, tw)
      left += tw
      k += 1
    top += th
  return out


def grad_distance(g_real, g_syn, metric: str) -> jax.Array:
  """IDC's matching loss over the conv kernels only (its defaults skip
  biases, norm parameters and the classifier): 'mse' Σ(x - y)^2 (a sum),
  'l1' Σ|x - y|, 'cos' Σ over output channels of 1 - cos."""
  total = jnp.zeros((), jnp.float32)
  for a, b in zip(jax.tree.leaves(g_real), jax.tree.leaves(g_syn)):
    if a.ndim != 4:
      continue
    if metric == 'mse':
      total = total + jnp.sum(jnp.square(a - b))
    elif metric == 'l1':
      total = total + jnp.sum(jnp.abs(a - b))
    else:
      total = total + dc.channel_cosine_distance(a, b)
  return total


def sample_class(key: jax.Array, data: dict, c, batch: int):
  """`batch` distinct random real images of class `c` (masked when the class
  has fewer). Returns (images [batch, ...], mask [batch])."""
  index, count = data['index'], data['count']
  batch = min(batch, index.shape[1])
  u = jax.random.uniform(key, index.shape[1:])
  u = jnp.where(jnp.arange(index.shape[1]) < count[c], u, 2.0)
  rows = index[c][jnp.argsort(u)[:batch]]
  mask = (jnp.arange(batch) < count[c]).astype(jnp.float32)
  return data['x'][rows], mask


def config_image_size(config) -> tuple[int, int]:
  """(H, W) of the config's dataset when known without loading it, else
  (0, 0)."""
  from seqmatch_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  try:
    shape = data_lib.peek_image_shape(config.dataset.name,
                                      config.dataset.data_dir or None)
  except Exception:  # pylint: disable=broad-except
    shape = None  # the data loader reports its own problems later
  return tuple(shape[:2]) if shape else (0, 0)


class IDCSource(base.RealImagesByClass):
  """What IDC's step reads: the real images by class and their labels, the
  normalisation, and where each subset's images of each class sit in the
  matched set; `sample` gives the iteration's starting network (SeqMatch).

  `data['subset_rows']` holds, per subset, a [C, ipc_j] table of rows of the
  whole set (frozen subsets first): each is decoded and subsampled on its own.
  """

  def __init__(self, backbone: 'IDC', ctx, plan: base.SubsetPlan, done: base.Done):
    config = ctx.config
    c = ctx.num_classes
    sizes = [int(np.sum(done.subset == j)) // c for j in range(plan.index)] + [plan.ipc]
    labels = np.concatenate([np.asarray(done.labels, np.int32),
                             np.repeat(np.arange(c), plan.ipc)])
    super().__init__(ctx.x_train, ctx.y_train, labels, c)
    rows, offset = [], 0
    for n in sizes:
      rows.append(jnp.asarray(offset + np.arange(c)[:, None] * n + np.arange(n)[None],
                              jnp.int32))
      offset += c * n
    pre = ctx.preprocessor
    self.data.update(y=jnp.asarray(ctx.y_train, jnp.int32), subset_rows=tuple(rows),
                     mean=jnp.asarray(pre.mean, jnp.float32),
                     std=jnp.asarray(pre.std, jnp.float32))
    self.fix_iter = backbone.fix_iter()
    self.backbone = backbone
    self.plan = plan
    self.key = jax.random.fold_in(ctx.key, 400 + plan.index)
    self.stages = None
    if plan.index > 0:
      images, labels_d, subset_d = backbone.decode(done.images, done.labels,
                                                   done.subset, pre)
      self.stages = tuple(evaluate_lib.stage_sets(images, labels_d, subset_d))
      self.lrs = jnp.full((plan.index,), float(config.eval.lr), jnp.float32)
      epochs = config.idc.net_epochs or config.eval.epochs
      self.trainer = evaluate_lib.staged_trainer(
          backbone.network, backbone.eval_protocol(config, epochs))
    self._block = None
    self._net = None
    self._sent = None  # ((block, count, mesh), the stacked network as sent)

  def network_at(self, iteration: int):
    """The starting network of `iteration`'s block (a pure function of the
    seed, subset and block: a resumed run rebuilds the same one)."""
    block = iteration // self.fix_iter
    if block != self._block:
      key = jax.random.fold_in(self.key, block)
      if self.stages is None:
        net = self.backbone.network.init(key)
      else:
        net = self.trainer(key, self.lrs, self.stages)
      self._block, self._net = block, jax.tree.map(np.asarray, net)
    return self._net

  def sample(self, iteration, count, mesh=None):
    if self.fix_iter == 1 and self.stages is None:
      return None  # IDC: a fresh random network per trajectory, in the step
    net = self.network_at(iteration)
    if self._sent is None or self._sent[0] != (self._block, count, mesh):
      # Stacked and placed once per block, not every iteration.
      load = lambda rows: jax.tree.map(lambda x: np.stack([x] * len(rows)), net)
      placed = (load(range(count)) if mesh is None
                else parallel.shard_from_loader(count, mesh, load))
      self._sent = ((self._block, count, mesh), placed)
    return self._sent[1]


class IDC(base.RealDataBackbone):
  name = 'idc'
  title = 'IDC'
  config_key = 'idc'
  per_subset = ('iterations', 'lr_img', 'inner_loop')
  has_net_update = True

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """IDC's reproduce settings for CIFAR (`--reproduce -f 2`)."""
    c = ml_collections.ConfigDict()
    c.iterations = 2000  # outer iterations (IDC's n_iter = niter * 100 / inner_loop)
    c.inner_loop = 100
    c.lr_img = 5e-3  # before `tune_lr_img`
    c.tune_lr_img = True  # x (ipc of the subset / 10) x (size / base size)^2
    c.factor = 2  # 2 for 32x32 / 28x28 data, 3 for the ImageNet subsets
    c.batch_real = 64  # real images of the class per match
    c.batch_syn_max = 128  # decoded images of a class per subset per match
    c.metric = 'mse'  # mse | l1 | cos
    c.aug_match = 'color_crop_cutout'  # one batch-shared IDC draw per match
    # The network between matches: n_data real images per update, batches of
    # batch_net, SGD(lr_net, momentum_net, weight_decay_net), per-sample IDC
    # augmentation aug_net and CutMix with probability mix_p.
    c.n_data = 2000
    c.batch_net = 64
    c.lr_net = 0.01
    c.momentum_net = 0.9
    c.weight_decay_net = 5e-4
    c.aug_net = 'color_crop'
    c.mix_p = 0.5
    # 0 = auto: 1 for IDC (a fresh network every iteration), 50 for SeqMatch
    # (K > 1), whose subsets reset every iteration to the block's network.
    c.fix_iter = 0
    # Epochs of the networks SeqMatch trains on the earlier subsets every
    # fix_iter iterations (IDC's evaluation protocol); 0 = eval.epochs.
    c.net_epochs = 0
    # IDC's evaluation: batch 64, x0.2 at 2E/3 and 5E/6, per-sample IDC
    # augmentation (cutout replaced by CutMix with mix_p).
    c.eval_batch = 64
    c.eval_augment = 'color_crop_flip_scale_rotate'
    c.per_subset = ml_collections.ConfigDict({n: () for n in cls.per_subset})
    return c

  @classmethod
  def validate(cls, config, plans) -> None:
    super().validate(config, plans)
    c = config.idc
    for p in plans:
      if p.inner_loop < 1:
        raise ConfigError(f'idc.inner_loop of subset {p.index + 1} must be >= 1, '
                          f'got {p.inner_loop}.')
    for name in ('factor', 'batch_real', 'batch_syn_max', 'n_data', 'batch_net',
                 'eval_batch', 'fix_iter', 'net_epochs'):
      if isinstance(c[name], bool) or not isinstance(c[name], int):
        raise ConfigError(f'idc.{name} must be an integer, got {c[name]!r}.')
    for name in ('factor', 'batch_real', 'batch_syn_max', 'n_data', 'batch_net',
                 'lr_net', 'eval_batch'):
      if isinstance(c[name], bool) or not c[name] > 0:
        raise ConfigError(f'idc.{name} must be positive, got {c[name]}.')
    size = min(config_image_size(config))
    if size and c.factor > size:
      raise ConfigError(f'idc.factor={c.factor} cuts {size}-pixel images into '
                        'empty tiles; use a factor <= the image side (IDC: 2 for '
                        '32x32 and 28x28, 3 for ImageNet subsets).')
    for name in ('fix_iter', 'net_epochs', 'momentum_net', 'weight_decay_net'):
      if not c[name] >= 0:
        raise ConfigError(f'idc.{name} must be >= 0, got {c[name]}.')
    if not 0 <= c.mix_p <= 1:
      raise ConfigError(f'idc.mix_p must lie in [0, 1], got {c.mix_p}.')
    if c.metric not in METRICS:
      raise ConfigError(f'idc.metric must be one of {"|".join(METRICS)}, got '
                        f'{c.metric!r}.')
    for name in ('aug_match', 'aug_net', 'eval_augment'):
      try:
        augment_lib.validate_strategy(c[name])
      except ValueError as e:
        raise ConfigError(f'idc.{name}: {e}') from e
    if config.dataset.zca:
      raise ConfigError('backbone idc stores pixels in [0, 1] and normalises them '
                        'itself (no ZCA); use the config\'s IDC row, e.g. '
                        f'--config=configs/{config.dataset.name}.py:backbone=idc, or '
                        'set --config.dataset.zca=False.')

  def fix_iter(self) -> int:
    if self.config.idc.fix_iter:
      return int(self.config.idc.fix_iter)
    return SEQMATCH_FIX_ITER if self.config.seqmatch.num_subsets > 1 else 1

  def image_lr(self, plan) -> float:
    """`tune_lr_img`: lr_img x (ipc / 10) x (H / base)^2, the base size 224
    for ImageNet-sized images and the data's own size otherwise."""
    if not self.config.idc.tune_lr_img:
      return plan.lr_img
    h = self.network.image_shape[0]
    base_size = 224 if h >= 64 else h
    return plan.lr_img * plan.ipc / 10.0 * (h / base_size) ** 2

  def optimizers(self, plan):
    return optax.sgd(self.image_lr(plan), momentum=0.5), optax.identity()

  def matches(self, plan) -> int:
    return plan.inner_loop

  def step_per_class(self, plan) -> bool:
    return True

  def post_step(self, plan, state):
    return state.replace(images=jnp.clip(state.images, 0.0, 1.0))

  @classmethod
  def eval_protocol(cls, config, epochs):
    return evaluate_lib.Protocol(
        epochs=epochs, batch_size=config.idc.eval_batch,
        momentum=config.eval.momentum, weight_decay=config.eval.weight_decay,
        augment=config.idc.eval_augment, parallel=config.eval.parallel,
        schedule='multistep', augment_style='idc', align_corners=False,
        cutmix=config.idc.mix_p, trim_short_batch=config.eval.trim_short_batch)

  def net_spec(self) -> training.SGDSpec:
    c = self.config.idc
    return training.SGDSpec(batch_size=c.batch_net, momentum=c.momentum_net,
                            weight_decay=c.weight_decay_net, augment=c.aug_net,
                            align_corners=False, augment_style='idc',
                            cutmix=c.mix_p)

  # -- the stored parameterisation --------------------------------------------
  def initial_images(self, key, ctx, sizes):
    """The whole set in pixel space: IDC's 'mix' init (each tile a real
    image of the class, downsampled), or clamp(N(0.5, 1/4^2)) for noise."""
    factor = self.config.idc.factor
    c = ctx.num_classes
    ipc = sum(sizes)
    shape = tuple(ctx.x_train.shape[1:])
    if self.config.distill.pix_init == 'noise':
      x = jax.random.normal(key, (ipc * c,) + shape) / 4 + 0.5
      return np.clip(np.asarray(x, np.float32), 0.0, 1.0)
    pixels = np.asarray(ctx.preprocessor.to_pixels(np.asarray(ctx.x_train)), np.float32)
    y = np.asarray(ctx.y_train)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).astype(np.uint64))
    per_class = []
    for cls in range(c):
      pool = np.flatnonzero(y == cls)
      need = ipc * factor * factor
      if len(pool) < need:
        raise ConfigError(
            f'Class {cls} has {len(pool)} training images; IDC\'s mix init needs '
            f'ipc x factor^2 = {need}; lower ipc or idc.factor, or use '
            'distill.pix_init=noise.')
      per_class.append(mix_init(np.clip(pixels[rng.choice(pool, need, replace=False)],
                                        0.0, 1.0), factor))
    blocks, offset = [], 0
    for n in sizes:
      blocks += [per_class[cls][offset:offset + n] for cls in range(c)]
      offset += n
    return np.concatenate(blocks).astype(np.float32)

  def decode(self, images, labels, subset, preprocessor=None):
    """Decoded model-space training set, subset by subset (subset-major, each
    subset crop-major as IDC's `decode`), with labels and subset ids."""
    factor = self.config.idc.factor
    labels = np.asarray(labels)
    subset = np.zeros(len(labels), np.int32) if subset is None else np.asarray(subset)
    xs, ys, ss = [], [], []
    for j in range(int(subset.max()) + 1 if len(subset) else 0):
      keep = subset == j
      x = decode_tiles(jnp.asarray(images)[keep], factor)
      xs.append(np.asarray(preprocessor.to_model(np.asarray(x)), np.float32))
      ys.append(decode_labels(labels[keep], factor))
      ss.append(np.full(len(ys[-1]), j, np.int32))
    if not xs:
      return np.asarray(images)[:0], labels[:0], subset[:0]
    return np.concatenate(xs), np.concatenate(ys).astype(np.int32), np.concatenate(ss)

  # -- per iteration ------------------------------------------------------------
  def prepare(self, ctx, plan, done):
    return IDCSource(self, ctx, plan, done)

  def init_inner(self, plan, resource, key, data):
    net = self.network.init(key) if resource is None else resource
    return net, self.net_spec().transform().init(net[0])

  def class_images(self, images, data, c, key) -> jax.Array:
    """Class c's decoded images, model space: each subset decoded and
    subsampled (at most batch_syn_max) on its own, then joined."""
    c_idc = self.config.idc
    out = []
    for j, rows in enumerate(data['subset_rows']):
      x = decode_tiles(images[rows[c]], c_idc.factor)
      if x.shape[0] > c_idc.batch_syn_max:
        keep = jax.random.permutation(jax.random.fold_in(key, j), x.shape[0])
        x = x[keep[:c_idc.batch_syn_max]]
      out.append(x)
    x = jnp.concatenate(out)
    return (x - data['mean']) / data['std']

  def loss(self, plan, images, labels, extras, inner, key, data, class_index=None):
    (params, state), _ = inner
    c_idc = self.config.idc
    dsa = augment_lib.DSAParams(align_corners=False, style='idc')

    def grads(x, y, m):
      return jax.grad(lambda p: training.masked_loss(
          self.network, p, state, x, y, m)[0])(params)

    def one_class(c):
      k_real, k_syn, k_aug = jax.random.split(jax.random.fold_in(key, c), 3)
      real, mask = sample_class(k_real, data, c, c_idc.batch_real)
      syn = self.class_images(images, data, c, k_syn)
      real, syn = augment_lib.augment_shared(k_aug, (real, syn), c_idc.aug_match, dsa)
      g_real = jax.lax.stop_gradient(grads(real, jnp.full(real.shape[:1], c), mask))
      g_syn = grads(syn, jnp.full(syn.shape[:1], c), jnp.ones(syn.shape[:1]))
      return grad_distance(g_real, g_syn, c_idc.metric)

    return self.over_classes(one_class, data['index'].shape[0], class_index)

  def net_update(self, plan, inner, images, labels, key, data):
    """`n_data` real images in random mixed-class batches (IDC's
    `train_epoch(n_data=...)`), augmented per sample, with CutMix."""
    (params, state), opt = inner
    spec = self.net_spec()
    steps = -(-self.config.idc.n_data // spec.batch_size)
    perm_key, step_key = jax.random.split(key)
    n = data['x'].shape[0]
    idx, mask = training.batch_schedule(perm_key, n, min(spec.batch_size, n), steps)

    def step(carry, inputs):
      i, m, k = inputs
      p, s, o, _ = training.sgd_step(self.network, spec, *carry, data['x'][i],
                                     data['y'][i], m, k, self.config.idc.lr_net)
      return (p, s, o), None

    (params, state, opt), _ = jax.lax.scan(
        step, (params, state, opt), (idx, mask, jax.random.split(step_key, steps)))
    return (params, state), opt

