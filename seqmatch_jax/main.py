"""Command line: `python -m seqmatch_jax.main --config=configs/x.py --workdir=DIR`.

Bad input (config, data, paths, checkpoints) ends with one line on stderr and
exit code 2; an interrupted run saves its state and exits 130, and rerunning the
same command resumes it.
"""

import difflib
import inspect
import logging as logging_std
import os
import re
import sys
import traceback
import warnings

from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import tqdm

from seqmatch_jax import config_lib
from seqmatch_jax import configuration
from seqmatch_jax import data as data_lib
from seqmatch_jax import parallel
from seqmatch_jax import paths
from seqmatch_jax import pipeline
from seqmatch_jax.errors import Interrupted, UserError
from seqmatch_jax.models.networks import check_image_size

_CONFIG_HELP = 'Config file, e.g. configs/digits.py or configs/cifar10.py:ipc=50.'
# absl's logging flags stay available beside ours (--verbosity, --log_dir, ...).
_LOGGING_FLAGS = ('logtostderr', 'alsologtostderr', 'log_dir', 'verbosity', 'v',
                  'logger_levels', 'stderrthreshold', 'showprefixforinfo')


def _flag_values() -> flags.FlagValues:
  """A fresh set of the program's flags: every call (every in-process run of
  the command line) parses its own, so no flag state outlives a run."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, _CONFIG_HELP,
                                  lock_config=True, flag_values=fv)
  flags.DEFINE_string('workdir', None,
                      'Directory for experts, checkpoints, results.', flag_values=fv)
  flags.mark_flags_as_required(['config', 'workdir'], flag_values=fv)
  for name in _LOGGING_FLAGS:
    if name in flags.FLAGS and name not in fv:  # 'v' is 'verbosity' too
      fv[name] = flags.FLAGS[name]
  return fv


def _fail(message: str) -> None:
  """Prints `error: message` as the last line of stderr, on a line of its own."""
  # An open progress bar leaves its line unfinished: close it (ending the line)
  # so the error is not glued to it.
  for bar in list(getattr(tqdm.tqdm, '_instances', ())):
    bar.leave = True
    bar.close()
  sys.stdout.flush()
  sys.stderr.flush()
  print(f'error: {message}', file=sys.stderr, flush=True)
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


def _root_cause(e: BaseException) -> BaseException:
  """The innermost exception: ml_collections wraps config-file errors."""
  while True:
    inner = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    if inner is None:
      return e
    e = inner


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Every key of `config` as 'section.key' (sections included)."""
  out = []
  for key, value in config.items():
    out.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out += _flat_keys(value, f'{prefix}{key}.')
  return out


def _unknown_override(argv) -> str | None:
  """'unknown config key a.b; ...' for the first --config.a.b naming no key.

  ml_collections only says AttributeError("'b'"); this reloads the config
  file (cheap, and only on this error path) to name the key and the closest
  existing ones.
  """
  try:
    config_arg = next(a.split('=', 1)[1] if '=' in a else argv[i + 1]
                      for i, a in enumerate(argv)
                      if a in ('--config', '-config') or
                      a.startswith(('--config=', '-config=')))
    config = _flag_values()['config'].parser.parse(config_arg)
  except Exception:  # pylint: disable=broad-except
    return None
  keys = _flat_keys(config)
  for arg in argv:
    m = re.match(r'-{1,2}(?:no)?config\.([^=]+)', arg)
    if not m or m.group(1) in keys:
      continue
    key = m.group(1)
    section, _, leaf = key.rpartition('.')
    if section in keys:  # a known section: its own keys are the candidates
      members = [k[len(section) + 1:] for k in keys
                 if k.startswith(section + '.') and
                 '.' not in k[len(section) + 1:]]
      close = difflib.get_close_matches(leaf, members, n=3, cutoff=0.6)
      hint = (f'did you mean {", ".join(f"{section}.{c}" for c in close)}?'
              if close else f'keys of {section}: {", ".join(members)}')
    else:
      close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
      hint = (f'did you mean {", ".join(close)}?' if close else
              'top-level keys: ' + ', '.join(k for k in keys if '.' not in k))
    return f'unknown config key {key}; {hint}'
  return None


def _load_error(argv, e: BaseException) -> str:
  """One line for an error raised while parsing the flags or the config."""
  unknown = _unknown_override(argv)
  if unknown is not None:
    return unknown
  first = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
  wrapped = 'Error whilst parsing config file' in str(e)
  if isinstance(e, flags.Error) and not wrapped:
    return first
  # A config file's own error: ml_collections puts the traceback in the
  # message and the reason last; the innermost exception is the reason.
  root = _root_cause(e)
  lines = [l.strip() for l in str(root).splitlines() if l.strip()]
  reason = lines[-1] if lines else ''
  if not isinstance(root, ValueError) or not reason:
    reason = f'{type(root).__name__}: {reason}'.rstrip(': ')
  if wrapped:  # 'flag --config=configs/x.py:ipc=ten: <reason>'
    return f'{first.split(": Error whilst parsing", 1)[0]}: {reason}'
  return f'cannot load the config: {reason}'


_OVERRIDE = re.compile(r'-{1,2}(?:no)?config\.([^=]+)(=.*)?$', re.DOTALL)


