"""The dataset-distillation "DC benchmark" networks, in flax linen (NHWC).

ConvNet is the distillation backbone; ResNet18, VGG11 and AlexNet serve the
cross-architecture evaluation. Layer shapes, paddings and initialisation follow
the public PyTorch reference (`networks.py` of DatasetCondensation and
mtt-distillation) so that published accuracies stay comparable. Deliberate
differences:

* Pooling never shrinks a spatial side below 1: a 2x2 pool is skipped along a
  side of length 1 (the embedded 8x8 'digits' data would otherwise reach empty
  feature maps; 28x28, 32x32 and 64x64 inputs are unaffected).
* ResNet18 ends with a global average pool instead of the reference's fixed
  `avg_pool2d(4)`. Both agree on 28x28 and 32x32 inputs (4x4 final maps); the
  fixed pool fails on 8x8 and mis-sizes the classifier on 64x64.
* VGG11 and AlexNet flatten whatever the final map is (the reference hard-codes
  the 32x32 classifier width, so 64x64 inputs crash there).
* The extra first-conv padding that makes 28x28 inputs look 32x32 is keyed on
  the 28x28 size (the reference keys it on one input channel: identical for
  MNIST/FashionMNIST, but 8x8x1 digits should not be padded to 12x12).
* `norm` applies to every network. The reference's plain AlexNet has no
  normalisation (`norm='none'`) and its AlexNetBN is `norm='batch'`; its VGG11 /
  ResNet18 are `norm='instance'` and VGG11BN / ResNet18BN `norm='batch'`.
* BatchNorm's running variance is the biased batch variance (flax); PyTorch
  tracks the unbiased one. Only eval-mode outputs of BN nets differ, slightly.
* Flattening is over (H, W, C) rather than PyTorch's (C, H, W): a permutation of
  the classifier's input rows, irrelevant unless PyTorch weights are imported.
"""

from collections.abc import Callable, Mapping
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from seqmatch_jax.errors import ConfigError
from seqmatch_jax.models.conv import Conv
from seqmatch_jax.models.conv import Dense
from seqmatch_jax.models.conv import resolve_conv_impl

Params = Mapping[str, Any]
State = dict[str, Any]

MODEL_NAMES = ('convnet', 'resnet18', 'vgg11', 'alexnet')
NORMS = ('instance', 'batch', 'layer', 'none')

_VGG11_CFG = (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M')


def _check_norm(norm: str) -> None:
  if norm not in NORMS:
    raise ValueError(
        f'Unknown norm {norm!r}; expected one of {", ".join(NORMS)}.')


def _normalize(x: jax.Array, norm: str, train: bool, name: str) -> jax.Array:
  """Applies the configured normalisation, with PyTorch's eps and momentum.

  'instance' = GroupNorm with one channel per group (the reference's
  `nn.GroupNorm(C, C)`); 'layer' = LayerNorm over (H, W, C) with an element-wise
  affine (the reference's `nn.LayerNorm([C, H, W])`); 'batch' = BatchNorm whose
  running averages move by 0.1 per step (torch momentum 0.1 == flax 0.9).
  Variances are computed in two passes (stable for large activations).
  """
  if norm == 'instance':
    return InstanceNorm(name=name)(x)
  if norm == 'layer':
    return nn.LayerNorm(epsilon=1e-5, reduction_axes=(1, 2, 3),
                        feature_axes=(1, 2, 3), use_fast_variance=False,
                        name=name)(x)
  if norm == 'batch':
    return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                        epsilon=1e-5, use_fast_variance=False, name=name)(x)
  if norm == 'none':
    return x
  raise ValueError(f'Unknown norm {norm!r}.')


class InstanceNorm(nn.Module):
  """Per-sample, per-channel normalisation over (H, W), per-channel affine.

  Equal to `nn.GroupNorm(group_size=1)` (and PyTorch's `GroupNorm(C, C)`), but
  reduces straight over the spatial axes: no group reshape, which made flax's
  GroupNorm the costliest op of the ConvNet meta-gradient on CPU.
  """
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    # float32 parameters, as every other layer's: under jax_enable_x64 the
    # initializers' default would be float64 and mix dtypes inside the net.
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    # Two-pass variance: exact, and it measured no slower than E[x^2] - E[x]^2
    # in the second-order meta-gradient.
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    centered = x - mean
    var = jnp.mean(centered * centered, axis=(1, 2), keepdims=True)
    return centered * (lax.rsqrt(var + self.epsilon) * scale) + bias


