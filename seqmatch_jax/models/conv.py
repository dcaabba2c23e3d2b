"""2-D convolution with a matmul kernel gradient; PyTorch-initialised layers.

Meta-gradients differentiate through an unrolled student, so they need
second-order gradients of every convolution. On XLA:CPU the convolution that
computes a kernel gradient (and its own derivatives) is extremely slow
(PERF_NOTES.md section 1). `conv2d(..., impl='im2col')` therefore uses a
`jax.custom_vjp` whose

* forward is an ordinary `lax.conv_general_dilated`;
* input gradient is again a convolution (of the cotangent with the spatially
  flipped, in/out-swapped kernel), computed by the *same* custom op, so every
  higher derivative stays in this fast family;
* kernel gradient is one matmul of im2col patches with the cotangent,
  `einsum('bhwk,bhwo->ko', patches(x), g)`, the patches being strided slices of
  the padded input. (The patch matrix is KH*KW times the input: transient
  memory.) The kernel gradient is itself a `custom_vjp` whose transposes are
  this convolution again (w.r.t. g: conv(x, dK'); w.r.t. x: its input
  gradient), so second-order terms never transpose the patch matrix.
* Stride-1 convolutions with few output channels (KH*KW*C_out <= C_in: the
  input gradient of a 1- or 3-channel first layer) run as one matmul plus
  nine shifted adds instead of XLA:CPU's slow convolution for that shape.
* Convolutions on maps with fewer pixels than kernel taps (3x3 on 2x2 or 1x1,
  5x5 on 4x4: the last layers of AlexNet, VGG11 and ResNet18 on small images;
  `SMALL_MAP_PIXELS_PER_TAP`) run as one matmul too, skipping kernel taps that
  only ever read padding. XLA:CPU runs those convolutions with a generic loop
  at 0.4-2 GFLOP/s; see `_small_map_conv`. Since this is the primal of the
  custom op, the forward, the input gradient and the transposes of the kernel
  gradient all take it, to any order.

Strides and padding are fully supported: the input gradient of a strided
convolution is a stride-1 convolution of the lhs-dilated cotangent, and the
input gradient of an lhs-dilated convolution is a strided one, so the op is
closed under differentiation.

The custom op supports reverse mode to any order (`grad` of `grad`) and `vmap`,
but not forward mode (`jax.jvp`, `jax.hessian`, `jacfwd`): a `custom_vjp`
restriction. Use `impl='xla'` where forward mode is needed.
"""

from collections.abc import Sequence
import functools
import math

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

CONV_IMPLS = ('auto', 'xla', 'im2col')

_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
# Kernel gradients of inputs with at least this many channels use one matmul
# per kernel tap (see `_kernel_grad_matmul`).
_PER_TAP_MIN_CHANNELS = 32
_Pairs = tuple[tuple[int, int], ...]
# Convolutions whose input map has fewer pixels than this many per kernel tap
# (H * W < SMALL_MAP_PIXELS_PER_TAP * KH * KW) run as matmuls
# (`_small_map_conv`). 1 is where XLA swaps a convolution's operands (kernel
# taps > input pixels; ConvOperandSwapper, formerly in AlgebraicSimplifier, in
# openxla/xla) into a form XLA:CPU runs with a generic loop. Measured per
# network layer (forward + both gradients, batch 64, alternating A/B): all
# layers below 1 (3x3 on 2x2 and 1x1 maps, 5x5 on 4x4) ran 12-70x faster as
# matmuls; the 3x3 layers above it (4x4 to 16x16 maps, 1.8-28 pixels per tap)
# ran 4-41% slower, so the threshold sits at 1. 0 turns the path off (the
# behaviour before it; benchmarks/small_conv.py compares both). Read when
# `conv2d` is traced and passed down as a static argument: every derivative
# of one convolution routes by the same value, and a jit cache never mixes two
# settings.
SMALL_MAP_PIXELS_PER_TAP = 1.0


