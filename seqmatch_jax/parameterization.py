"""How stored synthetic images become training images, for any method.

A distillation method learns *stored* images; evaluation (and every loss)
trains on their *decoded* form. Two parameterisations:

* `Identity`: one stored image is one training image.
* `MultiFormation(factor)` (IDC, Kim et al., ICML 2022; official code
  snu-mllab/Efficient-Dataset-Condensation `condense.py` `decode_zoom`): each
  stored image holds factor x factor tiles, each upsampled (bilinear,
  align_corners=False) to a full training image of the same class, so a set
  of n stored images trains on n factor^2 images.

A parameterisation also says where stored images live: `space='model'` (the
normalised / ZCA space the network sees; every method but IDC) or
`space='pixels'` ([0, 1] pixels, normalised by the method itself: IDC, which
clamps them after every iteration). Selected by `param.name` / `param.factor`
in the config for any backbone ('auto': the backbone's own choice).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from seqmatch_jax.errors import ConfigError

NAMES = ('auto', 'identity', 'multiformation')
SPACES = ('model', 'pixels')


def upsample_matrix(src: int, dst: int) -> np.ndarray:
  """[dst, src] weights of torch's bilinear upsampling with
  align_corners=False (`nn.Upsample(mode='bilinear')`) along one axis, in
  float64 (cast to the images' dtype where they are applied)."""
  m = np.zeros((dst, src), np.float64)
  for i in range(dst):
    x = max((i + 0.5) * src / dst - 0.5, 0.0)
    i0 = min(int(math.floor(x)), src - 1)
    i1 = min(i0 + 1, src - 1)
    w1 = x - i0
    m[i, i0] += 1.0 - w1
    m[i, i1] += w1
  return m


def decode_tiles(images: jax.Array, factor: int, pad_value: float = 0.5) -> jax.Array:
  """IDC's `decode_zoom`: [n, H, W, C] stored images -> [n factor^2, H, W, C].

  Each image is padded with `pad_value` to a multiple of `factor`, cut into
  factor x factor tiles of side ceil(H / factor), row-major, and every tile is
  upsampled to H x W. The output is crop-major: tile (0, 0) of every image,
  then tile (0, 1) of every image, ...; labels repeat the same way.
  """
  if factor == 1:
    return images
  n, h, w, c = images.shape
  sh, sw = -(-h // factor), -(-w // factor)
  x = jnp.pad(images, ((0, 0), (0, sh * factor - h), (0, sw * factor - w), (0, 0)),
              constant_values=pad_value)
  x = x.reshape(n, factor, sh, factor, sw, c)
  x = jnp.transpose(x, (1, 3, 0, 2, 4, 5)).reshape(factor * factor * n, sh, sw, c)
  mh = jnp.asarray(upsample_matrix(sh, h), images.dtype)
  mw = jnp.asarray(upsample_matrix(sw, w), images.dtype)
  return jnp.einsum('hy,nyxc,wx->nhwc', mh, x, mw,
                    precision=jax.lax.Precision.HIGHEST)


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


def mix_init(images: np.ndarray, factor: int) -> np.ndarray:
  """IDC's 'mix' initialisation from [n factor^2, H, W, C] real images: tile
  k = (i, j) of stored image t is real image k n + t, downsampled (nearest)."""
  n = images.shape[0] // (factor * factor)
  h, w = images.shape[1:3]
  out = np.zeros((n,) + images.shape[1:], np.float32)
  k, top = 0, 0
  for th in tile_sizes(h, factor):
    left = 0
    for tw in tile_sizes(w, factor):
      out[:, top:top + th, left:left + tw] = nearest_resize(
          images[k * n:(k + 1) * n], th, tw)
      left += tw
      k += 1
    top += th
  return out


@dataclasses.dataclass(frozen=True)
class Parameterization:
  """Stored images -> training images. `factor` 1 is the identity."""
  name: str = 'identity'
  factor: int = 1
  space: str = 'model'  # where stored images live: 'model' | 'pixels'

  @property
  def images_per_stored(self) -> int:
    """Training images one stored image decodes to."""
    return self.factor * self.factor

  @property
  def pad_value(self) -> float:
    """What pads a side that `factor` does not divide: mid-grey in pixel
    space (IDC's 0.5), the data mean (0) in model space."""
    return 0.5 if self.space == 'pixels' else 0.0

  def real_images_needed(self, ipc: int) -> int:
    """Distinct real images per class the initial set takes."""
    return ipc * self.images_per_stored

  def init_from_real(self, real: np.ndarray) -> np.ndarray:
    """[n factor^2, ...] real images of one class -> n stored images."""
    return real if self.factor == 1 else mix_init(real, self.factor)

  def decode_images(self, stored: jax.Array) -> jax.Array:
    """[n, H, W, C] stored -> [n factor^2, H, W, C], crop-major (traceable)."""
    return decode_tiles(stored, self.factor, self.pad_value)

  def decode_labels(self, labels):
    """Labels of `decode_images`' output (integers [n] or soft [n, C])."""
    if self.factor == 1:
      return labels
    reps = (self.images_per_stored,) + (1,) * (np.ndim(labels) - 1)
    return (jnp.tile(labels, reps) if isinstance(labels, jax.Array)
            else np.tile(np.asarray(labels), reps))

  def decode_set(self, stored, labels, subset, to_model=None):
    """(training images in model space, labels, subset ids) of a whole stored
    set, subset by subset (each crop-major): what evaluation trains on.
    `to_model` maps pixel-space images to model space (space='pixels')."""
    labels = np.asarray(labels)
    subset = (np.zeros(len(labels), np.int32) if subset is None
              else np.asarray(subset))
    if self.factor == 1 and self.space == 'model':
      return np.asarray(stored), labels, subset
    xs, ys, ss = [], [], []
    for j in range(int(subset.max()) + 1 if len(subset) else 0):
      keep = subset == j
      x = np.asarray(self.decode_images(jnp.asarray(stored)[keep]))
      if self.space == 'pixels':
        x = np.asarray(to_model(x), np.float32)
      xs.append(x)
      ys.append(self.decode_labels(labels[keep]))
      ss.append(np.full(len(ys[-1]), j, np.int32))
    if not xs:
      return np.asarray(stored)[:0], labels[:0], subset[:0]
    y = np.concatenate(ys)
    return (np.concatenate(xs), y.astype(np.int32) if y.ndim == 1 else y,
            np.concatenate(ss))


def resolve(name: str, factor: int, default: 'Parameterization') -> Parameterization:
  """The run's parameterisation from `param.name` / `param.factor`: 'auto'
  takes the method's `default` (its factor and space); factor 0 means the
  default's factor (2 when the default is the identity). The space is always
  the method's."""
  if name not in NAMES:
    raise ConfigError(f'param.name must be one of {"|".join(NAMES)}, got {name!r}.')
  if isinstance(factor, bool) or not isinstance(factor, int) or factor < 0:
    raise ConfigError(f'param.factor must be an integer >= 0 (0: the method\'s '
                      f'default), got {factor!r}.')
  if name == 'auto':
    name = default.name
    factor = factor or default.factor
  if name == 'identity':
    if factor not in (0, 1):
      raise ConfigError(f'param.factor={factor} needs --config.param.name='
                        'multiformation (the identity has factor 1).')
    return Parameterization('identity', 1, default.space)
  factor = factor or (default.factor if default.factor > 1 else 2)
  return Parameterization('multiformation', factor, default.space)