def _pool2x2(x: jax.Array, reduce: Callable[..., jax.Array]) -> jax.Array:
  """2x2 / stride-2 pooling (floor semantics), skipped along sides of length 1.

  Written as crop + reshape + reduce rather than `lax.reduce_window`: identical
  values, and its derivatives (to any order) are plain reshapes and broadcasts.
  """
  b, h, w, c = x.shape
  ph = 2 if h >= 2 else 1
  pw = 2 if w >= 2 else 1
  if ph == pw == 1:
    return x
  x = x[:, : h // ph * ph, : w // pw * pw, :]
  x = x.reshape(b, h // ph, ph, w // pw, pw, c)
  return reduce(x, axis=(2, 4))


def avg_pool2x2(x: jax.Array) -> jax.Array:
  return _pool2x2(x, jnp.mean)


def max_pool2x2(x: jax.Array) -> jax.Array:
  return _pool2x2(x, jnp.max)


def _first_padding(x: jax.Array, default: int, padded: int) -> int:
  """The reference makes 28x28 inputs look 32x32 via first-conv padding."""
  return padded if tuple(x.shape[1:3]) == (28, 28) else default


def _flatten(x: jax.Array) -> jax.Array:
  return x.reshape(x.shape[0], -1)


class ConvNet(nn.Module):
  """ConvNet-D: D x [conv3x3 -> norm -> ReLU -> avgpool2x2], then a linear."""
  num_classes: int
  width: int = 128
  depth: int = 3
  norm: str = 'instance'
  image_shape: tuple[int, int, int] | None = None
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               embed: bool = False) -> jax.Array:
    if self.image_shape is not None and tuple(x.shape[1:]) != tuple(
        self.image_shape):
      raise ValueError(
          f'ConvNet built for images {tuple(self.image_shape)}, got batch of '
          f'shape {x.shape}.')
    for d in range(self.depth):
      pad = _first_padding(x, 1, 3) if d == 0 else 1
      x = Conv(self.width, 3, padding=pad, impl=self.conv_impl,
               name=f'conv{d}')(x)
      x = _normalize(x, self.norm, train, f'norm{d}')
      x = nn.relu(x)
      x = avg_pool2x2(x)
    x = _flatten(x)
    if embed:  # DM's embedding: the features the classifier reads
      return x
    return Dense(self.num_classes, name='classifier')(x)


class BasicBlock(nn.Module):
  """ResNet basic block: two 3x3 convs (no bias) with a projection shortcut."""
  features: int
  stride: int = 1
  norm: str = 'instance'
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    out = Conv(self.features, 3, stride=self.stride, padding=1, use_bias=False,
               impl=self.conv_impl, name='conv1')(x)
    out = nn.relu(_normalize(out, self.norm, train, 'norm1'))
    out = Conv(self.features, 3, padding=1, use_bias=False,
               impl=self.conv_impl, name='conv2')(out)
    out = _normalize(out, self.norm, train, 'norm2')
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = Conv(self.features, 1, stride=self.stride, padding=0,
                      use_bias=False, impl=self.conv_impl,
                      name='shortcut_conv')(x)
      shortcut = _normalize(shortcut, self.norm, train, 'shortcut_norm')
    return nn.relu(out + shortcut)


class ResNet18(nn.Module):
  """CIFAR-style ResNet18: 3x3 stride-1 stem, BasicBlocks [2, 2, 2, 2]."""
  num_classes: int
  norm: str = 'instance'
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               embed: bool = False) -> jax.Array:
    x = Conv(64, 3, padding=1, use_bias=False, impl=self.conv_impl,
             name='stem_conv')(x)
    x = nn.relu(_normalize(x, self.norm, train, 'stem_norm'))
    for stage, features in enumerate((64, 128, 256, 512)):
      for block in range(2):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(features, stride, self.norm, self.conv_impl,
                       name=f'layer{stage + 1}_{block}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    if embed:
      return x
    return Dense(self.num_classes, name='classifier')(x)


class VGG11(nn.Module):
  """VGG11 with a normalisation after every conv and one linear classifier."""
  num_classes: int
  norm: str = 'instance'
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               embed: bool = False) -> jax.Array:
    conv_index = 0
    for item in _VGG11_CFG:
      if item == 'M':
        x = max_pool2x2(x)
        continue
      pad = _first_padding(x, 1, 3) if conv_index == 0 else 1
      x = Conv(item, 3, padding=pad, impl=self.conv_impl,
               name=f'conv{conv_index}')(x)
      x = nn.relu(_normalize(x, self.norm, train, f'norm{conv_index}'))
      conv_index += 1
    x = _flatten(x)
    if embed:  # DM's embedding: the features the classifier reads
      return x
    return Dense(self.num_classes, name='classifier')(x)


