"""Small shared fixtures: tiny networks and digits in model space."""

from __future__ import annotations

import functools
import os

import jax.numpy as jnp
import numpy as np

from seqmatch_jax import data as data_lib
from seqmatch_jax.models import create_network
from tests import xla_flags


def subprocess_env(devices: int = 1, fast_compile: bool = True,
                   **extra: str) -> dict[str, str]:
  """The environment for a `python -m seqmatch_jax.main` a test starts: CPU,
  `devices` host devices, and the suite's compile settings
  (tests/xla_flags.py; `fast_compile=False` where running, not compiling, is
  most of the test: that code runs slower)."""
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=xla_flags.suite_flags(devices, fast_compile), **extra)


def config(name: str, arg: str | None = None):
  """`configs/<name>.py` with variant `arg` (e.g. 'ipc=2,k=2'), from any
  working directory."""
  from seqmatch_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_config(f'configs/{name}.py' + (f':{arg}' if arg else ''))


@functools.lru_cache(maxsize=None)
def digits_model_space(val_size: int = 0):
  ds = data_lib.load_dataset('digits')
  ds, (xv, yv) = data_lib.split_validation(ds, val_size, 0)
  pre = data_lib.fit_preprocessor(ds, zca=False)
  to = lambda x: jnp.asarray(pre.to_model(np.asarray(x, np.float32)))
  return (to(ds.x_train), jnp.asarray(ds.y_train), to(ds.x_test),
          jnp.asarray(ds.y_test), to(xv), jnp.asarray(yv))


def tiny_convnet(width: int = 8, depth: int = 2, image_shape=(8, 8, 1),
                 num_classes: int = 10, conv_impl: str = 'auto'):
  return create_network('convnet', num_classes, image_shape, width=width,
                        depth=depth, norm='instance', conv_impl=conv_impl)


def mtt_plan(network, augment: str = 'flip', index: int = 0, ipc: int = 2,
             **settings):
  """(MTT method, its SubsetPlan) from the reference defaults plus
  `settings` (e.g. syn_steps=2, lr_img=10.0, batch_syn=4)."""
  from seqmatch_jax import backbones, config_lib, seqmatch  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.augment.strategy = augment
  config.experts.staged_epochs = config.experts.epochs = 100  # any window
  plan = seqmatch.single_plan(config, index=index, ipc=ipc, **settings)
  return backbones.create(config, network), plan


def method_plan(name: str, network, *, index: int = 0, ipc: int = 2,
                ipc_before: int = 0, augment: str = '', config=None, **settings):
  """(method `name`, its SubsetPlan) on the base config (or `config`) plus
  `settings`."""
  from seqmatch_jax import backbones, config_lib, seqmatch  # pylint: disable=g-import-not-at-top
  config = config or config_lib.base_config()
  config.backbone.name = name
  config.augment.strategy = augment
  config.ipc = ipc + ipc_before
  plan = seqmatch.single_plan(config, index=index, ipc=ipc, ipc_before=ipc_before,
                              image_shape=tuple(network.image_shape), **settings)
  return backbones.create(config, network), plan


def step_setup(backbone, plan, images, labels, *, frozen=None, frozen_labels=None,
               key=None, source=None, trajectories: int = 1, mesh=None,
               donate=None):
  """(jitted step, state at iteration 0, frozen {'images', 'labels'}) of a
  method driven by hand: `step(state, frozen, resources, data)`."""
  from seqmatch_jax import distill  # pylint: disable=g-import-not-at-top
  from seqmatch_jax.backbones import Layout  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  frozen = images[:0] if frozen is None else frozen
  frozen_labels = labels[:0] if frozen_labels is None else frozen_labels
  trainable, optimizers = backbone.init(plan, source, images, labels)
  classes = np.concatenate([np.asarray(frozen_labels), np.asarray(labels)])
  layout = Layout(classes.astype(np.int32),
                  np.repeat([0, plan.index], [len(frozen_labels), len(labels)]),
                  backbone.network.num_classes)
  step = distill.make_distill_step(backbone, plan, optimizers, layout,
                                   trajectories=trajectories, mesh=mesh,
                                   donate=donate)
  state = distill.init_state(trainable, optimizers,
                             jax.random.key(0) if key is None else key)
  return step, state, dict(images=jnp.asarray(frozen),
                           labels=jnp.asarray(frozen_labels))


def synset(images, labels, plan, num_classes: int, extras=None):
  """A SynSet of stored `images` (class layout from integer `labels`)."""
  from seqmatch_jax.backbones import Layout, SynSet  # pylint: disable=g-import-not-at-top
  # Soft (possibly traced) labels: the layout's classes are not used then.
  classes = (np.zeros(labels.shape[0], np.int32) if np.ndim(labels) == 2
             else np.asarray(labels))
  layout = Layout(classes.astype(np.int32), np.zeros(len(classes), np.int32),
                  num_classes)
  return SynSet(jnp.asarray(images), jnp.asarray(labels), extras or {}, layout,
                plan.run.param)


def run_cli(capsys, *args: str) -> tuple[int, str]:
  """The command line in this process: (exit status, what it printed on
  stderr). Far cheaper than a subprocess (no second JAX start-up and
  compilation); the wiring of the real `python -m` entry point is proven by a
  few subprocess tests."""
  from seqmatch_jax import main  # pylint: disable=g-import-not-at-top
  capsys.readouterr()  # drop what earlier output left
  code = main.run_command_line(['seqmatch_jax.main', *args])
  return code, capsys.readouterr().err


def assert_one_error_line(code: int, stderr: str, phrase: str) -> None:
  """Exit 2; one `error:` line, the last non-empty one, containing `phrase`;
  no traceback."""
  tail = stderr[-3000:]
  assert code == 2, tail
  assert 'Traceback' not in stderr, tail
  lines = [l for l in stderr.splitlines() if l.strip()]
  assert sum('error:' in l for l in lines) == 1, tail
  assert lines[-1].startswith('error: '), tail
  assert phrase in lines[-1], tail
