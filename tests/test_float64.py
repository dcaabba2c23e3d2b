"""float64 is float64 everywhere: under jax_enable_x64 every computation
follows its input's dtype (the checks against the official code run in
float64), and float32 runs are unchanged."""

import jax
import jax.numpy as jnp
import numpy as np

from seqmatch_jax import augment, parameterization
from tests import helpers


def test_depth3_convnet_initialises_and_runs_in_float64():
  with jax.enable_x64(True):
    net = helpers.tiny_convnet(width=4, depth=3, image_shape=(16, 16, 3))
    params, state = net.init(jax.random.key(0))
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype('float32')}
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3), jnp.float64)
    logits, _ = net.apply(params, state, x, train=True)
    assert logits.dtype == jnp.float64
    grads = jax.grad(lambda p: jnp.sum(net.apply(p, state, x, train=True)[0]))(params)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype('float64')}


def _bilinear_1d(src: int, dst: int) -> np.ndarray:
  """torch's bilinear weights (align_corners=False), computed in float64."""
  m = np.zeros((dst, src))
  for i in range(dst):
    x = max((i + 0.5) * src / dst - 0.5, 0.0)
    i0 = min(int(np.floor(x)), src - 1)
    i1 = min(i0 + 1, src - 1)
    m[i, i0] += 1 - (x - i0)
    m[i, i1] += x - i0
  return m


def test_multiformation_decode_at_15_over_2_is_the_float64_formula():
  """15 pixels, factor 2: tiles of 8 (padded with 0.5) upsampled to 15, whose
  weights are not exact in float32."""
  with jax.enable_x64(True):
    x = jax.random.uniform(jax.random.key(0), (1, 15, 15, 1), jnp.float64)
    out = parameterization.decode_tiles(x, 2)
    assert out.dtype == jnp.float64
    padded = np.pad(np.asarray(x), ((0, 0), (0, 1), (0, 1), (0, 0)),
                    constant_values=0.5)
    m = _bilinear_1d(8, 15)
    tile = padded[0, 8:16, 0:8, 0]  # tile (1, 0), the third crop
    np.testing.assert_allclose(np.asarray(out)[2, ..., 0], m @ tile @ m.T,
                               rtol=1e-13, atol=1e-14)


def test_dsa_scale_and_rotate_grids_follow_the_images_dtype():
  """The affine grid of a float64 batch is float64: a rotation by a
  non-trivial angle matches the float64 formula of bilinear sampling."""
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (1, 9, 9, 1), jnp.float64)
    angle = 0.3
    theta = jnp.asarray([[[np.cos(angle), np.sin(-angle)],
                          [np.sin(angle), np.cos(angle)]]], jnp.float64)
    out = augment._affine(x, theta, align_corners=True)  # pylint: disable=protected-access
    assert out.dtype == jnp.float64
    # Direct float64 sampling of output pixel (2, 6).
    i, j, c = 2, 6, 4.0
    u, v = j - c, i - c
    sx = np.cos(angle) * u + np.sin(-angle) * v + c
    sy = np.sin(angle) * u + np.cos(angle) * v + c
    y0, x0 = int(np.floor(sy)), int(np.floor(sx))
    wy, wx = sy - y0, sx - x0
    img = np.asarray(x)[0, ..., 0]
    want = ((1 - wy) * (1 - wx) * img[y0, x0] + (1 - wy) * wx * img[y0, x0 + 1]
            + wy * (1 - wx) * img[y0 + 1, x0] + wy * wx * img[y0 + 1, x0 + 1])
    np.testing.assert_allclose(float(out[0, i, j, 0]), want, rtol=1e-13)
