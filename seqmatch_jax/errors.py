"""User-facing errors: raised for bad input, printed as one line by main (exit 2)."""


class UserError(Exception):
  """A problem the user can fix (config, data, paths); message names the fix."""


class ConfigError(UserError):
  """Invalid configuration value or key."""


class DataError(UserError):
  """Dataset missing, unprepared or malformed."""


class CheckpointError(UserError):
  """Checkpoint missing, partial or corrupt."""
