"""Writes that never leave a half-written file behind.

Every file the program later trusts (npz sets, JSON records) is written to a
temporary name in the same directory and renamed over the target: a kill
leaves either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np


def atomic_write(path: str, write: Callable[[str], None], suffix: str = '') -> None:
  """Calls `write(tmp_path)`, then renames tmp_path over `path`.

  `suffix` ends the temporary name (np.savez appends '.npz' to names without
  it). The temporary name carries the pid, so two processes never share one.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp{suffix}'
  try:
    write(tmp)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj: Any, **kwargs) -> None:
  def write(tmp):
    with open(tmp, 'w') as f:
      json.dump(obj, f, **kwargs)
  atomic_write(path, write)


def write_text(path: str, text: str) -> None:
  def write(tmp):
    with open(tmp, 'w') as f:
      f.write(text)
  atomic_write(path, write)


def write_npz(path: str, **arrays) -> None:
  atomic_write(path, lambda tmp: np.savez(tmp, **arrays), suffix='.npz')