def resolve_conv_impl(impl: str) -> str:
  """Maps 'auto' to the fast implementation for the default backend.

  'im2col' on CPU (XLA:CPU's kernel-gradient convolution is the bottleneck
  there, and so are its convolutions on small maps), 'xla' elsewhere
  (cuDNN/TPU convolutions are fast in every direction and at every size).
  'xla' on CPU stays the plain `lax.conv_general_dilated` path.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(
        f'Unknown conv impl {impl!r}; expected one of {", ".join(CONV_IMPLS)}.')
  if impl == 'auto':
    return 'im2col' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def _lax_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
              padding: _Pairs, lhs_dilation: tuple[int, ...]) -> jax.Array:
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      lhs_dilation=lhs_dilation, dimension_numbers=_DIMENSION_NUMBERS)


def _out_spatial(in_spatial: Sequence[int], kernel_spatial: Sequence[int],
                 strides: tuple[int, ...], padding: _Pairs,
                 lhs_dilation: tuple[int, ...]) -> tuple[int, int]:
  """Output (H, W) of a convolution of an lhs-dilated, padded input."""
  return tuple(
      ((n - 1) * d + 1 + lo + hi - k) // s + 1
      for n, k, s, (lo, hi), d in zip(in_spatial, kernel_spatial, strides,
                                      padding, lhs_dilation))


def _live_offsets(size: int, k: int, stride: int, lo: int, dilation: int,
                  out_size: int) -> list[int]:
  """Kernel offsets along one axis that read input data for some output.

  Offset i reads row i + o * stride - lo of the dilated input at output o;
  the other offsets only ever see padding or dilation holes (e.g. all but the
  centre of a 3x3 kernel on a 1x1 map with padding 1), so their products are
  zero and skipping them changes no value.
  """
  span = (size - 1) * dilation
  return [
      i for i in range(k)
      if any(0 <= r <= span and r % dilation == 0
             for r in (i + o * stride - lo for o in range(out_size)))
  ]


def _live_taps(in_spatial: Sequence[int], kernel_spatial: Sequence[int],
               out_spatial: Sequence[int], strides: tuple[int, ...],
               padding: _Pairs,
               lhs_dilation: tuple[int, ...]) -> list[tuple[int, int]]:
  rows, cols = (
      _live_offsets(in_spatial[a], kernel_spatial[a], strides[a],
                    padding[a][0], lhs_dilation[a], out_spatial[a])
      for a in range(2))
  return [(i, j) for i in rows for j in cols]


def _pad_input(x: jax.Array, padding: _Pairs,
               lhs_dilation: tuple[int, ...]) -> jax.Array:
  """x dilated by `lhs_dilation` and padded (negative pads crop), NHWC."""
  (lo_h, hi_h), (lo_w, hi_w) = padding
  zero = jnp.zeros((), x.dtype)
  pads = [(0, 0, 0), (lo_h, hi_h, lhs_dilation[0] - 1),
          (lo_w, hi_w, lhs_dilation[1] - 1)]
  return lax.pad(x, zero, pads + [(0, 0, 0)] * (x.ndim - 3))


def _is_small_map(x: jax.Array, kernel_shape: Sequence[int],
                  pixels_per_tap: float) -> bool:
  """Whether x's map has fewer than `pixels_per_tap` pixels per kernel tap."""
  taps = kernel_shape[0] * kernel_shape[1]
  return x.shape[1] * x.shape[2] < pixels_per_tap * taps


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _im2col_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                 padding: _Pairs, lhs_dilation: tuple[int, ...],
                 small: float) -> jax.Array:
  """`lax.conv_general_dilated` (NHWC, HWIO) with the fast backward below.

  `small` is `SMALL_MAP_PIXELS_PER_TAP` as `conv2d` read it.
  """
  if _few_outputs(x, kernel, strides, lhs_dilation):
    return _scatter_conv(x, kernel, padding, lhs_dilation)
  if _is_small_map(x, kernel.shape, small):
    return _small_map_conv(x, kernel, strides, padding, lhs_dilation)
  return _lax_conv(x, kernel, strides, padding, lhs_dilation)


