"""Tests for seqmatch_jax.augment (DSA) against hand-computed expectations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from seqmatch_jax import augment as aug

B, H, W, C = 6, 8, 8, 3


def _images(seed=0, shape=(B, H, W, C)):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape), jnp.float32)


# Jitted entry points: one compile per shape beats op-by-op eager dispatch.
_sample = jax.jit(aug.sample_params, static_argnums=(1, 2, 3, 4))
_apply = jax.jit(aug.apply_params)
_augment = jax.jit(aug.augment, static_argnames=('strategy', 'dsa'))


def _draw(strategy, seed=0, shape=(B, H, W, C), dsa=aug.DSAParams()):
  return _sample(jax.random.PRNGKey(seed), strategy, shape[0],
                 tuple(shape[1:]), dsa)


def _torch_affine_reference(x, theta, align_corners):
  """Naive numpy transcription of torch affine_grid + grid_sample (zeros)."""
  b, h, w, c = x.shape
  out = np.zeros_like(x)
  lin = lambda n: (np.linspace(-1, 1, n) if align_corners
                   else (2 * np.arange(n) + 1) / n - 1)
  unnorm = lambda v, n: ((v + 1) / 2 * (n - 1) if align_corners
                         else ((v + 1) * n - 1) / 2)
  for n in range(b):
    for i, yn in enumerate(lin(h)):
      for j, xn in enumerate(lin(w)):
        sx = theta[n, 0, 0] * xn + theta[n, 0, 1] * yn
        sy = theta[n, 1, 0] * xn + theta[n, 1, 1] * yn
        ix, iy = unnorm(sx, w), unnorm(sy, h)
        x0, y0 = int(np.floor(ix)), int(np.floor(iy))
        for yy, wy in ((y0, 1 - (iy - y0)), (y0 + 1, iy - y0)):
          for xx, wx in ((x0, 1 - (ix - x0)), (x0 + 1, ix - x0)):
            if 0 <= yy < h and 0 <= xx < w:
              out[n, i, j] += wy * wx * x[n, yy, xx]
  return out


# ----------------------------------------------------------------- strategy


def test_validate_strategy():
  aug.validate_strategy(aug.DEFAULT_STRATEGY)
  aug.validate_strategy('crop_noise')
  for identity in ('', 'none', 'None'):
    aug.validate_strategy(identity)
  for bad in ('colour', 'crop__flip', 'crop_none', 'flip_zoom'):
    with pytest.raises(ValueError, match='valid families'):
      aug.validate_strategy(bad)
  with pytest.raises(ValueError, match='rotate'):  # names the valid families
    aug.sample_params(jax.random.PRNGKey(0), 'crop_zoom', B, (H, W))
  with pytest.raises(ValueError):
    aug.augment(jax.random.PRNGKey(0), _images(), 'shear')


def test_identity_strategy():
  x = _images()
  for s in ('', 'none'):
    np.testing.assert_array_equal(aug.augment(jax.random.PRNGKey(0), x, s), x)


def test_family_choice_covers_strategy():
  fams = {int(_draw(aug.DEFAULT_STRATEGY, seed=s).family) for s in range(60)}
  names = {aug.FAMILIES[f] for f in fams}
  assert names == set(aug.DEFAULT_STRATEGY.split('_'))


# ----------------------------------------------------------------- families


def test_flip():
  x = _images()
  p = _draw('flip', seed=1)
  flips = np.asarray(p.flip)
  assert flips.any() and not flips.all()  # seed chosen to exercise both
  rate = np.asarray(_draw('flip', shape=(20000, H, W, C)).flip).mean()
  assert abs(rate - 0.5) < 0.02
  y = np.asarray(_apply(x, p))
  xn = np.asarray(x)
  for n in range(B):
    want = xn[n, :, ::-1] if flips[n] else xn[n]
    np.testing.assert_array_equal(y[n], want)


def test_crop_is_integer_shift_with_zero_fill():
  x = _images(shape=(B, 16, 16, C)) + 10.0  # no natural zeros
  p = _draw('crop', shape=(B, 16, 16, C))
  shift = np.asarray(p.shift)
  assert np.abs(shift).max() <= 2  # round(16 * 0.125)
  y = np.asarray(_apply(x, p))
  xn = np.asarray(x)
  for n in range(B):
    dy, dx = shift[n]
    want = np.zeros_like(xn[n])
    for i in range(16):
      for j in range(16):
        if 0 <= i + dy < 16 and 0 <= j + dx < 16:
          want[i, j] = xn[n, i + dy, j + dx]
    np.testing.assert_array_equal(y[n], want)
  # Handcrafted: shift down by 3 rows, left by 2 columns.
  p = p.replace(shift=jnp.tile(jnp.array([[-3, 2]], jnp.int32), (B, 1)))
  y = np.asarray(_apply(x, p))
  np.testing.assert_array_equal(y[:, 3:, :-2], xn[:, :-3, 2:])
  assert (y[:, :3] == 0).all() and (y[:, :, -2:] == 0).all()


def test_crop_shift_range_covers_reference():
  p = _draw('crop', shape=(4000, 32, 32, 1))
  assert set(np.unique(np.asarray(p.shift))) == set(range(-4, 5))


def test_cutout_square():
  side = 8  # round(16 * 0.5)
  x = jnp.ones((80, 16, 16, C))
  p = _draw('cutout', shape=x.shape)
  lo, hi = np.asarray(p.cutout_lo), np.asarray(p.cutout_hi)
  np.testing.assert_array_equal(hi - lo, side)
  centre = lo + side // 2
  assert centre.min() == 0 and centre.max() == 16  # reference: [0, 16]
  y = np.asarray(_apply(x, p))
  for n in range(x.shape[0]):
    want = np.ones((16, 16))
    r0, r1 = max(lo[n, 0], 0), min(hi[n, 0], 16)
    c0, c1 = max(lo[n, 1], 0), min(hi[n, 1], 16)
    want[r0:r1, c0:c1] = 0
    for ch in range(C):
      np.testing.assert_array_equal(y[n, :, :, ch], want)
    zero_rows = np.where((y[n, :, :, 0] == 0).any(1))[0]
    zero_cols = np.where((y[n, :, :, 0] == 0).any(0))[0]
    inside = lo[n].min() >= 0 and hi[n].max() <= 16
    if inside:
      assert len(zero_rows) == len(zero_cols) == side
    assert 0 < len(zero_rows) <= side and 0 < len(zero_cols) <= side


def test_color_formulas():
  x = _images()
  p = _draw('color')
  b = np.asarray(p.brightness)[:, None, None, None]
  s = np.asarray(p.saturation)[:, None, None, None]
  c = np.asarray(p.contrast)[:, None, None, None]
  assert (np.abs(b) <= 0.5).all() and (s >= 0).all() and (s <= 2).all()
  assert (c >= 0.5).all() and (c <= 1.5).all()
  want = np.asarray(x, np.float64) + b
  m = want.mean(axis=3, keepdims=True)
  want = (want - m) * s + m
  m = want.mean(axis=(1, 2, 3), keepdims=True)
  want = (want - m) * c + m
  np.testing.assert_allclose(_apply(x, p), want, rtol=1e-5,
                             atol=1e-5)


def test_noise_family():
  x = _images()
  y = _augment(jax.random.PRNGKey(0), x, 'noise')
  d = np.asarray(y - x)
  assert abs(d.std() - 0.05) < 0.01 and abs(d.mean()) < 0.01


@pytest.mark.parametrize('align_corners', [True, False])
def test_scale_one_and_rotate_zero_are_exact_identity(align_corners):
  x = _images(shape=(B, 7, 9, C))
  dsa = aug.DSAParams(align_corners=align_corners)
  p = _draw('scale', shape=x.shape, dsa=dsa).replace(scale=jnp.ones((B, 2)))
  np.testing.assert_array_equal(_apply(x, p), x)
  p = _draw('rotate', shape=x.shape, dsa=dsa).replace(angle=jnp.zeros((B,)))
  np.testing.assert_array_equal(_apply(x, p), x)


@pytest.mark.parametrize('align_corners', [True, False])
def test_rotate_90_is_rot90(align_corners):
  x = _images(shape=(2, 5, 5, C))
  dsa = aug.DSAParams(align_corners=align_corners)
  p = _draw('rotate', shape=x.shape, dsa=dsa)
  p = p.replace(angle=jnp.full((2,), np.pi / 2, jnp.float32))
  want = np.rot90(np.asarray(x), k=1, axes=(1, 2))  # anticlockwise
  np.testing.assert_allclose(_apply(x, p), want, atol=1e-5)
  p = p.replace(angle=jnp.full((2,), -np.pi / 2, jnp.float32))
  want = np.rot90(np.asarray(x), k=-1, axes=(1, 2))
  np.testing.assert_allclose(_apply(x, p), want, atol=1e-5)


@pytest.mark.parametrize('align_corners', [True, False])
def test_affine_matches_torch_grid_sample_formula(align_corners):
  x = _images(shape=(4, 6, 7, 2))
  dsa = aug.DSAParams(align_corners=align_corners)
  p = _draw('scale', shape=x.shape, dsa=dsa)
  s = np.asarray(p.scale)
  theta = np.zeros((4, 2, 2))
  theta[:, 0, 0], theta[:, 1, 1] = s[:, 0], s[:, 1]
  np.testing.assert_allclose(
      _apply(x, p),
      _torch_affine_reference(np.asarray(x, np.float64), theta, align_corners),
      atol=1e-5)
  p = _draw('rotate', shape=x.shape, dsa=dsa)
  a = np.asarray(p.angle, np.float64)
  assert (np.abs(a) <= np.deg2rad(15)).all()
  theta = np.stack([np.stack([np.cos(a), -np.sin(a)], -1),
                    np.stack([np.sin(a), np.cos(a)], -1)], axis=1)
  np.testing.assert_allclose(
      _apply(x, p),
      _torch_affine_reference(np.asarray(x, np.float64), theta, align_corners),
      atol=1e-5)


def test_scale_range():
  p = _draw('scale', shape=(2000, 8, 8, 1))
  s = np.asarray(p.scale)
  assert s.min() >= 1 / 1.2 - 1e-6 and s.max() <= 1.2 + 1e-6
  assert s.min() < 0.85 and s.max() > 1.15
  assert not np.allclose(s[:, 0], s[:, 1])  # sx, sy independent


# ----------------------------------------------------------------- siamese


def test_siamese_identical_transforms():
  x1 = _images(1)
  x2 = _images(2)
  siamese = jax.jit(aug.augment_siamese, static_argnames=('strategy',))
  seen = set()
  for seed, strategy in [(s, aug.DEFAULT_STRATEGY) for s in range(5)] + [
      (0, 'noise')]:
    key = jax.random.PRNGKey(seed)
    y1, y2, y3 = siamese(key, (x1, x2, x1), strategy=strategy)
    p = _sample(key, strategy, B, (H, W, C), aug.DSAParams())
    seen.add(int(p.family))
    np.testing.assert_allclose(y1, _apply(x1, p), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y2, _apply(x2, p), rtol=1e-5, atol=1e-5)
    # Same input in two slots -> same output: the draw is shared.
    np.testing.assert_array_equal(y1, y3)
  assert len(seen) >= 4
  with pytest.raises(ValueError, match='equal batch size'):
    aug.augment_siamese(key, [x1, x2[:3]])


def test_draw_rows_gives_the_padded_batch_first_rows():
  """A short batch augmented with the padded batch's draws equals the first
  rows of the augmented padded batch (what `trim_short_batch` relies on)."""
  x = _images(3, (2 * B, H, W, C))
  first = jax.jit(aug.augment, static_argnames=('strategy', 'draw_rows'))
  for strategy in ('color', 'crop', 'cutout', 'flip', 'scale', 'rotate', 'noise',
                   aug.DEFAULT_STRATEGY):
    for seed in range(2):
      key = jax.random.PRNGKey(seed)
      want = _augment(key, x, strategy=strategy)[:B]
      got = first(key, x[:B], strategy=strategy, draw_rows=2 * B)
      if strategy == 'noise':  # the same draws; x + std * eps may fuse otherwise
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
      else:
        np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match='draw_rows=3 is smaller'):
    aug.augment(key, x[:B], draw_rows=3)


# ----------------------------------------------------------------- gradients


def test_grad_matches_finite_differences():
  x = _images(shape=(2, 6, 6, 2))
  p = _draw('scale_rotate', shape=x.shape, seed=1)
  f = jax.jit(aug.apply_params)
  grad = jax.jit(jax.grad(lambda x, p: jnp.sum(jnp.sin(f(x, p)))))
  for name in ('scale', 'rotate'):
    pf = p.replace(family=jnp.int32(aug.FAMILIES.index(name)))
    check_grads(lambda x: f(x, pf), (x,), order=1, modes=('fwd', 'rev'),
                eps=1e-2)
    g = np.asarray(grad(x, pf))
    assert np.isfinite(g).all() and np.abs(g).sum() > 0, name


def test_grad_all_families_finite():
  x = _images()
  r = _images(9)
  p = _draw('_'.join(aug.FAMILIES))
  # The family index is data, so one compiled gradient serves all families.
  grad = jax.jit(jax.grad(lambda x, p: jnp.sum(aug.apply_params(x, p) * r)))
  for i, name in enumerate(aug.FAMILIES):
    g = np.asarray(grad(x, p.replace(family=jnp.int32(i))))
    assert np.isfinite(g).all() and np.abs(g).sum() > 0, name


# ----------------------------------------------------------------- randomness


def test_determinism_and_key_dependence():
  x = _images()
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  for strategy in (aug.DEFAULT_STRATEGY, 'rotate'):
    np.testing.assert_array_equal(_augment(k1, x, strategy),
                                  _augment(k1, x, strategy))
    assert not np.array_equal(_augment(k1, x, strategy),
                              _augment(k2, x, strategy))
  outs = [_augment(jax.random.PRNGKey(s), x, aug.DEFAULT_STRATEGY)
          for s in range(6)]
  assert len({np.asarray(o).tobytes() for o in outs}) > 1
  # Eager and jitted agree on the draw.
  np.testing.assert_array_equal(aug.augment(k1, x, 'flip'),
                                _augment(k1, x, 'flip'))


def test_typed_keys():
  x = _images()
  y = aug.augment(jax.random.key(0), x)
  assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()


# ----------------------------------------------------------------- transforms


def test_jit_vmap_scan():
  x = _images()
  strategy = aug.DEFAULT_STRATEGY
  jitted = _augment
  keys = jax.random.split(jax.random.PRNGKey(0), 8)
  # One compile serves every draw; the 8 keys reach several families.
  expected = [jitted(k, x, strategy) for k in keys]
  families = {int(_sample(k, strategy, B, (H, W, C), aug.DSAParams()).family)
              for k in keys}
  assert len(families) >= 3

  xs = jnp.stack([x] * 8)
  batched = jax.jit(jax.vmap(lambda k, x: aug.augment(k, x, strategy)))(
      keys, xs)
  for i in range(8):
    np.testing.assert_allclose(batched[i], expected[i], atol=1e-5)

  # Parameters stacked as scan inputs, plus sampling inside a scanned body.
  params = jax.jit(jax.vmap(
      lambda k: aug.sample_params(k, strategy, B, (H, W, C))))(keys)

  def body(carry, p):
    y = _apply(x, p)
    return carry + jnp.sum(y), y

  _, ys = jax.jit(lambda p: jax.lax.scan(body, 0.0, p))(params)
  for i in range(8):
    np.testing.assert_allclose(ys[i], expected[i], atol=1e-5)

  def body2(x, k):
    return aug.augment(k, x, 'rotate') * 0.5 + x * 0.5, None

  loss = lambda x: jnp.sum(jax.lax.scan(body2, x, keys)[0] ** 2)
  g = jax.jit(jax.grad(loss))(x)
  assert np.isfinite(np.asarray(g)).all()
