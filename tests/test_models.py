"""Tests for seqmatch_jax.models: the custom convolution and the networks."""

import functools
import re

import chex
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from seqmatch_jax import models
from seqmatch_jax.models import conv as conv_lib

# --- conv2d: im2col vs xla ---------------------------------------------------

# (spatial, kernel, stride, padding, in, out channels, per-tap kernel
# gradient): the paddings the networks use (1; 3 on 28x28 first convs; 2/4 for
# AlexNet's 5x5), strided ResNet convs, string pads. The 1 -> 16 case is a
# first layer: its input gradient (16 -> 1 channels, padding -1 = a crop) takes
# the few-outputs path, in dx, the meta-gradient and the second-order terms.
# The per-tap case forces the wide-layer kernel gradient (one matmul per tap,
# normally from 32 input channels) onto a small strided convolution.
_CONV_CASES = [
    (6, 3, 1, 1, 2, 3, False),
    (5, 3, 1, 3, 1, 16, False),
    (7, 3, 2, 1, 2, 3, True),
    (7, 1, 2, 0, 2, 3, False),
    (6, 5, 1, 4, 2, 3, False),
    (7, 3, 2, 'SAME', 2, 3, False),
]


def _conv_quantities(x, kernel, stride, padding, impl):
  """Forward, first-order and meta-gradient-style second-order quantities."""

  def loss(k, x):
    y = models.conv2d(x, k, stride=stride, padding=padding, impl=impl)
    return jnp.sum(jnp.tanh(y) ** 2)

  def meta(x):
    # Two student steps, then a loss on the result: grad w.r.t. x flows through
    # the kernel gradients (the MTT pattern).
    k = kernel
    for _ in range(2):
      k = k - 0.1 * jax.grad(loss)(k, x)
    return loss(k, x)

  y = models.conv2d(x, kernel, stride=stride, padding=padding, impl=impl)
  gk, gx = jax.grad(loss, argnums=(0, 1))(kernel, x)
  hvp_k = jax.grad(lambda k: jnp.sum(jax.grad(loss, 1)(k, x) ** 2))(kernel)
  return y, gk, gx, jax.grad(meta)(x), hvp_k


@pytest.mark.parametrize('size,ksize,stride,padding,cin,cout,per_tap', _CONV_CASES)
def test_im2col_matches_xla_to_second_order(size, ksize, stride, padding, cin,
                                            cout, per_tap, monkeypatch):
  if per_tap:
    monkeypatch.setattr(conv_lib, '_PER_TAP_MIN_CHANNELS', 1)
  with jax.enable_x64(True):
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, size, size, cin), jnp.float64)
    kernel = 0.5 * jax.random.normal(kk, (ksize, ksize, cin, cout), jnp.float64)
    if ksize * ksize * cin <= cout:  # the input gradient: few-outputs path
      assert conv_lib._few_outputs(jnp.zeros((1, 4, 4, cout)),
                                   jnp.swapaxes(kernel, 2, 3), (1, 1), (1, 1))
    # Fresh function per case: no trace cached under another threshold.
    fn = jax.jit(lambda x, k, impl: _conv_quantities(x, k, stride, padding, impl),
                 static_argnums=2)
    want = fn(x, kernel, 'xla')
    got = fn(x, kernel, 'im2col')
    assert got[0].dtype == jnp.float64
    for name, w, g in zip(('y', 'dk', 'dx', 'meta', 'hvp'), want, got):
      # Other summation orders: ~1e-13 of the largest values (~30).
      np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10, err_msg=name)


# --- small maps as matmuls --------------------------------------------------

# (kernel, stride, padding) x maps 1x1, 2x2, 4x4 (those with an output), and
# one 8x8: forced onto the small-map path, every convolution of the forward,
# both gradients and their transposes is a matmul (checked below). Each
# kernel size with each stride and each padding kind at least once (the
# networks' 1x1 shortcuts, 3x3 and 5x5 at stride 1 and 2; valid, explicit
# and SAME padding; the suite's time is the compile of each case).
_SMALL_CASES = [(1, 2, 0), (1, 1, 'SAME'), (3, 1, 1), (3, 2, 1), (3, 1, 0),
                (3, 2, 'SAME'), (5, 1, 'SAME'), (5, 2, 1)]


