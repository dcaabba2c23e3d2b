"""XLA settings for the test suite (no JAX import: conftest sets XLA_FLAGS
from them before JAX starts)."""

import os
import subprocess
import sys

# The suite compiles hundreds of small programs and runs each briefly, so
# compiling is most of its time. These XLA:CPU settings make compiling
# cheaper: LLVM at optimisation level 0 without its expensive passes, and
# fusions emitted by XLA's elemental emitters instead of the MLIR fusion
# emitters. XLA's HLO passes, and so each program and its arithmetic, are
# unchanged; only the machine code and its float32 rounding order may differ,
# which the tests allow for (bitwise only within one process or machine,
# stored figures within an ulp bound: tests/test_backbones.py). Measured on
# tests/test_idc.py + test_datm.py: 117 -> 72 s of CPU; the whole suite
# 14.8 -> 9.0 min of CPU (BUILD_NOTES.md, "Suite time"). Used in-process
# (tests/conftest.py) and by the programs tests start as subprocesses.
FAST_COMPILE_XLA_FLAGS = ('--xla_backend_optimization_level=0 '
                          '--xla_llvm_disable_expensive_passes=true '
                          '--xla_cpu_use_fusion_emitters=false')
_LEVEL_ONLY = '--xla_backend_optimization_level=0'
_CHOSEN = 'SEQMATCH_TEST_FAST_COMPILE_FLAGS'


def fast_compile_flags() -> str:
  """FAST_COMPILE_XLA_FLAGS where this jaxlib knows them all, else fewer.

  XLA aborts a process whose XLA_FLAGS name a flag it does not know, and
  flags come and go between versions: a newer jaxlib must not stop the suite.
  Checked once per test session in a child process (about 2 s) and passed to
  workers and subprocesses through the environment.
  """
  chosen = os.environ.get(_CHOSEN)
  if chosen is None:
    chosen = ''
    for flags in (FAST_COMPILE_XLA_FLAGS, _LEVEL_ONLY):
      probe = subprocess.run(
          [sys.executable, '-c', 'import jax; jax.devices()'],
          env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu'),
          capture_output=True, check=False)
      if probe.returncode == 0:
        chosen = flags
        break
    os.environ[_CHOSEN] = chosen
  return chosen


def suite_flags(devices: int = 1, fast_compile: bool = True) -> str:
  """XLA_FLAGS for the suite and the programs it starts: `devices` forced
  host devices, and the fast-compile settings unless `fast_compile=False`."""
  flags = fast_compile_flags() if fast_compile else ''
  if devices > 1:
    flags += f' --xla_force_host_platform_device_count={devices}'
  return flags.strip()
