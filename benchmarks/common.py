"""Benchmark plumbing: run one measurement per subprocess (clean peak RSS),
collect JSON rows, write a Markdown table."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


def run_isolated(module: str, args: dict, timeout: float = 3600) -> dict:
  """Runs `python -m module --json '<args>'` and returns its JSON row plus the
  child's peak RSS (ru_maxrss of the finished child, in MiB)."""
  t0 = time.time()
  before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  proc = subprocess.run([sys.executable, '-m', module, '--json', json.dumps(args)],
                        capture_output=True, text=True, timeout=timeout,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  if proc.returncode != 0:
    row = dict(args, error=proc.stderr.strip().splitlines()[-1:] or ['failed'])
  else:
    row = json.loads(proc.stdout.strip().splitlines()[-1])
  # ru_maxrss of children is the max over all children so far: only trust it
  # when it grew, else report the child's own figure if it sent one.
  row.setdefault('peak_rss_mib', round(peak / 1024, 1) if peak > before else None)
  row['wall_s'] = round(time.time() - t0, 1)
  return row


def self_peak_rss_mib() -> float:
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def write_outputs(rows: list[dict], columns: list[str], out_prefix: str,
                  title: str, command: str, extra: dict | None = None,
                  footer: str = '') -> str:
  os.makedirs(os.path.dirname(out_prefix) or '.', exist_ok=True)
  with open(out_prefix + '.json', 'w') as f:
    json.dump(dict(command=command, rows=rows, **(extra or {})), f, indent=1)
  lines = [f'### {title}', '', f'`{command}`', '',
           '| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  for r in rows:
    lines.append('| ' + ' | '.join(str(r.get(c, '')) for c in columns) + ' |')
  table = '\n'.join(lines) + '\n' + (footer + '\n' if footer else '')
  with open(out_prefix + '.md', 'w') as f:
    f.write(table)
  return table
