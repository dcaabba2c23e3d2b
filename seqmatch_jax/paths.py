"""Early checks of the directories a run writes to.

A workdir that is a file, or cannot be written, otherwise fails with an
OSError traceback only when the first file is written (config.json, or an
expert snapshot minutes into the run). These checks give one line that names
the path, the flag and the fix before anything is loaded.
"""

from __future__ import annotations

import os
import tempfile

from seqmatch_jax.errors import ConfigError


def _file_in_the_way(path: str) -> str | None:
  """`path` or its nearest existing ancestor when that is not a directory."""
  probe = path
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      return None
    probe = parent
  return None if os.path.isdir(probe) else probe


def check_not_file(path: str, flag: str) -> str:
  """Refuses a directory path that names an existing file; returns it absolute."""
  path = os.path.abspath(os.path.expanduser(path))
  blocker = _file_in_the_way(path)
  if blocker == path:
    raise ConfigError(f'{flag}={path} is an existing file, not a directory; '
                      'pass a directory path (or move the file away)')
  if blocker is not None:
    raise ConfigError(f'{flag}={path} cannot be a directory because {blocker} '
                      'is a file; pass a path under a directory')
  return path


def check_writable_dir(path: str, flag: str) -> str:
  """Creates `path` if needed and checks a file can be written in it.

  Args:
    path: the directory (relative paths are taken from the current one).
    flag: how the user set it, e.g. '--workdir' or '--config.experts.dir'.
  Returns:
    The absolute path.
  Raises:
    ConfigError: one line naming the path, the reason and the fix.
  """
  path = check_not_file(path, flag)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ConfigError(f'cannot create {flag}={path} ({e.strerror or e}); pass '
                      'a directory you can write to') from None
  try:
    with tempfile.NamedTemporaryFile(dir=path, prefix='.write_probe'):
      pass
  except OSError as e:
    raise ConfigError(f'{flag}={path} is not writable ({e.strerror or e}); fix '
                      'its permissions or pass another directory') from None
  return path
