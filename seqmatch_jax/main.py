"""Command line: `python -m seqmatch_jax.main --config=configs/x.py --workdir=DIR`.

Bad input (config, data, paths, checkpoints) ends with one line on stderr and
exit code 2; an interrupted run saves its state and exits 130, and rerunning the
same command resumes it.
"""

import logging as logging_std
import os
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from seqmatch_jax import parallel
from seqmatch_jax import pipeline
from seqmatch_jax.errors import Interrupted, UserError

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/digits.py or configs/cifar10.py:ipc=50.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for experts, checkpoints, results.')
flags.mark_flags_as_required(['config', 'workdir'])


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr)
  _exit(2)


def _exit(code: int) -> None:
  """Exits; in a multi-process run without the orderly jax.distributed
  shutdown, which would wait for peers that may be stuck in a collective
  (they notice the missing heartbeat and stop instead of hanging)."""
  if parallel.distributed_is_initialized() and code not in (0, 130):
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def _parse_flags(argv):
  """absl parsing, with flag and config-file errors as one line and exit 2."""
  try:
    return FLAGS(argv)
  except SystemExit:  # absl's --help exits 1; asking for help is not an error
    if any(a.lstrip('-') in ('help', 'helpshort', 'helpfull', '?') for a in argv[1:]):
      sys.exit(0)
    raise
  except flags.Error as e:
    _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  except Exception as e:  # errors raised while loading the config file
    _fail(f'cannot load the config: {type(e).__name__}: {str(e).splitlines()[0]}')


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of Orbax (several lines per checkpoint) from the log."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or 'orbax' not in record.pathname


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments {argv[1:]}; use --config.key=value overrides.')
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    config = FLAGS.config
    config.mode  # pylint: disable=pointless-statement  (loading errors surface here)
  except Exception as e:  # pylint: disable=broad-except
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(f'cannot load the config file: {lines[-1] if lines else type(e).__name__}')
  try:
    pipeline.run(config, FLAGS.workdir)
  except UserError as e:
    _fail(str(e))
  except Interrupted as e:
    print(f'interrupted ({e}); state saved: rerun the same command to resume.',
          file=sys.stderr)
    sys.exit(130)
  except (Exception, KeyboardInterrupt):  # pylint: disable=broad-except
    if parallel.is_multiprocess():  # see _exit: do not leave the peers hanging
      traceback.print_exc()
      print(f'process {jax.process_index()} failed; stopping.', file=sys.stderr)
      _exit(1)
    raise


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