def _few_outputs(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                 lhs_dilation: tuple[int, ...]) -> bool:
  """Whether the few-outputs `_scatter_conv` computes this convolution."""
  kh, kw, cin, cout = kernel.shape
  return (tuple(strides) == (1, 1) and tuple(lhs_dilation) == (1, 1)
          and kh * kw * cout <= cin and x.shape[3] == cin)


def _small_map_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                    padding: _Pairs,
                    lhs_dilation: tuple[int, ...]) -> jax.Array:
  """A convolution on a map with fewer pixels than kernel taps, as a matmul.

  XLA swaps such a convolution's operands (the kernel is the larger one) and
  XLA:CPU then runs it with a generic loop instead of its convolution
  kernels: 3x3, 512 -> 512 channels on a 2x2 map, batch 64, took 4.3 s for
  forward, input and kernel gradient (0.4 GFLOP/s), 60 ms as matmuls.
  Lhs-dilated convolutions (input gradients of strided ones) scatter
  (`_scatter_conv`: no products with dilation holes), the others gather
  (`_gather_conv`).
  """
  if tuple(lhs_dilation) != (1, 1) and tuple(strides) == (1, 1):
    return _scatter_conv(x, kernel, padding, lhs_dilation)
  return _gather_conv(x, kernel, strides, padding, lhs_dilation)


def _gather_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                 padding: _Pairs, lhs_dilation: tuple[int, ...]) -> jax.Array:
  """im2col: patches (B*Ho*Wo, T*C_in) @ kernel (T*C_in, C_out), T live taps.

  The patch matrix is T times the output map (transient memory), hence only
  for small maps.
  """
  kh, kw, cin, cout = kernel.shape
  batch = x.shape[0]
  out_h, out_w = _out_spatial(x.shape[1:3], (kh, kw), strides, padding,
                              lhs_dilation)
  taps = _live_taps(x.shape[1:3], (kh, kw), (out_h, out_w), strides, padding,
                    lhs_dilation)
  if not taps:  # every output reads only padding
    return jnp.zeros((batch, out_h, out_w, cout), jnp.result_type(x, kernel))
  xp = _pad_input(x, padding, lhs_dilation)
  sh, sw = strides
  cols = [
      lax.slice(xp, (0, i, j, 0),
                (batch, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, cin),
                (1, sh, sw, 1))
      for i, j in taps
  ]
  patches = jnp.concatenate(cols, axis=3) if len(cols) > 1 else cols[0]
  if len(taps) == kh * kw:
    w = kernel.reshape(kh * kw * cin, cout)
  else:
    w = jnp.concatenate([kernel[i, j] for i, j in taps], axis=0)
  y = patches.reshape(batch * out_h * out_w, len(taps) * cin) @ w
  return y.reshape(batch, out_h, out_w, cout)


