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


def resolve_conv_impl(impl: str) -> str:
  """Maps 'auto' to the fast implementation for the default backend.

  'im2col' on CPU (XLA:CPU's kernel-gradient convolution is the bottleneck
  there), 'xla' elsewhere (cuDNN/TPU convolutions are fast in every direction).
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _im2col_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                 padding: _Pairs, lhs_dilation: tuple[int, ...]) -> jax.Array:
  """`lax.conv_general_dilated` (NHWC, HWIO) with the fast backward below."""
  if _few_outputs(x, kernel, strides, lhs_dilation):
    return _few_outputs_conv(x, kernel, padding)
  return _lax_conv(x, kernel, strides, padding, lhs_dilation)


def _few_outputs(x: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                 lhs_dilation: tuple[int, ...]) -> bool:
  """Whether `_few_outputs_conv` computes this convolution."""
  kh, kw, cin, cout = kernel.shape
  return (tuple(strides) == (1, 1) and tuple(lhs_dilation) == (1, 1)
          and kh * kw * cout <= cin and x.shape[3] == cin)


def _few_outputs_conv(x: jax.Array, kernel: jax.Array,
                      padding: _Pairs) -> jax.Array:
  """Stride-1 convolution with few output channels: one matmul, then shifts.

  z = x @ W as a (B*H*W, C_in) x (C_in, KH*KW*C_out) matmul, then
  y[p, q] = sum_(i, j) zpad[p + i, q + j, (i, j)]. This is the input gradient
  of a first layer (1 or 3 image channels out of 128): XLA:CPU runs that
  convolution at ~20 GFLOP/s (measured, 32x32, batch 100), the matmul at ~80
  and the nine shifted adds are cheap (C_out channels). Same values as the
  convolution up to float summation order.
  """
  kh, kw, cin, cout = kernel.shape
  b, h, w, _ = x.shape
  w2 = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin, kh * kw * cout)
  z = (x.reshape(b * h * w, cin) @ w2).reshape(b, h, w, kh * kw, cout)
  (lo_h, hi_h), (lo_w, hi_w) = padding
  zero = jnp.zeros((), z.dtype)
  zp = lax.pad(z, zero, ((0, 0, 0), (lo_h, hi_h, 0), (lo_w, hi_w, 0),
                         (0, 0, 0), (0, 0, 0)))
  out_h = zp.shape[1] - kh + 1
  out_w = zp.shape[2] - kw + 1
  y = None
  for i in range(kh):
    for j in range(kw):
      tap = zp[:, i:i + out_h, j:j + out_w, i * kw + j, :]
      y = tap if y is None else y + tap
  return y


def _im2col_conv_fwd(x, kernel, strides, padding, lhs_dilation):
  # The primal is the custom op itself, not `_lax_conv`: under nested
  # differentiation (grad of grad, e.g. inside a scanned unroll) an outer level
  # traces this rule, and a plain lax conv here would be transposed w.r.t. the
  # kernel by XLA's slow convolution again.
  y = _im2col_conv(x, kernel, strides, padding, lhs_dilation)
  return y, (x, kernel)


def _input_grad(g: jax.Array, kernel: jax.Array, in_spatial: Sequence[int],
                strides: tuple[int, ...], padding: _Pairs,
                lhs_dilation: tuple[int, ...]) -> jax.Array:
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
  return _im2col_conv(g, flipped, lhs_dilation, tuple(new_padding), strides)


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
  _patches` was >10x slower in its own transpose.)
  """
  kh, kw = kernel_shape[0], kernel_shape[1]
  (lo_h, hi_h), (lo_w, hi_w) = padding
  zero = jnp.zeros((), x.dtype)
  xp = lax.pad(x, zero, ((0, 0, 0), (lo_h, hi_h, lhs_dilation[0] - 1),
                         (lo_w, hi_w, lhs_dilation[1] - 1), (0, 0, 0)))
  batch, out_h, out_w, out_c = g.shape
  sh, sw = strides
  taps = [
      lax.slice(xp, (0, i, j, 0),
                (batch, i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1,
                 xp.shape[3]),
                (1, sh, sw, 1))
      for i in range(kh) for j in range(kw)
  ]
  rows = batch * out_h * out_w
  g2 = g.reshape(rows, out_c)
  if x.shape[3] >= _PER_TAP_MIN_CHANNELS:
    dk = jnp.stack([t.reshape(rows, x.shape[3]).T @ g2 for t in taps])
    return dk.reshape(kernel_shape)
  patches = jnp.concatenate(taps, axis=3) if len(taps) > 1 else taps[0]
  dk = patches.reshape(rows, kh * kw * x.shape[3]).T @ g2
  return dk.reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _kernel_grad(x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...],
                 strides: tuple[int, ...], padding: _Pairs,
                 lhs_dilation: tuple[int, ...]) -> jax.Array:
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
  return _kernel_grad_matmul(x, g, kernel_shape, strides, padding,
                             lhs_dilation)


def _kernel_grad_fwd(x, g, kernel_shape, strides, padding, lhs_dilation):
  dk = _kernel_grad(x, g, kernel_shape, strides, padding, lhs_dilation)
  return dk, (x, g)


def _kernel_grad_bwd(kernel_shape, strides, padding, lhs_dilation, residuals,
                     dk_bar):
  x, g = residuals
  dk_bar = dk_bar.astype(x.dtype)
  g_bar = _im2col_conv(x, dk_bar, strides, padding, lhs_dilation)
  x_bar = _input_grad(g, dk_bar, x.shape[1:3], strides, padding, lhs_dilation)
  return x_bar, g_bar


_kernel_grad.defvjp(_kernel_grad_fwd, _kernel_grad_bwd)


def _im2col_conv_bwd(strides, padding, lhs_dilation, residuals, g):
  x, kernel = residuals
  dx = _input_grad(g, kernel, x.shape[1:3], strides, padding, lhs_dilation)
  dk = _kernel_grad(x, g, tuple(kernel.shape), strides, padding,
                    lhs_dilation)
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
  return _im2col_conv(x, kernel, strides, pads, (1, 1))


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
