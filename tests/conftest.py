"""Test setup: four forced CPU devices so multi-device code runs on CI's CPU,
one compilation cache for the whole session, and XLA:CPU's LLVM backend at
optimisation level 0.

The suite is compile-bound (tiny shapes, hundreds of programs): level 0 cuts
LLVM's share of each compile (the MTT step and run pins: 102 -> 77 s cold),
while XLA's own HLO passes, and so the program and its arithmetic, stay as
they are. Only the machine code's speed and float32 rounding order may
change, which tests already allow for (bitwise only within one process or
one machine; stored figures within an ulp bound, tests/test_backbones.py).
Subprocess runs that set their own XLA_FLAGS get the default level.
"""

import os
import shutil
import tempfile

# Must happen before JAX initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
                      "--xla_backend_optimization_level=0")
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


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _CACHE is not None:
    shutil.rmtree(_CACHE, ignore_errors=True)
