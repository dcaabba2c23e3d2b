"""Errors the program reports instead of tracebacks.

`UserError` and its subclasses are bad input: main prints them as one line and
exits with 2. `Interrupted` is a requested stop (state saved, exit 130).
"""


class UserError(Exception):
  """A problem the user can fix (config, data, paths); message names the fix."""


class ConfigError(UserError):
  """Invalid configuration value or key."""


class DataError(UserError):
  """Dataset missing, unprepared or malformed."""


class CheckpointError(UserError):
  """Checkpoint missing, partial or corrupt."""


class Diverged(UserError):
  """The matching loss became NaN or inf."""


class Interrupted(Exception):
  """SIGTERM/SIGINT arrived; state was saved and the run can resume."""