def _scatter_conv(x: jax.Array, kernel: jax.Array, padding: _Pairs,
                  lhs_dilation: tuple[int, ...]) -> jax.Array:
  """Stride-1 convolution as one matmul, then shifted adds.

  z = x @ W as a (B*H*W, C_in) x (C_in, T*C_out) matmul over the T live taps;
  z is dilated and padded as x would be, and
  y[p, q] = sum_(i, j) zpad[p + i, q + j, (i, j)]. Products with padding or
  dilation holes are never formed: for the input gradient of a stride-2
  convolution (lhs dilation 2) that is 3/4 of what the gather form computes.
  With few output channels (the input gradient of a 1- or 3-channel first
  layer, any map size) the adds are cheap: XLA:CPU runs that convolution at
  ~20 GFLOP/s (measured, 32x32, batch 100), the matmul at ~80.
  """
  kh, kw, cin, cout = kernel.shape
  b, h, w, _ = x.shape
  out_h, out_w = _out_spatial((h, w), (kh, kw), (1, 1), padding, lhs_dilation)
  taps = _live_taps((h, w), (kh, kw), (out_h, out_w), (1, 1), padding,
                    lhs_dilation)
  if not taps:
    return jnp.zeros((b, out_h, out_w, cout), jnp.result_type(x, kernel))
  if len(taps) == kh * kw:
    w2 = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin, kh * kw * cout)
  else:
    w2 = jnp.stack([kernel[i, j] for i, j in taps], axis=1)
    w2 = w2.reshape(cin, len(taps) * cout)
  z = (x.reshape(b * h * w, cin) @ w2).reshape(b, h, w, len(taps), cout)
  zp = _pad_input(z, padding, lhs_dilation)
  y = None
  for t, (i, j) in enumerate(taps):
    tap = zp[:, i:i + out_h, j:j + out_w, t, :]
    y = tap if y is None else y + tap
  return y


def _im2col_conv_fwd(x, kernel, strides, padding, lhs_dilation, small):
  # The primal is the custom op itself, not `_lax_conv`: under nested
  # differentiation (grad of grad, e.g. inside a scanned unroll) an outer level
  # traces this rule, and a plain lax conv here would be transposed w.r.t. the
  # kernel by XLA's slow convolution again.
  y = _im2col_conv(x, kernel, strides, padding, lhs_dilation, small)
  return y, (x, kernel)


def _input_grad(g: jax.Array, kernel: jax.Array, in_spatial: Sequence[int],
                strides: tuple[int, ...], padding: _Pairs,
                lhs_dilation: tuple[int, ...], small: float) -> jax.Array:
  """Transpose w.r.t. the input, itself a custom convolution.

  With y[o] = sum_k xpad[o*s + k] w[k] (xpad = x dilated by d, then padded by
  (lo, hi)), the gradient is a correlation of the s-dilated cotangent, padded by
  K-1-lo in front, with the flipped kernel, read with window stride d. The back
  padding makes the padded length exactly (H-1)*d + K so the result has H rows.
  Negative paddings (e.g. lo > K-1) crop, which XLA supports.
  """
  new_padding = []
  for i, (lo, hi) in enumerate(padding):
    k = kernel.shape[i]
    dilated_in = (in_spatial[i] - 1) * lhs_dilation[i] + 1
    dilated_g = (g.shape[1 + i] - 1) * strides[i] + 1
    new_lo = k - 1 - lo
    new_hi = dilated_in + k - 1 - new_lo - dilated_g
    new_padding.append((new_lo, new_hi))
  flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
  return _im2col_conv(g, flipped, lhs_dilation, tuple(new_padding), strides,
                      small)


