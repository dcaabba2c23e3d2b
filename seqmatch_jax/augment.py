"""Differentiable Siamese Augmentation (DSA, Zhao & Bilen 2021) in JAX.

The reference (DatasetCondensation / mtt-distillation `DiffAugment` in 'S' mode)
draws ONE family per batch from the strategy string and per-sample parameters
for it. Here sampling and application are split so that the same draw can be
applied to several batches (siamese) and so that everything stays a pure,
fixed-shape function of a PRNG key: jit, vmap, scan and (higher-order)
differentiation w.r.t. pixels all work, with no host round trip.

Images are NHWC in model space (normalised / ZCA-whitened); every op acts on
the values it is given, as the reference does on normalised tensors.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from seqmatch_jax.errors import ConfigError

DEFAULT_STRATEGY = 'color_crop_cutout_flip_scale_rotate'

# Global family order; `AugmentParams.family` indexes into this tuple.
FAMILIES = ('color', 'crop', 'cutout', 'flip', 'scale', 'rotate', 'noise')
_IDENTITY_STRATEGIES = ('', 'none')


class InvalidStrategyError(ConfigError, ValueError):
  """Unknown DSA strategy: a ValueError that main reports as a user error."""


@dataclasses.dataclass(frozen=True)
class DSAParams:
  """Ranges of the random parameters (the reference's `ParamDiffAug`).

  `prob_flip` and `align_corners` are extra knobs with the reference values:
  mtt-distillation passes align_corners=True to affine_grid/grid_sample;
  DatasetCondensation relies on torch's default, which is False since 1.3.
  """
  ratio_scale: float = 1.2
  ratio_rotate: float = 15.0
  ratio_crop_pad: float = 0.125
  ratio_cutout: float = 0.5
  ratio_noise: float = 0.05
  brightness: float = 1.0
  saturation: float = 2.0
  contrast: float = 0.5
  prob_flip: float = 0.5
  align_corners: bool = True
  # 'dsa': one family of the strategy per call (DC/MTT `DiffAugment`).
  # 'idc': flip, color and cutout always (when listed), in that order around
  # one family drawn from the rest (IDC's `DiffAug`, its `misc/augment.py`).
  style: str = 'dsa'


STYLES = ('dsa', 'idc')
# IDC's `DiffAug` applies these whenever the strategy lists them.
IDC_ALWAYS = ('flip', 'color', 'cutout')


@dataclasses.dataclass(frozen=True)
class AugmentParams:
  """One DSA draw for a batch of B images; self-contained (no ratios needed).

  Every family's parameters are always present, so the pytree structure only
  depends on the strategy's family set and B: it can be stacked, scanned over
  and passed through jit. `families` (static) lists the branches compiled by
  `apply_params`; `family` must index one of them in `FAMILIES` (another
  value silently runs the first compiled branch).

  Attributes:
    family: int32 [], index into FAMILIES of the chosen family (-1: identity).
    brightness: [B] additive offset, (u - 0.5) * dsa.brightness.
    saturation: [B] factor on the deviation from the channel mean, u * ratio.
    contrast: [B] factor on the deviation from the image mean, u + ratio.
    shift: int32 [B, 2] crop translation (dy, dx): out[i, j] = x[i+dy, j+dx].
    cutout_lo: int32 [B, 2] first zeroed row / col (may be negative).
    cutout_hi: int32 [B, 2] one past the last zeroed row / col.
    flip: bool [B] horizontal flip per sample.
    scale: [B, 2] (sx, sy) affine scale of the sampling grid.
    angle: [B] rotation in radians (positive = anticlockwise, as reference).
    noise_seed: uint32 [] seed of the additive Gaussian noise.
    noise_std: [] standard deviation of that noise.
    families: static tuple of family names compiled into the switch.
    align_corners: static; torch grid_sample semantics of the affine families.
    always: static; families applied on every call around the drawn one
      (IDC style: flip, color, [drawn], cutout); () for DSA style.
    drawn_rows: static; the batch the draw was made for when it is applied
      to its first rows only (`take_rows`), else 0: the noise family then
      draws the full batch's noise and keeps those rows.
  """
  family: jax.Array
  brightness: jax.Array
  saturation: jax.Array
  contrast: jax.Array
  shift: jax.Array
  cutout_lo: jax.Array
  cutout_hi: jax.Array
  flip: jax.Array
  scale: jax.Array
  angle: jax.Array
  noise_seed: jax.Array
  noise_std: jax.Array
  families: tuple[str, ...] = ()
  align_corners: bool = True
  always: tuple[str, ...] = ()
  drawn_rows: int = 0

  def replace(self, **changes) -> 'AugmentParams':
    """Returns a copy with some fields changed (handy for handcrafted draws)."""
    return dataclasses.replace(self, **changes)


_DATA_FIELDS = tuple(
    f.name for f in dataclasses.fields(AugmentParams)
    if f.name not in ('families', 'align_corners', 'always', 'drawn_rows'))
jax.tree_util.register_dataclass(
    AugmentParams,
    data_fields=list(_DATA_FIELDS),
    meta_fields=['families', 'align_corners', 'always', 'drawn_rows'])


def _parse_strategy(strategy: str) -> tuple[str, ...]:
  """Splits a strategy into tokens (duplicates kept: they weight the draw)."""
  if not isinstance(strategy, str):
    raise InvalidStrategyError(
        f'DSA strategy must be a string, got {type(strategy).__name__}.')
  if strategy.lower() in _IDENTITY_STRATEGIES:
    return ()
  tokens = tuple(strategy.split('_'))
  bad = [t for t in tokens if t not in FAMILIES]
  if bad:
    raise InvalidStrategyError(
        f'Unknown DSA augmentation(s) {bad} in strategy {strategy!r}; valid '
        f'families are {list(FAMILIES)} joined by "_" (e.g. '
        f'{DEFAULT_STRATEGY!r}), or "none" / "" for no augmentation.')
  return tokens


def validate_strategy(strategy: str) -> None:
  """Raises InvalidStrategyError (a ValueError) naming the valid families."""
  _parse_strategy(strategy)


def _spatial_size(image_shape: Sequence[int]) -> tuple[int, int]:
  shape = tuple(int(s) for s in image_shape)
  if len(shape) not in (2, 3) or min(shape) <= 0:
    raise ValueError(
        f'image_shape must be (H, W) or (H, W, C), got {tuple(image_shape)}.')
  return shape[0], shape[1]


def sample_params(
    key: jax.Array,
    strategy: str,
    batch_size: int,
    image_shape: Sequence[int],
    dsa: DSAParams = DSAParams(),
) -> AugmentParams:
  """Draws one family of `strategy` and per-sample parameters for all families.

  Draws for families other than the chosen one are unused, but drawing them
  keeps the pytree structure fixed and costs a few scalars per sample.
  """
  tokens = _parse_strategy(strategy)
  if dsa.style not in STYLES:
    raise InvalidStrategyError(f'augmentation style must be one of {STYLES}, '
                               f'got {dsa.style!r}.')
  always = ()
  if dsa.style == 'idc':
    always = tuple(f for f in IDC_ALWAYS if f in tokens)
    tokens = tuple(t for t in tokens if t not in IDC_ALWAYS)
  h, w = _spatial_size(image_shape)
  b = int(batch_size)
  if b <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}.')
  k_family, k_uniform, k_noise = jax.random.split(key, 3)
  # One uniform block for all per-sample draws: fewer RNG ops to compile.
  u = jax.random.uniform(k_uniform, (11, b), jnp.float32)
  # Uniform integer in [lo, hi) from a uniform float in [0, 1).
  randint = lambda v, lo, hi: jnp.clip(
      jnp.floor(v * (hi - lo)).astype(jnp.int32) + lo, lo, hi - 1)

  if tokens:
    token_ids = jnp.asarray([FAMILIES.index(t) for t in tokens], jnp.int32)
    family = token_ids[jax.random.randint(k_family, (), 0, len(tokens))]
  else:
    family = jnp.asarray(-1, jnp.int32)

  # Crop: integer translation in [-s, s], s = round(size * ratio) per axis.
  pad = (int(h * dsa.ratio_crop_pad + 0.5), int(w * dsa.ratio_crop_pad + 0.5))
  shift = jnp.stack([randint(u[3], -pad[0], pad[0] + 1),
                     randint(u[4], -pad[1], pad[1] + 1)], axis=-1)

  # Cutout: square of side round(size * ratio); centre in [0, size - side % 2]
  # (reference bounds), clipped at the borders by the mask.
  side = np.array([int(h * dsa.ratio_cutout + 0.5),
                   int(w * dsa.ratio_cutout + 0.5)], np.int32)
  centre = jnp.stack([randint(u[5], 0, h + 1 - side[0] % 2),
                      randint(u[6], 0, w + 1 - side[1] % 2)], axis=-1)
  cutout_lo = centre - side // 2
  cutout_hi = cutout_lo + side

  r = dsa.ratio_scale
  scale = jnp.stack([u[8], u[9]], axis=-1) * (r - 1.0 / r) + 1.0 / r
  angle = (u[10] - 0.5) * 2.0 * dsa.ratio_rotate / 180.0 * np.pi

  families = tuple(f for f in FAMILIES if f in tokens)
  return AugmentParams(
      family=family,
      brightness=(u[0] - 0.5) * dsa.brightness,
      saturation=u[1] * dsa.saturation,
      contrast=u[2] + dsa.contrast,
      shift=shift,
      cutout_lo=cutout_lo,
      cutout_hi=cutout_hi,
      flip=u[7] < dsa.prob_flip,
      scale=scale,
      angle=angle,
      noise_seed=jax.random.bits(k_noise, (), jnp.uint32),
      noise_std=jnp.asarray(dsa.ratio_noise, jnp.float32),
      families=families,
      align_corners=bool(dsa.align_corners),
      always=always,
  )


def _per_sample(v: jax.Array, x: jax.Array) -> jax.Array:
  """[B] -> [B, 1, 1, 1] in x's dtype, for broadcasting over NHWC."""
  return v.astype(x.dtype)[:, None, None, None]


def _color(x: jax.Array, p: AugmentParams) -> jax.Array:
  """Brightness, then saturation, then contrast, each on the previous output.

  Saturation keeps every pixel's channel mean, so the image mean contrast
  needs equals the mean of those channel means: one reduction fewer (4x
  faster on CPU), same function.
  """
  x = x + _per_sample(p.brightness, x)
  pixel_mean = jnp.mean(x, axis=3, keepdims=True)
  s = _per_sample(p.saturation, x)
  x = x * s + pixel_mean * (1 - s)
  image_mean = jnp.mean(pixel_mean, axis=(1, 2, 3), keepdims=True)
  return (x - image_mean) * _per_sample(p.contrast, x) + image_mean


def _crop(x: jax.Array, p: AugmentParams) -> jax.Array:
  """Integer translation, zeros entering (reference: pad 1, clamp, gather)."""
  _, h, w, _ = x.shape
  rows = jnp.arange(h)[None, :] + p.shift[:, :1]  # [B, H]
  cols = jnp.arange(w)[None, :] + p.shift[:, 1:]  # [B, W]
  x = jnp.take_along_axis(x, jnp.clip(rows, 0, h - 1)[:, :, None, None], 1)
  x = jnp.take_along_axis(x, jnp.clip(cols, 0, w - 1)[:, None, :, None], 2)
  valid = (((rows >= 0) & (rows < h))[:, :, None]
           & ((cols >= 0) & (cols < w))[:, None, :])
  return jnp.where(valid[..., None], x, jnp.zeros((), x.dtype))


def _cutout(x: jax.Array, p: AugmentParams) -> jax.Array:
  """Zeroes each sample's [lo, hi) box (rows x cols), clipped at borders."""
  _, h, w, _ = x.shape
  rows = jnp.arange(h)[None, :]
  cols = jnp.arange(w)[None, :]
  in_rows = (rows >= p.cutout_lo[:, :1]) & (rows < p.cutout_hi[:, :1])
  in_cols = (cols >= p.cutout_lo[:, 1:]) & (cols < p.cutout_hi[:, 1:])
  keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
  return x * keep[..., None].astype(x.dtype)


def _flip(x: jax.Array, p: AugmentParams) -> jax.Array:
  return jnp.where(p.flip[:, None, None, None], x[:, :, ::-1, :], x)


def _bilinear_zeros(x: jax.Array, iy: jax.Array, ix: jax.Array) -> jax.Array:
  """Samples x [B,H,W,C] at pixel coords iy, ix [B,H,W]; zero outside.

  Matches torch grid_sample(mode='bilinear', padding_mode='zeros'): each of the
  four corners contributes only if it lies inside the image. Four row gathers
  (C contiguous values each) keep it cheap and linear in x; an exact integer
  coordinate gives weight 1 to one corner and 0 to the others.
  """
  b, h, w, c = x.shape
  y0 = jnp.floor(iy)
  x0 = jnp.floor(ix)
  fy, fx = iy - y0, ix - x0
  y0 = y0.astype(jnp.int32)
  x0 = x0.astype(jnp.int32)
  flat = x.reshape(b, h * w, c)
  gather_rows = jax.vmap(lambda img, rows: img[rows])
  out = jnp.zeros_like(x)
  for dy, wy in ((0, 1 - fy), (1, fy)):
    for dx, wx in ((0, 1 - fx), (1, fx)):
      yy, xx = y0 + dy, x0 + dx
      valid = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
      rows = jnp.clip(yy, 0, h - 1) * w + jnp.clip(xx, 0, w - 1)
      weight = jnp.where(valid, wy * wx, 0.0).astype(x.dtype)[..., None]
      vals = gather_rows(flat, rows.reshape(b, -1)).reshape(b, h, w, c)
      out = out + vals * weight
  return out


def _affine(x: jax.Array, theta: jax.Array, align_corners: bool) -> jax.Array:
  """torch affine_grid + grid_sample for per-sample 2x2 `theta` (no shift).

  theta maps normalised output (x, y) to normalised input coordinates. Working
  in centred pixel units (u = j - (W-1)/2) instead of [-1, 1] makes scale 1 /
  angle 0 an exact identity: integer targets involve no rounding.
  """
  _, h, w, _ = x.shape
  half = lambda n: (n - 1) / 2.0 if align_corners else n / 2.0
  hy, hx = half(h), half(w)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  dtype = x.dtype  # the grid in the images' precision (float64 under x64)
  v = (jnp.arange(h, dtype=dtype) - cy)[None, :, None]  # rows
  u = (jnp.arange(w, dtype=dtype) - cx)[None, None, :]  # cols
  # Pixel-space matrix D A D^-1 with D = diag(hx, hy); guard size-1 axes.
  ratio_xy = hx / hy if hy else 0.0
  ratio_yx = hy / hx if hx else 0.0
  t = theta.astype(dtype)
  a = lambda i, j: t[:, i, j][:, None, None]
  ix = a(0, 0) * u + (a(0, 1) * ratio_xy) * v + cx
  iy = (a(1, 0) * ratio_yx) * u + a(1, 1) * v + cy
  return _bilinear_zeros(x, iy, ix)


def _scale(x: jax.Array, p: AugmentParams) -> jax.Array:
  zero = jnp.zeros_like(p.scale[:, 0])
  theta = jnp.stack([jnp.stack([p.scale[:, 0], zero], -1),
                     jnp.stack([zero, p.scale[:, 1]], -1)], axis=1)
  return _affine(x, theta, p.align_corners)


def _rotate(x: jax.Array, p: AugmentParams) -> jax.Array:
  cos, sin = jnp.cos(p.angle), jnp.sin(p.angle)
  theta = jnp.stack([jnp.stack([cos, -sin], -1),
                     jnp.stack([sin, cos], -1)], axis=1)
  return _affine(x, theta, p.align_corners)


def _noise(x: jax.Array, p: AugmentParams) -> jax.Array:
  """Additive Gaussian noise, regenerated from the seed: siamese-identical."""
  rows = max(p.drawn_rows, x.shape[0])
  eps = jax.random.normal(jax.random.PRNGKey(p.noise_seed), (rows,) + x.shape[1:],
                          x.dtype)[:x.shape[0]]
  return x + p.noise_std.astype(x.dtype) * eps


_APPLY_FNS = {
    'color': _color,
    'crop': _crop,
    'cutout': _cutout,
    'flip': _flip,
    'scale': _scale,
    'rotate': _rotate,
    'noise': _noise,
}


def apply_params(x: jax.Array, params: AugmentParams) -> jax.Array:
  """Applies one DSA draw to x [B, H, W, C]; affine (mostly linear) in x.

  IDC style first applies flip and color, then the drawn family, then cutout
  (each only if the strategy lists it). Only the families of the sampled strategy are compiled; lax.switch runs the
  chosen one (under vmap over draws it becomes a select over those branches).
  """
  if x.ndim != 4:
    raise ValueError(f'Expected NHWC images, got shape {x.shape}.')
  if params.flip.shape[0] != x.shape[0]:
    raise ValueError(
        f'Parameters drawn for batch {params.flip.shape[0]}, got {x.shape[0]}.')
  for name in ('flip', 'color'):
    if name in params.always:
      x = _APPLY_FNS[name](x, params)
  x = _apply_drawn(x, params)
  if 'cutout' in params.always:
    x = _cutout(x, params)
  return x


def _apply_drawn(x: jax.Array, params: AugmentParams) -> jax.Array:
  families = params.families
  if not families:
    return x
  if len(families) == 1:
    return _APPLY_FNS[families[0]](x, params)
  branch_of = np.zeros(len(FAMILIES), np.int32)
  for i, name in enumerate(families):
    branch_of[FAMILIES.index(name)] = i
  branch = jnp.asarray(branch_of)[jnp.clip(params.family, 0, len(FAMILIES) - 1)]
  return jax.lax.switch(branch, [_APPLY_FNS[f] for f in families], x, params)


def augment(
    key: jax.Array,
    x: jax.Array,
    strategy: str = DEFAULT_STRATEGY,
    dsa: DSAParams = DSAParams(),
    draw_rows: int | None = None,
) -> jax.Array:
  """DSA of one NHWC batch: one random family, per-sample parameters.

  `draw_rows` (>= x's batch): draw for that many rows and transform x with
  the first ones' draws, i.e. the first rows of the augmented padded batch
  without augmenting the padding (a short evaluation batch, `SGDSpec.
  trim_short_batch`).
  """
  if x.ndim != 4:
    raise ValueError(f'Expected NHWC images, got shape {x.shape}.')
  if not _parse_strategy(strategy):
    return x  # Identity: skip the (unused) draw.
  rows = x.shape[0] if draw_rows is None else int(draw_rows)
  if rows < x.shape[0]:
    raise ValueError(f'draw_rows={rows} is smaller than the batch {x.shape[0]}.')
  params = sample_params(key, strategy, rows, x.shape[1:], dsa)
  return apply_params(x, take_rows(params, x.shape[0]))


def take_rows(params: AugmentParams, n: int) -> AugmentParams:
  """The draws of the first `n` samples of `params` (exactly what they get
  in the whole batch, the noise family included)."""
  rows = params.flip.shape[0]
  if n == rows:
    return params
  return params.replace(drawn_rows=max(params.drawn_rows, rows), **{
      f: getattr(params, f)[:n] for f in _PER_SAMPLE_FIELDS})


def augment_siamese(
    key: jax.Array,
    xs: Sequence[jax.Array],
    strategy: str = DEFAULT_STRATEGY,
    dsa: DSAParams = DSAParams(),
) -> tuple[jax.Array, ...]:
  """Applies the identical draw to every batch (same B, H, W required)."""
  xs = tuple(xs)
  if not xs:
    return ()
  shapes = {tuple(x.shape[:3]) for x in xs}
  if any(x.ndim != 4 for x in xs) or len(shapes) != 1:
    raise ValueError(
        'augment_siamese needs NHWC batches with equal batch size and spatial '
        f'size, got shapes {[tuple(x.shape) for x in xs]}.')
  if not _parse_strategy(strategy):
    return xs
  params = sample_params(key, strategy, xs[0].shape[0], xs[0].shape[1:], dsa)
  return tuple(apply_params(x, params) for x in xs)


_PER_SAMPLE_FIELDS = ('brightness', 'saturation', 'contrast', 'shift', 'cutout_lo',
                      'cutout_hi', 'flip', 'scale', 'angle')


def broadcast_params(params: AugmentParams, batch_size: int) -> AugmentParams:
  """A one-sample draw repeated for `batch_size` samples (batch-shared)."""
  return params.replace(**{
      f: jnp.broadcast_to(getattr(params, f)[:1],
                          (batch_size,) + getattr(params, f).shape[1:])
      for f in _PER_SAMPLE_FIELDS})


def augment_shared(
    key: jax.Array,
    xs: Sequence[jax.Array],
    strategy: str = DEFAULT_STRATEGY,
    dsa: DSAParams = DSAParams(),
) -> tuple[jax.Array, ...]:
  """One transform for every sample of every batch (batches may differ in size).

  DC/DSA and DM's siamese augmentation: the official code reseeds before each
  draw and copies sample 0's parameters to the whole batch, so all real and
  synthetic images of a class see the identical transform.
  """
  xs = tuple(xs)
  if not xs or not _parse_strategy(strategy):
    return xs
  shapes = {tuple(x.shape[1:3]) for x in xs}
  if any(x.ndim != 4 for x in xs) or len(shapes) != 1:
    raise ValueError('augment_shared needs NHWC batches of one spatial size, got '
                     f'shapes {[tuple(x.shape) for x in xs]}.')
  one = sample_params(key, strategy, 1, xs[0].shape[1:], dsa)
  return tuple(apply_params(x, broadcast_params(one, x.shape[0])) for x in xs)


def cutmix(key: jax.Array, x: jax.Array, prob: float = 0.5, beta: float = 1.0,
           valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """CutMix (Yun et al., ICCV 2019) as IDC trains with it: with probability
  `prob` per batch, one box (area fraction ~ 1 - lam, lam ~ Beta(beta, beta),
  centre uniform, clipped at the borders) of every image is replaced by the
  same box of a partner image drawn by a random permutation of the batch.

  Returns (images, partner index [B], ratio): the loss is
  ratio * CE(y) + (1 - ratio) * CE(y[partner]), ratio = 1 - the clipped box's
  area fraction (1 when the batch is left alone). `valid` [B] marks padded
  entries of a short last batch: partners are drawn among valid entries only.
  """
  b, h, w, _ = x.shape
  k_apply, k_lam, k_perm, k_cy, k_cx = jax.random.split(key, 5)
  valid = jnp.ones((b,), jnp.float32) if valid is None else valid
  apply = jax.random.uniform(k_apply) < prob
  lam = jax.random.beta(k_lam, beta, beta)
  cut = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(h * cut).astype(jnp.int32)
  cut_w = jnp.floor(w * cut).astype(jnp.int32)
  cy = jax.random.randint(k_cy, (), 0, h)
  cx = jax.random.randint(k_cx, (), 0, w)
  y1, y2 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
  x1, x2 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
  # A random permutation of the valid entries, placed at the valid positions.
  u = jax.random.uniform(k_perm, (b,)) + 2.0 * (1.0 - valid)
  order = jnp.argsort(u)
  rank = jnp.clip(jnp.cumsum(valid).astype(jnp.int32) - 1, 0, b - 1)
  partner = jnp.where(valid > 0, order[rank], jnp.arange(b))
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  box = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2) & apply
  mixed = jnp.where(box[None, :, :, None], x[partner], x)
  area = ((y2 - y1) * (x2 - x1)).astype(jnp.float32) / (h * w)
  ratio = jnp.where(apply, 1.0 - area, 1.0)
  return mixed, partner, ratio
