"""Pixel space [0, 1] <-> model space: per-channel normalisation or ZCA.

Follows MTT: without ZCA the model sees `(x - mean) / std`; with ZCA there is
no mean/std step, the model sees kornia-style ZCA-whitened pixels fitted on the
whole training set with eps = 0.1, and the exact inverse is kept so that
distilled images can be shown (and saved) in pixel space.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import pathlib
import re
from typing import TypeVar

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from seqmatch_jax import files
from seqmatch_jax.data.datasets import Dataset
from seqmatch_jax.errors import DataError

MAX_ZCA_DIM = 16384  # 64x64x3 fits; 128x128x3 (49,152) would need 19 GB.
_CHUNK = 2048
ArrayT = TypeVar('ArrayT', np.ndarray, jax.Array)


@dataclasses.dataclass(frozen=True, eq=False)
class Preprocessor:
  """Maps images between pixel space [0, 1] and the space the model sees.

  Works on numpy arrays (returns numpy) and jax arrays/tracers (returns jax,
  jit-able), for any leading batch shape `(..., H, W, C)`. When the ZCA
  matrices are set, `mean`/`std` are informational only and unused.
  `eq=False`: arrays have no boolean `==`.
  """

  mean: np.ndarray
  std: np.ndarray
  zca_mean: np.ndarray | None = None
  zca_whiten: np.ndarray | None = None
  zca_unwhiten: np.ndarray | None = None

  @property
  def use_zca(self) -> bool:
    return self.zca_whiten is not None

  @functools.cached_property
  def _jax_constants(self) -> dict[str, jax.Array]:
    """Device copies, made once rather than per call.

    Created eagerly even when first needed inside a jit trace, so the cached
    arrays are concrete constants and never leaked tracers.
    """
    names = ('mean', 'std', 'zca_mean', 'zca_whiten', 'zca_unwhiten')
    with jax.ensure_compile_time_eval():
      return {n: jnp.asarray(getattr(self, n), jnp.float32) for n in names
              if getattr(self, n) is not None}

  def _zca_apply(self, x: ArrayT, matrix_name: str, forward: bool) -> ArrayT:
    d = self.zca_whiten.shape[0]
    if x.ndim < 3 or math.prod(x.shape[-3:]) != d:
      raise ValueError(f'ZCA was fitted on images with H*W*C={d}, got an '
                       f'array of shape {x.shape}')
    flat_shape = x.shape[:-3] + (d,)
    if isinstance(x, np.ndarray):
      dtype = x.dtype
      matrix = getattr(self, matrix_name).astype(dtype, copy=False)
      mu = self.zca_mean.astype(dtype, copy=False)
      flat = x.reshape(flat_shape)
      out = (flat - mu) @ matrix if forward else flat @ matrix + mu
      return out.reshape(x.shape)
    consts = self._jax_constants
    matrix = consts[matrix_name].astype(x.dtype)
    mu = consts['zca_mean'].astype(x.dtype)
    flat = x.reshape(flat_shape)
    # HIGHEST: GPUs otherwise use TF32, losing ~3 digits in a 3072-dim product.
    if forward:
      out = jnp.matmul(flat - mu, matrix, precision=jax.lax.Precision.HIGHEST)
    else:
      out = jnp.matmul(flat, matrix, precision=jax.lax.Precision.HIGHEST) + mu
    return out.reshape(x.shape)

  def to_model(self, x: ArrayT) -> ArrayT:
    """Pixel space [0, 1] -> model input space."""
    x = _as_float(x)
    if self.use_zca:
      return self._zca_apply(x, 'zca_whiten', forward=True)
    if isinstance(x, np.ndarray):
      return (x - self.mean.astype(x.dtype)) / self.std.astype(x.dtype)
    c = self._jax_constants
    return (x - c['mean'].astype(x.dtype)) / c['std'].astype(x.dtype)

  def to_pixels(self, x: ArrayT) -> ArrayT:
    """Model input space -> pixel space: the exact inverse of `to_model`."""
    x = _as_float(x)
    if self.use_zca:
      return self._zca_apply(x, 'zca_unwhiten', forward=False)
    if isinstance(x, np.ndarray):
      return x * self.std.astype(x.dtype) + self.mean.astype(x.dtype)
    c = self._jax_constants
    return x * c['std'].astype(x.dtype) + c['mean'].astype(x.dtype)


def _as_float(x):
  """numpy stays numpy, everything else becomes jax; integers -> float32."""
  if isinstance(x, np.ndarray):
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)
  x = jnp.asarray(x)
  return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def _pixel_mean(x: np.ndarray) -> np.ndarray:
  total = np.zeros(x.shape[1], np.float64)
  for i in range(0, len(x), _CHUNK):
    total += x[i:i + _CHUNK].sum(0, dtype=np.float64)
  return total / len(x)


def _cache_key(ds: Dataset, eps: float, mu: np.ndarray) -> str:
  """Hash of a few training statistics: changes whenever the data changes."""
  x = ds.x_train.reshape(len(ds.x_train), -1)
  probe = x[:: max(1, len(x) // 16)][:16]
  h = hashlib.sha256()
  for part in (ds.name, str(ds.x_train.shape), repr(float(eps))):
    h.update(part.encode())
  h.update(np.round(mu, 7).tobytes())
  h.update(np.ascontiguousarray(probe, np.float32).tobytes())
  h.update(np.bincount(ds.y_train).astype(np.int64).tobytes())
  return h.hexdigest()[:16]


def _load_zca_cache(path: pathlib.Path, key: str,
                    d: int) -> tuple[np.ndarray, ...] | None:
  """Returns (mean, whiten, unwhiten) if the file is intact, else None."""
  if not path.is_file():
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      if str(f['key']) != key:
        return None
      mu, w, w_inv = f['zca_mean'], f['zca_whiten'], f['zca_unwhiten']
    ok = (mu.shape == (d,) and w.shape == (d, d) and w_inv.shape == (d, d)
          and all(np.all(np.isfinite(a)) for a in (mu, w, w_inv)))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('ZCA cache %s is unreadable (%s); refitting.', path, e)
    return None
  if not ok:
    logging.warning('ZCA cache %s is malformed; refitting.', path)
    return None
  return (mu.astype(np.float32), w.astype(np.float32),
          w_inv.astype(np.float32))


def _save_zca_cache(path: pathlib.Path, key: str, eps: float, mu: np.ndarray,
                    w: np.ndarray, w_inv: np.ndarray) -> None:
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_npz(str(path), key=np.asarray(key), eps=np.asarray(eps),
                             zca_mean=mu, zca_whiten=w, zca_unwhiten=w_inv)
  except OSError as e:
    logging.warning('Could not write ZCA cache %s: %s', path, e)


def _fit_zca(x: np.ndarray, mu: np.ndarray,
             eps: float) -> tuple[np.ndarray, np.ndarray]:
  """kornia ZCAWhitening: unbiased covariance, W = U diag((S+eps)^-1/2) U^T."""
  d = x.shape[1]
  cov = np.zeros((d, d), np.float64)
  for i in range(0, len(x), _CHUNK):
    centred = x[i:i + _CHUNK].astype(np.float64) - mu
    cov += centred.T @ centred
  cov /= len(x) - 1
  s, u = np.linalg.eigh(cov)
  s = np.maximum(s, 0.0)  # Round-off can make tiny eigenvalues negative.
  w = (u * (1.0 / np.sqrt(s + eps))) @ u.T
  w_inv = (u * np.sqrt(s + eps)) @ u.T
  return w, w_inv


def fit_preprocessor(ds: Dataset, zca: bool, cache_dir: str | None = None,
                     eps: float = 0.1) -> Preprocessor:
  """Builds the preprocessor for `ds`; ZCA is fitted on all of ds.x_train.

  The fit runs in float64 numpy. With `cache_dir` the matrices are stored as
  an npz keyed by dataset, shape, eps and a hash of training statistics, so a
  second run loads them; an unreadable or mismatched file is refitted.
  """
  if not zca:
    return Preprocessor(mean=ds.mean, std=ds.std)
  h, w, c = ds.image_shape
  d = h * w * c
  if d > MAX_ZCA_DIM:
    raise DataError(
        f'ZCA is not supported at {h}x{w}x{c} ({d} dims > {MAX_ZCA_DIM}: the '
        'covariance would not fit in memory); set --config.dataset.zca=False')
  if len(ds.x_train) < 2:
    raise DataError(f'ZCA needs at least 2 training images, {ds.name} has '
                    f'{len(ds.x_train)}; set --config.dataset.zca=False')
  x = ds.x_train.reshape(len(ds.x_train), d)
  mu = _pixel_mean(x)
  key = _cache_key(ds, eps, mu)
  path = None
  if cache_dir:
    safe = re.sub(r'[^A-Za-z0-9_.-]+', '_', ds.name)
    path = (pathlib.Path(cache_dir).expanduser() /
            f'zca_{safe}_{h}x{w}x{c}_eps{eps:g}_{key}.npz')
    cached = _load_zca_cache(path, key, d)
    if cached is not None:
      logging.info('Loaded ZCA matrices from %s', path)
      zca_mean, whiten, unwhiten = cached
      return Preprocessor(ds.mean, ds.std, zca_mean, whiten, unwhiten)
  logging.info('Fitting ZCA (eps=%g) on %d images of %d dims.', eps, len(x), d)
  whiten, unwhiten = _fit_zca(x, mu, eps)
  zca_mean = mu.astype(np.float32)
  whiten = whiten.astype(np.float32)
  unwhiten = unwhiten.astype(np.float32)
  if path is not None:
    _save_zca_cache(path, key, eps, zca_mean, whiten, unwhiten)
  return Preprocessor(ds.mean, ds.std, zca_mean, whiten, unwhiten)