def _kernel_grad_matmul(x: jax.Array, g: jax.Array,
                        kernel_shape: Sequence[int], strides: tuple[int, ...],
                        padding: _Pairs,
                        lhs_dilation: tuple[int, ...]) -> jax.Array:
  """Transpose w.r.t. the kernel: patches (BHW x KH*KW*C) @ g (BHW x O).

  The patches are strided slices of the padded (and lhs-dilated) input, in
  (kh, kw, c) order so the product reshapes straight to HWIO. With at least
  `_PER_TAP_MIN_CHANNELS` input channels each tap is its own (C x BHW) @
  (BHW x O) matmul, which avoids materialising the patch matrix (KH*KW times
  the input); with fewer (image layers: 1 or 3 channels) the taps are
  concatenated into one matmul, since a C=1 or 3 tap matmul is a poor shape.
  Measured in the ConvNet-3 meta-gradient (10 steps, remat, quiet machine,
  interleaved A/B): per-tap for wide layers -4.2% time at 32x32x3 and -2.1% at
  28x28x1 vs one concatenated matmul everywhere; per-tap for the 1-channel
  layer too was +3.5% at 28x28x1. (Before the kernel gradient had its own
  `custom_vjp`, second-order terms transposed this function, and the single
  concatenated matmul was ~1.8x faster than per-tap; `lax.conv_general_dilated
  _patches` was >10x slower in its own transpose.) Taps that only read padding
  (`_live_offsets`; 8 of 9 on a 1x1 map) get a zero gradient without a
  matmul. XLA's own kernel-gradient convolution as this function's value was
  1.2-2x faster per layer on 4x4 to 8x8 maps, but made the ConvNet-3
  meta-gradient 10x slower (its 8x8 maps, 128 channels): not used.
  """
  kh, kw = kernel_shape[0], kernel_shape[1]
  cin = x.shape[3]
  batch, out_h, out_w, out_c = g.shape
  live = set(_live_taps(x.shape[1:3], (kh, kw), (out_h, out_w), strides,
                        padding, lhs_dilation))
  xp = _pad_input(x, padding, lhs_dilation)
  sh, sw = strides
  taps = {
      (i, j): lax.slice(xp, (0, i, j, 0),
                        (batch, i + (out_h - 1) * sh + 1,
                         j + (out_w - 1) * sw + 1, cin),
                        (1, sh, sw, 1))
      for i in range(kh) for j in range(kw) if (i, j) in live
  }
  rows = batch * out_h * out_w
  g2 = g.reshape(rows, out_c)
  dtype = jnp.result_type(x, g)
  zero = jnp.zeros((cin, out_c), dtype)
  if cin >= _PER_TAP_MIN_CHANNELS:
    dk = [taps[(i, j)].reshape(rows, cin).T @ g2 if (i, j) in taps else zero
          for i in range(kh) for j in range(kw)]
    return jnp.stack(dk).reshape(kernel_shape)
  if not taps:
    return jnp.zeros(kernel_shape, dtype)
  order = list(taps)  # row-major (i, j)
  cols = [taps[t] for t in order]
  patches = jnp.concatenate(cols, axis=3) if len(cols) > 1 else cols[0]
  dk = patches.reshape(rows, len(order) * cin).T @ g2
  if len(order) == kh * kw:
    return dk.reshape(kernel_shape)
  dk = dk.reshape(len(order), cin, out_c)
  pos = {t: n for n, t in enumerate(order)}
  dk = [dk[pos[(i, j)]] if (i, j) in pos else zero
        for i in range(kh) for j in range(kw)]
  return jnp.stack(dk).reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _kernel_grad(x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...],
                 strides: tuple[int, ...], padding: _Pairs,
                 lhs_dilation: tuple[int, ...], small: float) -> jax.Array:
  """`_kernel_grad_matmul` whose own transposes are convolutions.

  dK = patches(x)^T g is bilinear in (x, g). Its transpose w.r.t. g, applied
  to a kernel-shaped cotangent dK', is patches(x) @ dK' = conv(x, dK'); w.r.t.
  x it is the input gradient of that same convolution at g. Letting autodiff
  transpose the matmul instead builds the patch matrix's transpose (nine
  pads summed) and a matmul with K = KH*KW*C_in, which for 3-channel (or
  1-channel) first layers is K = 27 (9): the slowest ops of the meta-gradient
  on CPU. Both transposes are the custom convolution again, so every order
  stays in this family.
  """
  del small  # only the transposes convolve
  return _kernel_grad_matmul(x, g, kernel_shape, strides, padding,
                             lhs_dilation)


def _kernel_grad_fwd(x, g, kernel_shape, strides, padding, lhs_dilation,
                     small):
  dk = _kernel_grad(x, g, kernel_shape, strides, padding, lhs_dilation,
                    small)
  return dk, (x, g)


