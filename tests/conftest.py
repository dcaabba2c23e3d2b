"""Test setup: four forced CPU devices so multi-device code runs on CI's CPU,
one compilation cache for the whole session, XLA:CPU settings that compile
faster (tests/xla_flags.py), and the slow tests scheduled first."""

import os
import shutil
import tempfile

from tests import xla_flags

# Must happen before JAX initialises its backend.
if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = xla_flags.suite_flags(devices=4)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Many tests (and the CLI runs they start as subprocesses, which inherit the
# environment) compile the same programs again: new closures, new processes.
# JAX's persistent cache keys on the program itself, so the second compile is
# a disk read. Compiled code is the same either way: results do not change.
_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="seqmatch_jax_test_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_collection_modifyitems(session, config, items):
  """Slow tests first (stable otherwise), so that no worker is left running
  one long test while the others are idle."""
  del session, config
  items.sort(key=lambda item: item.get_closest_marker('starts_first') is None)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _CACHE is not None:
    shutil.rmtree(_CACHE, ignore_errors=True)