class AlexNet(nn.Module):
  """DC-benchmark AlexNet: 5 convs (5x5, 5x5, 3x3 x3), 3 max-pools, a linear."""
  num_classes: int
  norm: str = 'none'
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               embed: bool = False) -> jax.Array:
    # (features, kernel, padding, pool after); the first conv pads 4 on 28x28.
    layers = ((128, 5, _first_padding(x, 2, 4), True), (192, 5, 2, True),
              (256, 3, 1, False), (192, 3, 1, False), (192, 3, 1, True))
    for i, (features, kernel, pad, pool) in enumerate(layers):
      x = Conv(features, kernel, padding=pad, impl=self.conv_impl,
               name=f'conv{i}')(x)
      x = nn.relu(_normalize(x, self.norm, train, f'norm{i}'))
      if pool:
        x = max_pool2x2(x)
    x = _flatten(x)
    if embed:  # DM's embedding: the features the classifier reads
      return x
    return Dense(self.num_classes, name='classifier')(x)


def _convnet_side(image_shape: tuple[int, ...]) -> int:
  """Shorter side the first ConvNet block sees (28x28 is padded to 32x32)."""
  h, w = int(image_shape[0]), int(image_shape[1])
  return min(h, w) + 4 if (h, w) == (28, 28) else min(h, w)


def max_convnet_depth(image_shape: tuple[int, ...]) -> int:
  """Deepest ConvNet whose every 2x2 pooling still halves the map."""
  side, depth = _convnet_side(image_shape), 0
  while side >= 2:
    side //= 2
    depth += 1
  return depth


def check_image_size(name: str, image_shape: tuple[int, ...], depth: int) -> None:
  """Refuses a ConvNet too deep for the images, before any training.

  Each of the `depth` blocks halves the side (floor), and pooling is skipped
  on a 1-pixel side; so a too-deep net ends with blocks on 1x1 maps, where
  instance norm outputs a constant and training silently stays at chance.
  The other architectures have a fixed design and are not checked here.

  Raises:
    ConfigError: naming the depth that fits these images and the image size
      this depth needs.
  """
  if name != 'convnet' or len(image_shape) != 3 or depth < 1:
    return
  h, w = int(image_shape[0]), int(image_shape[1])
  fits = max_convnet_depth(image_shape)
  if fits >= depth:
    return
  need = 2**depth
  if fits == 0:
    raise ConfigError(
        f'images of {h}x{w} are too small for a ConvNet (it needs at least 2x2, '
        f'and {need}x{need} for model.depth={depth}); use larger images')
  raise ConfigError(
      f'model.depth={depth} is too deep for {h}x{w} images: the ConvNet halves '
      f'the side {depth} times, so its last blocks would see 1x1 maps and '
      f'train at chance; set --config.model.depth={fits} or less, or use images '
      f'of at least {need}x{need}')


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jitted_init(module: nn.Module, key: jax.Array,
                 image_shape: tuple[int, int, int]) -> dict[str, Any]:
  # Jitted once per (module, shape): eager flax init dispatches op by op, which
  # is seconds for ResNet18/VGG11 on CPU.
  return module.init(key, jnp.zeros((1, *image_shape), jnp.float32),
                     train=False)


