"""The command line: --help, one-line errors with exit code 2, and a tiny
end-to-end run of every mode on digits that resumes after a kill."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ipc 2 as a variant (picks the ipc-1 row), K=2.
CONFIG = 'configs/digits.py:ipc=2,k=2'
TINY = ['--config.model.width=8', '--config.model.depth=2',
        '--config.experts.num=2', '--config.experts.epochs=3',
        '--config.experts.staged_epochs=2', '--config.mtt.syn_steps=3',
        '--config.mtt.expert_epochs=1', '--config.mtt.max_start_epoch=2',
        '--config.mtt.per_subset.max_start_epoch=()', '--config.mtt.per_subset.iterations=(3,3)',
        '--config.mtt.iterations=4', '--config.distill.eval_every=3',
        '--config.distill.eval_epochs=3', '--config.eval.epochs=5',
        '--config.eval.num_models=2', '--config.eval.whole_epochs=1',
        '--config.augment.strategy=flip', '--config.dataset.val_size=50']


def _run(*args, timeout=600, cwd=ROOT, fast_compile=True):
  env = helpers.subprocess_env(fast_compile=fast_compile)
  return subprocess.run([sys.executable, '-m', 'seqmatch_jax.main', *args],
                        cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_help():
  r = _run('--help')
  assert r.returncode == 0 and '--workdir' in r.stdout + r.stderr


@pytest.mark.parametrize('args, match', [
    (['--config=configs/cifar10.py', '--config.dataset.data_dir=/nonexistent'],
     'nonexistent'),
    (['--config=configs/digits.py', '--config.ipc=0'], 'ipc'),
    (['--config=configs/digits.py', '--config.no_such_key=1'], 'no_such_key'),
    (['--config=configs/digits.py', '--config.dataset.name=imagenet9'], 'imagenet9'),
    (['--config=configs/digits.py', '--config.model.name=vit'], 'vit'),
    (['--config=configs/digits.py', '--config.mtt.lr_img=-1'], 'lr_img'),
    (['--config=configs/digits.py', '--config.seqmatch.num_subsets=11'], 'exceeds'),
    (['--config=configs/nope.py'], 'nope'),
    (['--config=configs/digits.py', '--config.parallel.coordinator_address=localhost:1',
      '--config.parallel.num_processes=2', '--config.parallel.process_id=2'],
     'process_id'),
    (['--config=configs/digits.py', '--config.parallel.distributed=maybe'],
     'distributed'),
    (['--config=configs/digits.py:ipc=x'], 'config'),
    (['--config=configs/digits.py', '--config.mode=evaluate',
      '--config.eval.synthetic=/nonexistent.npz'], 'nonexistent.npz'),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, args, match):
  # In this process (the program's entry point with this argv); the
  # subprocess cases of tests/test_bad_inputs.py prove `python -m` agrees.
  code, err = helpers.run_cli(capsys, *args, f'--workdir={tmp_path}')
  assert code == 2, err[-2000:]
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and match in lines[0], err[-2000:]
  assert 'Traceback' not in err


@pytest.mark.starts_first
def test_all_modes_end_to_end_with_resume(tmp_path):
  # From another directory, with a relative workdir, as users type it.
  wd = str(tmp_path / 'run')
  base = [f'--config={ROOT}/{CONFIG}', '--workdir=run', *TINY]
  # Interrupt during distillation, then rerun the same command.
  env = helpers.subprocess_env()
  proc = subprocess.Popen([sys.executable, '-m', 'seqmatch_jax.main', *base],
                          cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not os.path.isdir(os.path.join(wd, 'distill')):
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode in (0, 130), err[-3000:]
  r = _run(*base, cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  with np.load(os.path.join(wd, 'synthetic.npz')) as f:
    assert f['images'].shape == (20, 8, 8, 1) and f['lr'].shape == (2,)
    assert f['subset'].tolist() == [0] * 10 + [1] * 10
    assert 0.0 <= f['images'].min() and f['images'].max() <= 1.0
  assert os.path.exists(os.path.join(wd, 'mtt', 'synthetic.npz'))
  results = json.load(open(os.path.join(wd, 'results.json')))
  rows = results['rows']
  assert {'SeqMatch-MTT (K=2)', 'MTT', 'random real (ipc 2)',
          'whole training set'} <= set(rows)
  assert len(rows['SeqMatch-MTT (K=2)']['convnet']['stages']) == 2
  assert os.path.exists(os.path.join(wd, 'results.md'))
  assert json.load(open(os.path.join(wd, 'config.json')))['ipc'] == 2
  # mode=evaluate on the saved set (any npz of this format).
  r = _run(f'--config={CONFIG}', f'--workdir={tmp_path / "ev"}', *TINY,
           '--config.mode=evaluate', f'--config.eval.synthetic={wd}/synthetic.npz',
           '--config.eval.baselines=()')
  assert r.returncode == 0, r.stderr[-3000:]
  ev = json.load(open(tmp_path / 'ev' / 'results.json'))
  assert list(ev['rows']) == ['synthetic']


def _small_set(path) -> str:
  """Two real digits per class as a set file (pixels in [0, 1])."""
  from seqmatch_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  ds = data_lib.load_dataset('digits')
  idx = np.concatenate([np.flatnonzero(ds.y_train == c)[:2] for c in range(10)])
  np.savez(path, images=ds.x_train[idx], labels=ds.y_train[idx])
  return str(path)


def _evaluation_args(tmp_path, wd):
  # Three models one by one, each long enough to stop in (8000 epochs: ~5 s).
  return ['--config=configs/digits.py', f'--workdir={wd}', *TINY,
          '--config.mode=evaluate', '--config.eval.baselines=()',
          f'--config.eval.synthetic={_small_set(tmp_path / "set.npz")}',
          '--config.eval.num_models=3', '--config.eval.epochs=8000',
          '--config.eval.parallel=sequential']


def _start_and_wait_for_first_model(args, log):
  """Starts main.py with stderr to `log`; returns once model 1 of 3 is done."""
  env = helpers.subprocess_env(fast_compile=False)
  proc = subprocess.Popen([sys.executable, '-m', 'seqmatch_jax.main', *args],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=open(log, 'w'))
  deadline = time.time() + 300
  while time.time() < deadline and ' 1/3 ' not in open(log).read():
    assert proc.poll() is None, open(log).read()[-3000:]
    time.sleep(0.1)
  assert 'evaluating synthetic / convnet: 3 models' in open(log).read()
  return proc


def test_signal_after_the_stop_while_exiting_is_one_line_not_a_traceback():
  """A stop unwinds (state saved) and the process shuts down: a second signal
  then (e.g. inside JAX's atexit handler) exits 130 with its one line."""
  child = textwrap.dedent("""
      import os, signal, time
      from seqmatch_jax import pipeline
      stop = pipeline.StopFlag(exit_on_second=True)
      with stop.installed():
        os.kill(os.getpid(), signal.SIGINT)  # the first: finish, save, stop
        while not stop():
          time.sleep(0.01)
      os.kill(os.getpid(), signal.SIGINT)  # the second, after the run
      time.sleep(5)
      print('not stopped')
  """)
  r = subprocess.run([sys.executable, '-c', child], cwd=ROOT, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 130, (r.returncode, r.stderr[-2000:])
  assert 'second signal' in r.stderr and 'Traceback' not in r.stderr, r.stderr
  assert 'not stopped' not in r.stdout


@pytest.mark.starts_first
def test_sigint_during_final_evaluation_exits_130_and_resumes(tmp_path):
  wd = tmp_path / 'ev'
  args = _evaluation_args(tmp_path, wd)
  proc = _start_and_wait_for_first_model(args, tmp_path / 'first.log')
  proc.send_signal(signal.SIGINT)  # during the second model
  assert proc.wait(timeout=300) == 130, open(tmp_path / 'first.log').read()[-3000:]
  err = open(tmp_path / 'first.log').read()
  assert 'Traceback' not in err and 'state saved' in err, err[-3000:]
  assert not os.path.exists(wd / 'results.json')
  kept = json.load(open(wd / 'eval_progress.json'))['cells']['synthetic / convnet']
  assert 1 <= sum(a is not None for a in kept['accuracies']) < 3
  r = _run(*args, fast_compile=False)  # the first run's programs, cached
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'done earlier' in r.stderr, r.stderr[-3000:]
  per_model = json.load(open(wd / 'results.json'))['rows']['synthetic']['convnet'][
      'per_model']
  assert [round(100 * a[-1], 4) for a in kept['accuracies'] if a is not None] == \
      per_model[:len([a for a in kept['accuracies'] if a is not None])]


@pytest.mark.starts_first
def test_second_sigint_stops_at_once_without_traceback(tmp_path):
  log = tmp_path / 'log'
  proc = _start_and_wait_for_first_model(
      _evaluation_args(tmp_path, tmp_path / 'ev'), log)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.3)
  t0 = time.time()
  proc.send_signal(signal.SIGINT)  # inside the second model's compiled loop
  assert proc.wait(timeout=60) == 130, open(log).read()[-3000:]
  assert time.time() - t0 < 3.0  # does not wait for the model (~5 s) to finish
  err = open(log).read()
  assert 'second signal' in err and 'Traceback' not in err, err[-3000:]
  assert 'KeyboardInterrupt' not in err, err[-3000:]


def test_stop_flag_in_a_library_caller():
  """In-process (a notebook): the first signal sets the flag, a second raises
  KeyboardInterrupt in the main thread rather than exiting the kernel."""
  from seqmatch_jax import pipeline  # pylint: disable=g-import-not-at-top
  before = signal.getsignal(signal.SIGINT)
  stop = pipeline.StopFlag()
  with pytest.raises(KeyboardInterrupt):
    with stop.installed():
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)
      assert stop()
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)
  assert signal.getsignal(signal.SIGINT) is before