def _small_quantities(x, kernel, stride, padding, impl):
  """Forward, both gradients, and the gradient of a function of both."""

  def loss(k, x):
    y = models.conv2d(x, k, stride=stride, padding=padding, impl=impl)
    return jnp.sum(jnp.tanh(y) ** 2)

  def grads_norm(k, x):
    dk, dx = jax.grad(loss, argnums=(0, 1))(k, x)
    return jnp.sum(dk**2) + jnp.sum(dx**3), (dk, dx)

  y = models.conv2d(x, kernel, stride=stride, padding=padding, impl=impl)
  # Second order through both gradients and their transposes (w.r.t. x: the
  # MTT pattern of differentiating the kernel gradient).
  (hk, hx), (dk, dx) = jax.grad(grads_norm, argnums=(0, 1),
                                has_aux=True)(kernel, x)
  return dict(y=y, dk=dk, dx=dx, hk=hk, hx=hx)


def _check_small_maps(monkeypatch, sizes, ksize, stride, padding, cin=2,
                      cout=3):
  """The small-map path vs XLA's convolution, float64, all `sizes` in one
  program (compiling dominates this test)."""
  # Every convolution (and every derivative of one) takes the matmul path.
  monkeypatch.setattr(conv_lib, 'SMALL_MAP_PIXELS_PER_TAP', 1e9)
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.key(ksize * 10 + stride), len(sizes) + 1)
    xs = [jax.random.normal(k, (2, n, n, cin), jnp.float64)
          for k, n in zip(keys[1:], sizes)]
    kernel = 0.5 * jax.random.normal(keys[0], (ksize, ksize, cin, cout),
                                     jnp.float64)
    fn = lambda x, k, impl: _small_quantities(x, k, stride, padding, impl)
    for x in xs:
      text = str(jax.make_jaxpr(lambda x, k: fn(x, k, 'im2col'))(x, kernel))
      assert 'conv_general_dilated' not in text, x.shape
    both = jax.jit(lambda xs, k: [(fn(x, k, 'xla'), fn(x, k, 'im2col'))
                                  for x in xs])
    for n, (want, got) in zip(sizes, both(xs, kernel)):
      for name in want:
        w, g = want[name], got[name]
        assert g.dtype == jnp.float64 and g.shape == w.shape, name
        scale = max(1.0, float(jnp.max(jnp.abs(w))))
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12 * scale,
                                   err_msg=f'{name} on {n}x{n}')


@pytest.mark.parametrize('ksize,stride,padding', _SMALL_CASES)
def test_small_map_matmuls_match_lax_to_second_order(ksize, stride, padding,
                                                     monkeypatch):
  sizes = [n for n in (1, 2, 4)
           if padding == 'SAME' or n + 2 * padding >= ksize]  # has an output
  if sizes:
    _check_small_maps(monkeypatch, sizes, ksize, stride, padding)


def test_small_map_matmuls_match_lax_on_8x8(monkeypatch):
  _check_small_maps(monkeypatch, [8], 3, 2, 1, cin=4, cout=5)


def test_small_map_routing_by_pixels_per_tap():
  """Default routing: maps with fewer pixels than taps never reach XLA's
  convolution (in any derivative), others keep their forward convolution;
  taps that only read padding are skipped."""

  def convs_and_dots(size, ksize, cin=8, cout=16):
    x = jnp.ones((2, size, size, cin))
    kernel = jnp.ones((ksize, ksize, cin, cout))

    def loss(k, x):
      return jnp.sum(models.conv2d(x, k, padding=ksize // 2,
                                   impl='im2col') ** 2)

    meta = lambda x: jnp.sum(jax.grad(loss)(kernel, x) ** 2)
    text = str(jax.make_jaxpr(jax.grad(meta))(x))
    return text.count('conv_general_dilated'), text

  assert convs_and_dots(2, 3)[0] == 0  # 4 pixels < 9 taps
  assert convs_and_dots(4, 5)[0] == 0  # 16 < 25
  assert convs_and_dots(4, 3)[0] > 0  # 16 >= 9: XLA's convolution
  # 1x1 map, 3x3 kernel, padding 1: only the centre tap reads the input, so
  # the forward is one (2, 8) x (8, 16) matmul, not (2, 72) x (72, 16), and
  # the kernel gradient one (8, 2) x (2, 16).
  num_convs, text = convs_and_dots(1, 3)
  assert num_convs == 0
  assert 'f32[2,16] = dot_general' in text
  assert 'f32[8,16] = dot_general' in text
  assert 'f32[72,16]' not in text and 'f32[2,72]' not in text


