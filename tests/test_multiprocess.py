"""Two processes on localhost joined by `jax.distributed` (2 CPU devices
each), started with launch/local_processes.sh as a user would: a short
SeqMatch run is stopped during distillation, resumes, and ends with the same
synthetic set as one process driving 4 devices."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import helpers
from tests.test_main import CONFIG, ROOT, TINY

RUN = [*TINY, '--config.seqmatch.compare_backbone=False',
       '--config.eval.baselines=()', '--config.distill.checkpoint_every=1']
ENV = helpers.subprocess_env(DEVICES='2')


def _ignore_sigint():
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def _launch(workdir):
  # Its own process group, as a shell gives a foreground job: Ctrl-C is then
  # os.killpg(group, SIGINT). Started with SIGINT ignored, as every background
  # job of a non-interactive shell is (a suite run with `pytest &`, nohup, a
  # CI runner): the launcher must still turn Ctrl-C into a clean stop (bash
  # cannot trap a signal ignored at entry; it re-execs itself with SIGINT
  # restored).
  return subprocess.Popen(
      ['bash', 'launch/local_processes.sh', '2', CONFIG, workdir,
       *RUN], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL, start_new_session=True,
      preexec_fn=_ignore_sigint)


def _logs(workdir, tail: int = 2500) -> str:
  out = ''
  for i in range(2):
    with open(f'{workdir}.process{i}.log') as f:
      out += f'--- process {i}\n' + f.read()[-tail:]
  return out


@pytest.mark.starts_first
def test_two_processes_stop_resume_equal_one_process(tmp_path):
  wd = str(tmp_path / 'two')
  script = _launch(wd)
  first_ckpt = os.path.join(wd, 'distill', 'subset_1', '1')
  deadline = time.time() + 300
  while time.time() < deadline and not os.path.isdir(first_ckpt):
    assert script.poll() is None, _logs(wd)
    time.sleep(0.2)
  os.killpg(script.pid, signal.SIGINT)  # Ctrl-C: the script passes it on
  assert script.wait(timeout=300) == 130, _logs(wd)
  logs = _logs(wd)
  assert logs.count('state saved: rerun the same command') == 2, logs
  assert not os.path.exists(os.path.join(wd, 'synthetic.npz'))

  script = _launch(wd)
  assert script.wait(timeout=600) == 0, _logs(wd)
  logs = _logs(wd, tail=10**7)
  assert 'resuming at iteration' in logs or 'already distilled' in logs, logs[-5000:]
  # Each process trained its own share of the experts: one each.
  for name in ('experts', os.path.join('experts_staged', 'subset_2')):
    assert [d for d in sorted(os.listdir(os.path.join(wd, name)))
            if d.startswith('expert_')] == ['expert_0000', 'expert_0001']
  assert os.path.exists(os.path.join(wd, 'results.json'))

  one = str(tmp_path / 'one')
  r = subprocess.run([sys.executable, '-m', 'seqmatch_jax.main',
                      f'--config={CONFIG}', f'--workdir={one}', *RUN],
                     cwd=ROOT, capture_output=True, text=True, timeout=600,
                     env=helpers.subprocess_env(4))
  assert r.returncode == 0, r.stderr[-3000:]
  with np.load(os.path.join(wd, 'synthetic.npz')) as a, \
       np.load(os.path.join(one, 'synthetic.npz')) as b:
    np.testing.assert_array_equal(a['labels'], b['labels'])
    np.testing.assert_allclose(a['images_model'], b['images_model'], rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(a['lr'], b['lr'], rtol=1e-4)


@pytest.mark.starts_first
def test_sigterm_while_jax_distributed_starts_is_a_clean_stop(tmp_path):
  """A SIGTERM right after jax.distributed connects (JAX's preemption service
  would install its own SIGTERM handler there and swallow it) stops the run
  at its first safe point with exit 130, instead of being lost."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  log = tmp_path / 'log'
  with open(log, 'w') as out:
    proc = subprocess.Popen(
        [sys.executable, '-m', 'seqmatch_jax.main', f'--config={CONFIG}',
         f'--workdir={tmp_path / "run"}', *RUN, '--config.mode=experts',
         f'--config.parallel.coordinator_address=localhost:{port}',
         '--config.parallel.num_processes=1', '--config.parallel.process_id=0'],
        cwd=ROOT, env=helpers.subprocess_env(), stdout=out, stderr=out)
    deadline = time.time() + 300
    while 'jax.distributed: process 0 of 1' not in log.read_text():
      assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
      time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 130, log.read_text()[-3000:]
  assert 'finishing the current step' in log.read_text()