def _kernel_grad_bwd(kernel_shape, strides, padding, lhs_dilation, small,
                     residuals, dk_bar):
  x, g = residuals
  dk_bar = dk_bar.astype(x.dtype)
  g_bar = _im2col_conv(x, dk_bar, strides, padding, lhs_dilation, small)
  x_bar = _input_grad(g, dk_bar, x.shape[1:3], strides, padding, lhs_dilation,
                      small)
  return x_bar, g_bar


_kernel_grad.defvjp(_kernel_grad_fwd, _kernel_grad_bwd)


def _im2col_conv_bwd(strides, padding, lhs_dilation, small, residuals, g):
  x, kernel = residuals
  dx = _input_grad(g, kernel, x.shape[1:3], strides, padding, lhs_dilation,
                   small)
  dk = _kernel_grad(x, g, tuple(kernel.shape), strides, padding,
                    lhs_dilation, small)
  return dx, dk


_im2col_conv.defvjp(_im2col_conv_fwd, _im2col_conv_bwd)


def _explicit_padding(x_spatial: Sequence[int], kernel_spatial: Sequence[int],
                      strides: tuple[int, ...],
                      padding: int | str | Sequence[tuple[int, int]]) -> _Pairs:
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(x_spatial, kernel_spatial, strides,
                               padding.upper())
  elif isinstance(padding, int):
    pads = [(padding, padding)] * len(kernel_spatial)
  else:
    pads = list(padding)
  return tuple((int(lo), int(hi)) for lo, hi in pads)


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int | Sequence[int] = 1,
           padding: int | str | Sequence[tuple[int, int]] = 0,
           impl: str = 'auto') -> jax.Array:
  """Cross-correlation (PyTorch `conv2d`) of NHWC `x` with HWIO `kernel`.

  Args:
    x: (B, H, W, C_in) input.
    kernel: (KH, KW, C_in, C_out) weights.
    stride: window stride, int or (sh, sw).
    padding: symmetric int, explicit ((lo, hi), (lo, hi)), or 'SAME' / 'VALID'.
    impl: 'xla', 'im2col' or 'auto' (see `resolve_conv_impl`).

  Returns:
    (B, H_out, W_out, C_out).
  """
  impl = resolve_conv_impl(impl)
  strides = (stride, stride) if isinstance(stride, int) else tuple(stride)
  pads = _explicit_padding(x.shape[1:3], kernel.shape[:2], strides, padding)
  if impl == 'xla':
    return _lax_conv(x, kernel, strides, pads, (1, 1))
  return _im2col_conv(x, kernel, strides, pads, (1, 1),
                      float(SMALL_MAP_PIXELS_PER_TAP))


def torch_uniform_init(fan_in: int) -> nn.initializers.Initializer:
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default Conv2d/Linear init.

  kaiming_uniform(a=sqrt(5)) for weights and the matching bias rule both reduce
  to this bound; the reference's accuracies (and expert trajectories) assume
  it.
  """
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class Conv(nn.Module):
  """2-D convolution layer (NHWC) with PyTorch's default initialisation."""
  features: int
  kernel_size: int | Sequence[int] = 3
  stride: int | Sequence[int] = 1
  padding: int | str | Sequence[tuple[int, int]] = 0
  use_bias: bool = True
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = _pair(self.kernel_size)
    in_features = x.shape[-1]
    fan_in = in_features * kh * kw
    kernel = self.param('kernel', torch_uniform_init(fan_in),
                        (kh, kw, in_features, self.features))
    y = conv2d(x, kernel, stride=self.stride, padding=self.padding,
               impl=self.impl)
    if self.use_bias:
      bias = self.param('bias', torch_uniform_init(fan_in), (self.features,))
      y = y + bias
    return y


class Dense(nn.Module):
  """Fully connected layer with PyTorch's default `nn.Linear` initialisation."""
  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    kernel = self.param('kernel', torch_uniform_init(fan_in),
                        (fan_in, self.features))
    y = x @ kernel
    if self.use_bias:
      y = y + self.param('bias', torch_uniform_init(fan_in), (self.features,))
    return y