def test_small_map_network_matches_xla():
  """ResNet18 on 8x8 images (8x8 to 1x1 maps: strided convs, 1x1 shortcuts,
  small-map matmuls), float32: loss and parameter gradients."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  labels = jnp.array([0, 1])
  outs = {}
  for impl in ('xla', 'im2col'):
    net = models.create_network('resnet18', 3, (8, 8, 1), conv_impl=impl)
    params, state = net.init(jax.random.key(0))

    def loss(p, net=net, state=state):
      logits, _ = net.apply(p, state, x, train=True)
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

    outs[impl] = jax.jit(jax.value_and_grad(loss))(params)
  chex.assert_trees_all_close(outs['im2col'], outs['xla'], rtol=1e-3,
                              atol=1e-5)


def test_im2col_meta_gradient_has_no_kernel_gradient_convolution():
  """No slow XLA kernel-gradient conv may sneak in, even inside a scan."""
  x = jnp.ones((2, 5, 5, 3))
  kernel = jnp.ones((3, 3, 3, 4)) * 0.1

  def loss(k, x):
    return jnp.sum(models.conv2d(x, k, padding=1, impl='im2col') ** 2)

  def meta(x):
    def step(k, _):
      return k - 0.01 * jax.grad(loss)(k, x), None

    k, _ = lax.scan(jax.checkpoint(step), kernel, None, length=2)
    return jnp.sum(k**2)

  text = str(jax.make_jaxpr(jax.grad(meta))(x))
  conv_outputs = re.findall(r'(\w+\[[\d,]*\]) = conv_general_dilated', text)
  assert conv_outputs, 'expected convolutions in the jaxpr'
  assert 'f32[3,3,3,4]' not in conv_outputs, conv_outputs


def test_conv2d_vmaps_over_kernels():
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 2))
  kernels = jax.random.normal(jax.random.key(1), (3, 3, 3, 2, 4))

  def loss(k):
    return jnp.sum(models.conv2d(x, k, padding=1, impl='im2col') ** 2)

  got = jax.vmap(jax.grad(loss))(kernels)
  want = jnp.stack([jax.grad(loss)(k) for k in kernels])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_resolve_conv_impl():
  assert models.resolve_conv_impl('auto') == (
      'im2col' if jax.default_backend() == 'cpu' else 'xla')
  assert models.resolve_conv_impl('xla') == 'xla'
  assert models.resolve_conv_impl('im2col') == 'im2col'
  with pytest.raises(ValueError, match='conv impl'):
    models.resolve_conv_impl('cudnn')


def test_layers_use_pytorch_default_init():
  x = jnp.zeros((1, 4, 4, 8))
  params = conv_lib.Conv(16, 3, padding=1).init(jax.random.key(0), x)['params']
  bound = 1 / np.sqrt(8 * 9)
  for leaf in (params['kernel'], params['bias']):
    assert float(jnp.max(jnp.abs(leaf))) <= bound
  assert float(jnp.max(jnp.abs(params['kernel']))) > 0.9 * bound
  dense = conv_lib.Dense(5).init(jax.random.key(0), jnp.zeros((1, 50)))
  dense = dense['params']
  assert dense['kernel'].shape == (50, 5)
  assert float(jnp.max(jnp.abs(dense['kernel']))) <= 1 / np.sqrt(50)


# --- networks ----------------------------------------------------------------

_SHAPES = [(28, 28, 1), (32, 32, 3), (8, 8, 1)]


def _shapes_of(net, batch=2, train=False):
  params, state = jax.eval_shape(net.init, jax.random.key(0))
  x = jax.ShapeDtypeStruct((batch, *net.image_shape), jnp.float32)
  logits, new_state = jax.eval_shape(
      lambda p, s, x: net.apply(p, s, x, train=train), params, state, x)
  return params, state, logits, new_state


@pytest.mark.parametrize('name', models.MODEL_NAMES)
@pytest.mark.parametrize('image_shape', _SHAPES)
def test_output_shapes(name, image_shape):
  net = models.create_network(name, 7, image_shape)
  _, state, logits, _ = _shapes_of(net, train=True)
  assert logits.shape == (2, 7)
  assert state == {}


@pytest.mark.parametrize('norm', models.NORMS)
@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_every_norm_builds(name, norm):
  net = models.create_network(name, 4, (8, 8, 1), width=8, norm=norm)
  _, state, logits, new_state = _shapes_of(net, train=True)
  assert logits.shape == (2, 4)
  assert net.has_state == (norm == 'batch')
  assert set(state) == ({'batch_stats'} if norm == 'batch' else set())
  assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_convnet3_cifar_parameter_count():
  net = models.create_network('convnet', 10, (32, 32, 3))
  params, _ = jax.eval_shape(net.init, jax.random.key(0))
  assert sum(p.size for p in jax.tree.leaves(params)) == 320_010


def test_convnet_d4_on_64x64():
  net = models.create_network('convnet', 200, (64, 64, 3), depth=4)
  params, _, logits, _ = _shapes_of(net)
  assert params['classifier']['kernel'].shape == (128 * 4 * 4, 200)
  assert logits.shape == (2, 200)


def test_28x28_first_conv_sees_32x32():
  net = models.create_network('convnet', 10, (28, 28, 1))
  params, _ = jax.eval_shape(net.init, jax.random.key(0))
  assert params['classifier']['kernel'].shape == (128 * 4 * 4, 10)


def test_pooling_never_shrinks_below_one():
  net = models.create_network('convnet', 3, (8, 8, 1), width=4, depth=5)
  params, state = net.init(jax.random.key(0))
  logits, _ = jax.jit(functools.partial(net.apply, train=False))(
      params, state, jnp.ones((2, 8, 8, 1)))
  assert logits.shape == (2, 3)
  assert params['classifier']['kernel'].shape == (4, 3)


def test_init_is_deterministic_in_key():
  net = models.create_network('convnet', 3, (8, 8, 1), width=4)
  a, _ = net.init(jax.random.key(1))
  b, _ = net.init(jax.random.key(1))
  c, _ = net.init(jax.random.key(2))
  chex.assert_trees_all_equal(a, b)
  assert not np.allclose(a['conv0']['kernel'], c['conv0']['kernel'])
  assert isinstance(a, dict)


def test_batchnorm_state_moves_only_in_train_mode():
  net = models.create_network('convnet', 3, (8, 8, 1), width=4, norm='batch')
  params, state = net.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (6, 8, 8, 1)) + 2.0
  _, new_state = net.apply(params, state, x, train=True)
  old_mean = state['batch_stats']['norm0']['mean']
  new_mean = new_state['batch_stats']['norm0']['mean']
  # Torch momentum 0.1: running = 0.9 * running + 0.1 * batch mean.
  y = models.conv2d(x, params['conv0']['kernel'], padding=1, impl='xla')
  batch_mean = jnp.mean(y + params['conv0']['bias'], axis=(0, 1, 2))
  np.testing.assert_allclose(new_mean, 0.9 * old_mean + 0.1 * batch_mean,
                             rtol=1e-4, atol=1e-5)
  _, eval_state = net.apply(params, new_state, x, train=False)
  chex.assert_trees_all_equal(eval_state, new_state)


def test_both_conv_paths_give_same_network_outputs_and_gradients():
  x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
  labels = jnp.array([0, 1, 2])
  outs = {}
  for impl in ('xla', 'im2col'):
    net = models.create_network('convnet', 3, (8, 8, 1), width=8, depth=2,
                                conv_impl=impl)
    params, state = net.init(jax.random.key(0))

    def loss(p, x, net=net, state=state):
      logits, _ = net.apply(p, state, x, train=True)
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), labels])

    outs[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  chex.assert_trees_all_close(outs['im2col'], outs['xla'], rtol=2e-4,
                              atol=2e-5)


def test_network_is_jittable_vmappable_and_twice_differentiable():
  net = models.create_network('convnet', 3, (8, 8, 1), width=4)
  keys = jax.random.split(jax.random.key(0), 2)
  params, state = jax.jit(jax.vmap(net.init))(keys)
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  logits = jax.jit(jax.vmap(
      lambda p: net.apply(p, {}, x, train=False)[0]))(params)
  assert logits.shape == (2, 4, 3)
  assert state == {}

  one = jax.tree.map(lambda a: a[0], params)

  def ce(p, x):
    logits, _ = net.apply(p, {}, x, train=True)
    return -jnp.mean(jax.nn.log_softmax(logits)[:, 0])

  def meta(x):
    p = jax.tree.map(lambda a, g: a - 0.1 * g, one, jax.grad(ce)(one, x))
    return ce(p, x)

  g = jax.jit(jax.grad(meta))(x)
  assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.linalg.norm(g)) > 0


def test_create_network_rejects_bad_arguments():
  with pytest.raises(ValueError, match='Unknown model'):
    models.create_network('resnet50', 10, (32, 32, 3))
  with pytest.raises(ValueError, match='Unknown norm'):
    models.create_network('convnet', 10, (32, 32, 3), norm='group')
  with pytest.raises(ValueError, match='conv impl'):
    models.create_network('convnet', 10, (32, 32, 3), conv_impl='fast')
  with pytest.raises(ValueError, match='image_shape'):
    models.create_network('convnet', 10, (32, 32))
