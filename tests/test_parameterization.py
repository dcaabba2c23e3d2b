"""Parameterisations: identity and IDC's multi-formation (decode, mix init),
chosen by `param.*` for any method; the decoded layout of a whole set."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmatch_jax import config_lib, parameterization, seqmatch
from seqmatch_jax.errors import ConfigError
from seqmatch_jax.parameterization import Parameterization
from tests import helpers


def test_tile_constant_image_decodes_to_its_tiles_crop_major():
  x = np.zeros((2, 8, 8, 1), np.float32)
  for n in range(2):
    for k, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
      x[n, 4 * i:4 * i + 4, 4 * j:4 * j + 4] = 10 * n + k
  out = np.asarray(parameterization.decode_tiles(jnp.asarray(x), 2))
  assert out.shape == (8, 8, 8, 1)
  # crop-major: tile (0,0) of both images, then tile (0,1) of both, ...
  expected = [10 * n + k for k in range(4) for n in range(2)]
  np.testing.assert_allclose(out, np.asarray(expected, np.float32)[:, None, None, None]
                             * np.ones_like(out), atol=1e-5)
  mf = parameterization.Parameterization('multiformation', 2)
  assert mf.decode_labels(np.asarray([3, 7])).tolist() == [3, 7] * 4


def test_decode_is_torch_bilinear_upsampling_with_half_pixel_centres():
  """jax.image.resize('linear') upsamples with the same half-pixel rule and
  edge clamping as torch's nn.Upsample(mode='bilinear')."""
  x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 2))
  out = parameterization.decode_tiles(x, 2)
  tiles = [x[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4] for i in range(2) for j in range(2)]
  ref = jax.image.resize(jnp.concatenate(tiles), (12, 8, 8, 2), 'linear')
  np.testing.assert_allclose(out, ref, atol=1e-6)
  # A side not divisible by the factor is padded with 0.5 first (IDC).
  odd = parameterization.decode_tiles(jnp.zeros((1, 5, 5, 1)), 2)
  assert odd.shape == (4, 5, 5, 1)
  assert float(odd[3].max()) > 0  # the last tile holds padding


def test_mix_init_puts_real_image_k_n_plus_t_in_tile_k():
  n, f = 3, 2
  pixels = np.arange(n * f * f, dtype=np.float32)[:, None, None, None] * np.ones(
      (1, 8, 8, 1), np.float32)
  out = parameterization.mix_init(pixels, f)
  for t in range(n):
    for k, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
      assert np.all(out[t, 4 * i:4 * i + 4, 4 * j:4 * j + 4] == k * n + t)
  # Nearest downsampling keeps every other pixel, as F.interpolate.
  ramp = np.arange(8, dtype=np.float32)[None, :, None, None] * np.ones((4, 8, 8, 1))
  assert parameterization.mix_init(ramp, 2)[0, :4, 0, 0].tolist() == [0, 2, 4, 6]
  assert parameterization.tile_sizes(128, 3) == [43, 43, 42]



def test_choice_by_config_for_any_method():
  """'auto' is the method's own; either can be asked for by any method; the
  storage space stays the method's."""
  resolve = parameterization.resolve
  identity, idc = Parameterization(), Parameterization('multiformation', 2, 'pixels')
  assert resolve('auto', 0, identity) == identity
  assert resolve('auto', 0, idc) == idc
  assert resolve('auto', 3, idc) == Parameterization('multiformation', 3, 'pixels')
  assert resolve('multiformation', 0, identity) == Parameterization('multiformation', 2)
  assert resolve('identity', 0, idc) == Parameterization('identity', 1, 'pixels')
  with pytest.raises(ConfigError, match='param.name=multiformation'):
    resolve('identity', 2, identity)
  with pytest.raises(ConfigError, match='param.name'):
    resolve('tiles', 0, identity)
  c = helpers.config('digits')
  c.param.name = 'multiformation'
  run = seqmatch.run_info(c, (8, 8, 1))
  assert (run.param.factor, run.param.space) == (2, 'model')
  assert seqmatch.real_images_needed(c)[0] == 4 * c.ipc
  c.param.factor = 9
  with pytest.raises(ConfigError, match='param.factor=9 cuts 8-pixel images'):
    seqmatch.run_info(c, (8, 8, 1))


def test_decoded_set_is_subset_by_subset_crop_major_with_soft_labels():
  mf = Parameterization('multiformation', 2)
  stored = np.arange(6, dtype=np.float32)[:, None, None, None] * np.ones((6, 4, 4, 1))
  labels = np.asarray([0, 1, 0, 1, 1, 1])
  subset = np.asarray([0, 0, 1, 1, 1, 1])
  images, labs, subs = mf.decode_set(stored, labels, subset)
  assert images.shape == (24, 4, 4, 1) and subs.tolist() == [0] * 8 + [1] * 16
  # Subset 0 crop-major (each tile of images 0, 1), then subset 1's four.
  np.testing.assert_allclose(images[:8, 0, 0, 0], [0, 1] * 4, atol=1e-6)
  np.testing.assert_allclose(images[8:12, 0, 0, 0], [2, 3, 4, 5], atol=1e-6)
  assert labs.tolist() == [0, 1] * 4 + [0, 1, 1, 1] * 4
  soft = np.eye(2, dtype=np.float32)[labels] * 3
  assert mf.decode_labels(soft[:2]).shape == (8, 2)
  np.testing.assert_array_equal(mf.decode_labels(soft[:2]), np.tile(soft[:2], (4, 1)))
  # The identity in model space is the stored set itself.
  same = Parameterization().decode_set(stored, labels, subset)
  assert same[0] is stored or np.shares_memory(same[0], stored)


def test_multiformation_init_takes_factor_squared_distinct_real_images():
  x, y = helpers.digits_model_space()[:2]
  key = jax.random.key(0)
  one = seqmatch.initial_images(key, x, y, [1, 1], 10, 'real', Parameterization())
  four = seqmatch.initial_images(key, x, y, [1, 1], 10, 'real',
                                 Parameterization('multiformation', 2))
  assert one.shape == four.shape == (20, 8, 8, 1)
  # Tile (0, 0) of each stored image is a downsampled real image.
  assert not np.array_equal(one, four)