@dataclasses.dataclass(frozen=True)
class Network:
  """A flax module behind a functional (params, state) interface.

  `params` are the trainable variables; `state` holds the other collections
  (BatchNorm's 'batch_stats') or is `{}`. Both are plain dicts, so they can be
  matched, stacked, vmapped and checkpointed without flax.
  """
  name: str
  module: nn.Module
  image_shape: tuple[int, int, int]  # H, W, C
  num_classes: int

  @property
  def has_state(self) -> bool:
    """Whether `apply(..., train=True)` updates state (the net has BN)."""
    return getattr(self.module, 'norm', 'none') == 'batch'

  def init(self, key: jax.Array) -> tuple[Params, State]:
    """Initialises from `key` (deterministic in it); jit-able."""
    variables = dict(_jitted_init(self.module, key, self.image_shape))
    params = variables.pop('params')
    return params, variables

  def apply(self, params: Params, state: State, x: jax.Array, *,
            train: bool) -> tuple[jax.Array, State]:
    """Logits (B, num_classes) for NHWC `x`, and the updated state.

    In train mode BatchNorm normalises with batch statistics and its running
    averages are returned updated; otherwise `state` comes back unchanged.
    """
    variables = {'params': params, **state}
    if train and self.has_state:
      logits, new_state = self.module.apply(
          variables, x, train=True, mutable=list(state.keys()))
      return logits, dict(new_state)
    return self.module.apply(variables, x, train=train), state

  def embed(self, params: Params, state: State, x: jax.Array) -> jax.Array:
    """The flattened features before the classifier (DM's `net.embed`), in
    eval mode: BatchNorm uses its running statistics."""
    return self.module.apply({'params': params, **state}, x, train=False,
                             embed=True)


def single_pixel_norms(network: 'Network') -> list[str]:
  """The instance-norm layers of `network` that normalise 1x1 maps on its
  images: each outputs its bias whatever the input, so nothing before it
  reaches the output and the network trains at chance (VGG11 and ResNet18 on
  8x8 images: their last stages run at 1x1). Found by tracing shapes only."""
  found = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, InstanceNorm) and context.method_name == '__call__':
      h, w = args[0].shape[1:3]
      if h * w == 1:
        found.append(context.module.name)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: network.module.init(
        jax.random.key(0), jnp.zeros((1,) + network.image_shape, jnp.float32)))
  return found


def check_normalization(network: 'Network', what: str, fix: str) -> None:
  """Refuses a network whose instance norm would see 1x1 maps, before any
  training (`single_pixel_norms`), naming `fix`.

  Raises:
    ConfigError: naming the layers and the fix.
  """
  layers = single_pixel_norms(network)
  if layers:
    h, w = network.image_shape[:2]
    shown = ', '.join(layers[:3]) + (f' and {len(layers) - 3} more'
                                     if len(layers) > 3 else '')
    raise ConfigError(
        f'{what}: {network.name} with instance norm normalises 1x1 maps on '
        f'{h}x{w} images ({shown}); such a layer outputs a constant, so the '
        f'network would train at chance. {fix}')


def create_network(name: str, num_classes: int,
                   image_shape: tuple[int, int, int], *, width: int = 128,
                   depth: int = 3, norm: str = 'instance',
                   conv_impl: str = 'auto') -> Network:
  """Builds one of `MODEL_NAMES` for (H, W, C) images.

  `width` and `depth` shape the ConvNet only; the other networks have their
  standard widths. `norm` is one of `NORMS` and applies to every network.
  """
  _check_norm(norm)
  impl = resolve_conv_impl(conv_impl)
  if len(image_shape) != 3 or min(image_shape) < 1:
    raise ValueError(f'image_shape must be (H, W, C), got {image_shape!r}.')
  image_shape = tuple(int(s) for s in image_shape)
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
  if name == 'convnet':
    if width < 1 or depth < 1:
      raise ValueError(
          f'ConvNet width and depth must be >= 1, got {width}, {depth}.')
    module = ConvNet(num_classes, width=width, depth=depth, norm=norm,
                     image_shape=image_shape, conv_impl=impl)
  elif name == 'resnet18':
    module = ResNet18(num_classes, norm=norm, conv_impl=impl)
  elif name == 'vgg11':
    module = VGG11(num_classes, norm=norm, conv_impl=impl)
  elif name == 'alexnet':
    module = AlexNet(num_classes, norm=norm, conv_impl=impl)
  else:
    raise ValueError(
        f'Unknown model {name!r}; expected one of {", ".join(MODEL_NAMES)}.')
  return Network(name=name, module=module, image_shape=image_shape,
                 num_classes=num_classes)