def last_overrides_win(argv: list[str]) -> tuple[list[str], list[str]]:
  """`argv` with only the last `--config.KEY` override of each key.

  absl lets the last value of a flag win, but ml_collections joins repeated
  overrides of a tuple key into one tuple (`--config.k='(1,)'
  --config.k='(2,)'` would run with (1, 2)). Every key behaves the same way
  here: the last value wins. Returns (argv, one note per repeated key).
  """
  spans = []  # (key, first index, number of items)
  i = 1
  while i < len(argv):
    m = _OVERRIDE.match(argv[i])
    takes_next = (m is not None and m.group(2) is None and i + 1 < len(argv)
                  and not argv[i + 1].startswith('-')
                  and not argv[i].lstrip('-').startswith('no'))
    if m:
      spans.append((m.group(1), i, 2 if takes_next else 1))
    i += 2 if takes_next else 1
  last = {key: start for key, start, _ in spans}
  drop, notes = set(), []
  for key, start, n in spans:
    if last[key] != start:
      drop.update(range(start, start + n))
  for key in sorted(k for k in last if sum(s[0] == k for s in spans) > 1):
    count = sum(s[0] == key for s in spans)
    notes.append(f'--config.{key} is given {count} times: the last value is '
                 'used (write a tuple once, e.g. --config.KEY=\'(1,2)\').')
  return [a for j, a in enumerate(argv) if j not in drop], notes


_HELP = ('help', 'helpshort', 'helpfull', '?', 'h')


def _parse_flags(argv: list[str]) -> tuple[flags.FlagValues, list[str]]:
  """(parsed flags, notes for the log); flag and config-file errors end the
  program with one line and exit 2, --help with the usage and exit 0."""
  argv, notes = last_overrides_win(list(argv))
  fv = _flag_values()
  if any(a.lstrip('-') in _HELP for a in argv[1:]):
    print(f'{__doc__}\nflags:\n{fv.get_help()}')
    sys.exit(0)
  saved = sys.argv
  sys.argv = argv  # ml_collections finds the --config.* overrides there
  try:
    rest = fv(argv)
  except Exception as e:  # pylint: disable=broad-except
    _fail(_load_error(argv, e))
  finally:
    sys.argv = saved
  if len(rest) > 1:
    _fail(f'unexpected arguments {rest[1:]}; use --config.key=value overrides.')
  flags.FLAGS.mark_as_parsed()  # absl logging reads its (shared) flags
  return fv, notes


def _drop_async_noise(unraisable) -> None:
  """`sys.unraisablehook` that drops what a failed Orbax restore leaves behind.

  TensorStore's reads still in flight when the restore fails end as dozens of
  'Exception ignored in: <coroutine ...>' and 'Event loop is closed' tracebacks
  (some after the error line). They carry nothing the error line lacks.
  """
  exc = unraisable.exc_value
  if (inspect.iscoroutine(unraisable.object) or isinstance(exc, GeneratorExit)
      or (isinstance(exc, RuntimeError) and 'Event loop is closed' in str(exc))):
    return
  sys.__unraisablehook__(unraisable)


def _preflight(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Cheap checks before any loading: writable directories, and images large
  enough for the network (else it would train at chance without a word)."""
  paths.check_writable_dir(workdir, '--workdir')
  if config.experts.dir:
    if config.mode in ('all', 'experts'):
      paths.check_writable_dir(config.experts.dir, '--config.experts.dir')
    else:  # only read: a shared, read-only expert set is fine
      paths.check_not_file(config.experts.dir, '--config.experts.dir')
  depth = config.model.depth
  if isinstance(depth, int) and not isinstance(depth, bool) and depth >= 1:
    shape = data_lib.peek_image_shape(config.dataset.name,
                                      config.dataset.data_dir or None)
    if shape is not None:
      check_image_size(config.model.name, shape, depth)


class _QuietLibraries(logging_std.Filter):
  """Drops INFO chatter of Orbax (several lines per checkpoint) from the log."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or 'orbax' not in record.pathname


def _quiet_logging() -> None:
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())
  logging.use_absl_handler()
  sys.unraisablehook = _drop_async_noise
  warnings.filterwarnings('ignore', message='coroutine .* was never awaited',
                          category=RuntimeWarning)


def main(argv: list[str]) -> None:
  """The command line: parses `argv` (argv[0] is the program), runs, and ends
  with SystemExit: 0 done, 2 bad input (one `error:` line), 130 stopped."""
  fv, argv_notes = _parse_flags(argv)
  _quiet_logging()
  try:
    config = fv.config
    config.mode  # pylint: disable=pointless-statement  (loading errors surface here)
  except Exception as e:  # pylint: disable=broad-except
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    _fail(f'cannot load the config file: {lines[-1] if lines else type(e).__name__}')
  try:
    notes = config_lib.reconcile_overrides(
        config, config_flags.get_override_values(fv['config']),
        fv['config'].config_filename)
    _preflight(config, fv.workdir)
    configuration.validate(config)  # a refused config prints its error alone
    for note in argv_notes + notes:
      logging.info('%s', note)
    pipeline.run(config, fv.workdir, exit_on_second_signal=True)
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
  sys.exit(0)


def run_command_line(argv: list[str]) -> int:
  """`main(argv)` in this process, returning its exit status (tests, notebooks)."""
  try:
    main(list(argv))
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  return 0


if __name__ == '__main__':
  main(sys.argv)
