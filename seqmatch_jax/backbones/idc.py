"""IDC (Kim et al., ICML 2022): gradient matching on multi-formation images,
and SeqMatch-IDC, as a method (official code: snu-mllab/Efficient-Dataset-
Condensation `condense.py`, `train.py`; SeqMatch-IDC: shqii1j/seqmatch
`seqmatch-idc/condense_new.py`).

Stored images live in pixel space [0, 1]; by default each holds factor x
factor tiles that decode (bilinear upsampling, crop-major) into factor^2
training images of its class (the multi-formation parameterisation,
parameterization.py, which any method can use; `param.*` in the config).

One iteration is IDC's outer iteration: a network and a fresh SGD
(0.01, 0.9, 5e-4) start it, then `inner_loop` times: per class, in turn, the
conv-weight gradients of a real batch (64: the class's next batch of a
shuffled walk without replacement, `ClassWalk`) and of the class's decoded images
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

import dataclasses

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
from seqmatch_jax import real_data
from seqmatch_jax.errors import ConfigError
from seqmatch_jax.parameterization import Parameterization

METRICS = ('mse', 'l1', 'cos')
# SeqMatch-IDC's network refresh (the official run.sh), and IDC's default.
SEQMATCH_FIX_ITER = 50
PER_SUBSET = ('iterations', 'lr_img', 'inner_loop')


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


class ClassWalk:
  """IDC's per-class real batches (`data.ClassBatchSampler`): each class is
  walked in a shuffled order, min(class size, batch) images at a time without
  replacement; the incomplete last batch of a pass is dropped and the next
  pass reshuffles. Every match takes the next batch of every class, so batch
  n of a class is a pure function of (seed, subset, trajectory, class, n):
  a resumed run takes the same batches. Host-side numpy (PCG64 streams).
  """

  def __init__(self, y_train, num_classes: int, batch: int, seed: tuple[int, ...]):
    y = np.asarray(y_train)
    self.rows = [np.flatnonzero(y == c) for c in range(num_classes)]
    self.width = min(batch, max(len(r) for r in self.rows))  # static batch
    self.sizes = [min(len(r), batch) for r in self.rows]
    self.seed = tuple(int(v) for v in seed)
    self._order = {}  # (trajectory, class, pass) -> that pass's order

  def order(self, t: int, c: int, p: int) -> np.ndarray:
    key = (t, c, p)
    if key not in self._order:
      if len(self._order) > 64 * len(self.rows):
        self._order.clear()
      rng = np.random.default_rng([*self.seed, t, c, p])
      self._order[key] = self.rows[c][rng.permutation(len(self.rows[c]))]
    return self._order[key]

  def batches(self, first: int, count: int, t: int) -> dict:
    """Batches first .. first+count-1 of every class for trajectory t:
    {'rows': [count, C, width] int32, 'mask': [count, C, width] float32}."""
    num_classes = len(self.rows)
    rows = np.zeros((count, num_classes, self.width), np.int32)
    mask = np.zeros((count, num_classes, self.width), np.float32)
    for c, size in enumerate(self.sizes):
      per_pass = len(self.rows[c]) // size
      for i in range(count):
        p, j = divmod(first + i, per_pass)
        rows[i, c, :size] = self.order(t, c, p)[j * size:(j + 1) * size]
        rows[i, c, size:] = rows[i, c, 0]
        mask[i, c, :size] = 1.0
    return dict(rows=rows, mask=mask)


class IDCSource(real_data.RealImagesByClass):
  """What IDC's step reads: the real images by class and their labels, the
  normalisation, and where each subset's images of each class sit in the
  matched set; `sample` gives, per trajectory, the iteration's real batches
  of every class (`ClassWalk`) and its starting network (SeqMatch).

  `data['subset_rows']` holds, per subset, a [C, ipc_j] table of rows of the
  whole set (frozen subsets first): each is decoded and subsampled on its own.
  """

  def __init__(self, backbone: 'IDC', ctx, plan: base.SubsetPlan, done: base.Done):
    c = ctx.num_classes
    sizes = [int(np.sum(done.subset == j)) // c for j in range(plan.index)] + [plan.ipc]
    super().__init__(ctx.x_train, ctx.y_train, c)
    rows, offset = [], 0
    for n in sizes:
      rows.append(jnp.asarray(offset + np.arange(c)[:, None] * n + np.arange(n)[None],
                              jnp.int32))
      offset += c * n
    pre = ctx.preprocessor
    self.data.update(y=jnp.asarray(ctx.y_train, jnp.int32), subset_rows=tuple(rows),
                     mean=jnp.asarray(pre.mean, jnp.float32),
                     std=jnp.asarray(pre.std, jnp.float32))
    self.fix_iter = plan.fix_iter
    self.backbone = backbone
    self.plan = plan
    self.key = jax.random.fold_in(ctx.key, 400 + plan.index)
    self.stages = None
    if plan.index > 0:
      images, labels_d, subset_d = plan.run.param.decode_set(
          done.images, done.labels, done.subset, pre.to_model)
      self.stages = tuple(evaluate_lib.stage_sets(images, labels_d, subset_d))
      self.lrs = jnp.full((plan.index,), float(plan.run.eval_lr), jnp.float32)
      self.trainer = evaluate_lib.staged_trainer(backbone.network,
                                                 network_protocol(plan))
    self.walk = ClassWalk(ctx.y_train, c, plan.batch_real,
                          (plan.run.seed, 500 + plan.index))
    self.inner_loop = plan.inner_loop
    self._block = None
    self._net = None
    self._sent = None  # ((block, count, mesh), the stacked network as sent)

  def real_batches(self, iteration: int, t: int) -> dict:
    """Trajectory t's real batches for the `inner_loop` matches of
    `iteration` (each class's walk advances one batch per match)."""
    return self.walk.batches(iteration * self.inner_loop, self.inner_loop, t)

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
    """Per trajectory: {'real': its real batches, 'net': the block's network
    (absent for IDC, which starts a fresh random one in the step)}."""
    def place(load):
      return load(range(count)) if mesh is None else parallel.shard_from_loader(
          count, mesh, load)
    stack = lambda trees: jax.tree.map(lambda *x: np.stack(x), *trees)
    out = dict(real=place(lambda ts: stack(
        [self.real_batches(iteration, t) for t in ts])))
    if self.fix_iter == 1 and self.stages is None:
      return out
    net = self.network_at(iteration)
    if self._sent is None or self._sent[0] != (self._block, count, mesh):
      # Stacked and placed once per block, not every iteration.
      self._sent = ((self._block, count, mesh), place(
          lambda ts: jax.tree.map(lambda x: np.stack([x] * len(ts)), net)))
    return dict(out, net=self._sent[1])


def network_protocol(plan: base.SubsetPlan) -> evaluate_lib.Protocol:
  """How SeqMatch-IDC trains its networks on the earlier subsets: IDC's
  evaluation protocol for `net_epochs` epochs."""
  return dataclasses.replace(plan.run.protocol, epochs=plan.net_epochs)


class IDC(base.Backbone):
  name = 'idc'
  title = 'IDC'
  config_key = 'idc'
  parameterization = Parameterization('multiformation', 2, 'pixels')

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    """IDC's reproduce settings for CIFAR (`--reproduce -f 2`; the factor is
    `param.factor`, default 2: use 3 for the ImageNet subsets)."""
    c = ml_collections.ConfigDict()
    c.iterations = 2000  # outer iterations (IDC's n_iter = niter * 100 / inner_loop)
    c.inner_loop = 100
    c.lr_img = 5e-3  # before `tune_lr_img`
    c.tune_lr_img = True  # x (ipc of the subset / 10) x (size / base size)^2
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
    c.per_subset = ml_collections.ConfigDict({n: () for n in PER_SUBSET})
    return c

  @classmethod
  def validate(cls, plans):
    plans = super().validate(plans)
    c = plans[0]
    for p in plans:
      if p.inner_loop < 1:
        raise ConfigError(f'idc.inner_loop of subset {p.index + 1} must be >= 1, '
                          f'got {p.inner_loop}.')
    for name in ('batch_real', 'batch_syn_max', 'n_data', 'batch_net',
                 'eval_batch', 'fix_iter', 'net_epochs'):
      value = getattr(c, name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f'idc.{name} must be an integer, got {value!r}.')
    for name in ('batch_real', 'batch_syn_max', 'n_data', 'batch_net', 'lr_net',
                 'eval_batch'):
      value = getattr(c, name)
      if isinstance(value, bool) or not value > 0:
        raise ConfigError(f'idc.{name} must be positive, got {value}.')
    for name in ('fix_iter', 'net_epochs', 'momentum_net', 'weight_decay_net'):
      if not getattr(c, name) >= 0:
        raise ConfigError(f'idc.{name} must be >= 0, got {getattr(c, name)}.')
    if not 0 <= c.mix_p <= 1:
      raise ConfigError(f'idc.mix_p must lie in [0, 1], got {c.mix_p}.')
    if c.metric not in METRICS:
      raise ConfigError(f'idc.metric must be one of {"|".join(METRICS)}, got '
                        f'{c.metric!r}.')
    for name in ('aug_match', 'aug_net', 'eval_augment'):
      try:
        augment_lib.validate_strategy(getattr(c, name))
      except ValueError as e:
        raise ConfigError(f'idc.{name}: {e}') from e
    if c.run.zca:
      raise ConfigError('backbone idc stores pixels in [0, 1] and normalises them '
                        'itself (no ZCA); use the config\'s IDC row, e.g. '
                        '--config=configs/<dataset>.py:backbone=idc, or set '
                        '--config.dataset.zca=False.')
    fix_iter = c.fix_iter or (SEQMATCH_FIX_ITER if c.run.num_subsets > 1 else 1)
    net_epochs = c.net_epochs or c.run.protocol.epochs
    out = []
    for p in plans:
      p = p.resolved(fix_iter=fix_iter, net_epochs=net_epochs)
      if p.index > 0:  # what trains its networks on S_1..S_k: recorded
        p = p.resolved(staged=dict(
            protocol=dataclasses.asdict(network_protocol(p)), lr=p.run.eval_lr))
      out.append(p)
    return base.one_trajectory(out)

  @classmethod
  def protocol(cls, common, settings):
    """IDC's evaluation: batch `eval_batch`, lr x0.2 at 2E/3 and 5E/6,
    per-sample IDC augmentation and CutMix (`mix_p`)."""
    return dataclasses.replace(
        common, batch_size=settings.eval_batch, augment=settings.eval_augment,
        schedule='multistep', augment_style='idc', align_corners=False,
        cutmix=settings.mix_p)

  def image_lr(self, plan) -> float:
    """`tune_lr_img`: lr_img x (ipc / 10) x (H / base)^2, the base size 224
    for ImageNet-sized images and the data's own size otherwise."""
    if not plan.tune_lr_img:
      return plan.lr_img
    h = self.network.image_shape[0]
    base_size = 224 if h >= 64 else h
    return plan.lr_img * plan.ipc / 10.0 * (h / base_size) ** 2

  def init(self, plan, source, images, labels):
    trainable, _ = super().init(plan, source, images, labels)
    return trainable, {'images': optax.sgd(self.image_lr(plan), momentum=0.5)}

  def net_spec(self, plan) -> training.SGDSpec:
    return training.SGDSpec(batch_size=plan.batch_net, momentum=plan.momentum_net,
                            weight_decay=plan.weight_decay_net, augment=plan.aug_net,
                            align_corners=False, augment_style='idc',
                            cutmix=plan.mix_p)

  def prepare(self, ctx, plan, done):
    return IDCSource(self, ctx, plan, done)

  def class_images(self, plan, images, data, c, key) -> jax.Array:
    """Class c's decoded images, model space: each subset decoded and
    subsampled (at most batch_syn_max) on its own, then joined."""
    out = []
    for j, rows in enumerate(data['subset_rows']):
      x = plan.run.param.decode_images(images[rows[c]])
      if x.shape[0] > plan.batch_syn_max:
        keep = jax.random.permutation(jax.random.fold_in(key, j), x.shape[0])
        x = x[keep[:plan.batch_syn_max]]
      out.append(x)
    x = jnp.concatenate(out)
    return (x - data['mean']) / data['std']

  def class_loss(self, plan, syn, inner, key, data, c) -> jax.Array:
    """The loss of class c: conv-gradient distance of a real batch and the
    class's decoded images under one shared IDC augmentation draw."""
    (params, state), _, real = inner
    dsa = augment_lib.DSAParams(align_corners=False, style='idc')

    def grads(x, y, m):
      return jax.grad(lambda p: training.masked_loss(
          self.network, p, state, x, y, m)[0])(params)

    k_real, k_syn, k_aug = jax.random.split(jax.random.fold_in(key, c), 3)
    del k_real  # the batch is the walk's next one (ClassWalk)
    m = real['match']
    mask = jnp.asarray(real['mask'])[m, c]
    real = data['x'][jnp.asarray(real['rows'])[m, c]]
    images = self.class_images(plan, syn.images, data, c, k_syn)
    real, images = augment_lib.augment_shared(k_aug, (real, images), plan.aug_match,
                                              dsa)
    g_real = jax.lax.stop_gradient(grads(real, jnp.full(real.shape[:1], c), mask))
    g_syn = grads(images, jnp.full(images.shape[:1], c), jnp.ones(images.shape[:1]))
    return grad_distance(g_real, g_syn, plan.metric)

  def loss(self, plan, syn, inner, key, data):
    return real_data.over_classes(
        lambda c: self.class_loss(plan, syn, inner, key, data, c),
        data['index'].shape[0])

  def initial_network(self, plan, resource, key):
    """A trajectory's inner state: its network and a fresh SGD state (a
    random network for IDC, or the block's network trained on the earlier
    subsets for SeqMatch-IDC), and its real batches with the match count."""
    net = resource['net'] if 'net' in resource else self.network.init(key)
    real = dict(resource['real'], match=jnp.zeros((), jnp.int32))
    return net, self.net_spec(plan).transform().init(net[0]), real

  def train_network(self, plan, inner, key, data):
    """`n_data` real images in random mixed-class batches (IDC's
    `train_epoch(n_data=...)`), augmented per sample, with CutMix; the next
    match takes the walk's next batches."""
    (params, state), opt, real = inner
    spec = self.net_spec(plan)
    steps = -(-plan.n_data // spec.batch_size)
    perm_key, step_key = jax.random.split(key)
    n = data['x'].shape[0]
    idx, mask = training.batch_schedule(perm_key, n, min(spec.batch_size, n), steps)

    def step(carry, inputs):
      i, m, k = inputs
      p, s, o, _ = training.sgd_step(self.network, spec, *carry, data['x'][i],
                                     data['y'][i], m, k, plan.lr_net)
      return (p, s, o), None

    (params, state, opt), _ = jax.lax.scan(
        step, (params, state, opt), (idx, mask, jax.random.split(step_key, steps)))
    return (params, state), opt, dict(real, match=real['match'] + 1)

  def step(self, plan, trainable, opt_state, io):
    """`inner_loop` matches of one image update per class, the network
    trained on real data between two; images clamped to [0, 1] after."""
    inners = io.init_each(lambda resource, key: self.initial_network(
        plan, resource, key))
    class_loss = lambda t, inner, key, c: self.class_loss(
        plan, io.synset(t), inner, key, io.data, c)
    train = lambda inner, syn, key: self.train_network(plan, inner, key, io.data)
    trainable, opt_state, loss, grads = io.matches(
        plan.inner_loop, class_loss, trainable, opt_state, inners, train,
        per_class=True)
    trainable = dict(trainable, images=jnp.clip(trainable['images'], 0.0, 1.0))
    return trainable, opt_state, io.metrics(loss, grads)
