"""Same-machine bitwise check of refactors: the sha256 of `synthetic.npz` from a
tiny digits run of every backbone, plain (K=1) and SeqMatch K=2.

  python -m benchmarks.backbone_hashes --record   # on the current code
  python -m benchmarks.backbone_hashes            # later: compare (exit 1 on a change)

XLA:CPU compiles for the processor it runs on, so the bytes are reproducible
only on the same machine with the same software (BUILD_NOTES.md,
"Reproducibility"): record before a change, compare after it, on one machine.
The record names the machine; a comparison on another one says so instead of
reporting every row as changed.

Each row records two digests: `file`, the bytes of synthetic.npz, and
`arrays`, every member except the embedded `config` JSON. A refactor that adds
config keys changes `file` but not `arrays`; `arrays` is what must not move.
Each run is in-process and uses in-run validation (so the best-iterate logic is
covered), staged experts or networks for K=2, and the official evaluation
settings cut to a few epochs.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time

RESULT = os.path.join(os.path.dirname(__file__), 'results', 'backbone_hashes.json')
BACKBONES = ('mtt', 'ftd', 'idc', 'dm', 'dc', 'dsa')

# Small enough for minutes on two cores, large enough to exercise every path:
# validation every 2 iterations, checkpoints, staged experts / networks.
TINY = {
    'model.width': 8, 'experts.num': 2, 'experts.epochs': 3,
    'experts.staged_epochs': 3, 'experts.batch_size': 64,
    'dataset.val_size': 50, 'distill.eval_every': 2, 'distill.eval_epochs': 3,
    'distill.eval_models': 1, 'distill.checkpoint_every': 2,
    'eval.epochs': 3, 'eval.num_models': 1, 'eval.baselines': (),
    'parallel.num_devices': 1, 'seqmatch.compare_backbone': False,
}
PER_BACKBONE = {
    'mtt': {'mtt.syn_steps': 4, 'mtt.expert_epochs': 1, 'mtt.max_start_epoch': 2,
            'mtt.iterations': 4},
    'ftd': {'ftd.syn_steps': 4, 'ftd.expert_epochs': 1, 'ftd.max_start_epoch': 2,
            'ftd.iterations': 4, 'ftd.ema_decay': 0.9,
            'experts.optimizer': 'gsam'},
    'idc': {'idc.iterations': 4, 'idc.inner_loop': 2, 'idc.n_data': 128,
            'idc.fix_iter': 2, 'idc.net_epochs': 2},
    'dm': {'dm.iterations': 4, 'dm.batch_real': 32},
    'dc': {'dc.iterations': 3, 'dc.outer_loop': 2, 'dc.inner_loop': 2,
           'dc.batch_real': 32},
    'dsa': {'dc.iterations': 3, 'dc.outer_loop': 2, 'dc.inner_loop': 2,
            'dc.batch_real': 32, 'augment.strategy': 'flip_scale'},
}


def run_config(name: str, k: int):
  """The tiny config of backbone `name` with K subsets (ipc 2)."""
  from seqmatch_jax import config_lib  # pylint: disable=g-import-not-at-top
  arg = f'ipc=2,k={k}' + (',backbone=idc' if name == 'idc' else '')
  c = config_lib.load_config(f'configs/digits.py:{arg}')
  c.backbone.name = name
  config_lib.apply_settings(c, TINY)
  config_lib.apply_settings(c, PER_BACKBONE[name])
  node = c[{'dsa': 'dc'}.get(name, name)]
  for key in node.per_subset:  # the scalars for every subset
    node.per_subset[key] = ()
  return c


def _digests(path: str) -> dict:
  import numpy as np  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    file_hash = hashlib.sha256(f.read()).hexdigest()
  arrays = hashlib.sha256()
  with np.load(path, allow_pickle=False) as f:
    for member in sorted(f.files):
      if member == 'config':
        continue
      buf = io.BytesIO()
      np.save(buf, f[member], allow_pickle=False)
      arrays.update(member.encode() + b'\0' + buf.getvalue())
  return dict(file=file_hash, arrays=arrays.hexdigest())


def machine() -> dict:
  """What decides the compiled code: the processor and the software."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  cpu = platform.processor()
  flags = ''
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name') and not cpu:
          cpu = line.split(':', 1)[1].strip()
        if line.startswith(('flags', 'Features')):
          flags = hashlib.sha256(line.split(':', 1)[1].strip().encode()).hexdigest()[:16]
          break
  except OSError:
    pass
  return dict(cpu=cpu, cpu_flags_sha=flags, machine=platform.machine(),
              jax=jax.__version__, numpy=np.__version__,
              xla_flags=os.environ.get('XLA_FLAGS', ''))


def compute(names, ks) -> dict:
  from seqmatch_jax import pipeline  # pylint: disable=g-import-not-at-top
  rows = {}
  # A fixed path: the config embedded in synthetic.npz names experts.dir.
  tmp = os.path.join(tempfile.gettempdir(), 'seqmatch_backbone_hashes')
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    for name in names:
      experts = os.path.join(tmp, f'experts_{name}')
      for k in ks:
        config = run_config(name, k)
        config.experts.dir = experts  # K=1 and K=2 share the real-data experts
        t0 = time.time()
        pipeline.run(config, os.path.join(tmp, f'{name}_k{k}'))
        row = _digests(os.path.join(tmp, f'{name}_k{k}', 'synthetic.npz'))
        row['seconds'] = round(time.time() - t0, 1)
        rows[f'{name} K={k}'] = row
        print(f'{name} K={k}: arrays {row["arrays"][:16]} file {row["file"][:16]} '
              f'({row["seconds"]} s)', flush=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--record', action='store_true',
                      help=f'write the digests to {RESULT}')
  parser.add_argument('--backbones', default=','.join(BACKBONES))
  parser.add_argument('--ks', default='1,2')
  parser.add_argument('--out', default=RESULT)
  args = parser.parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')
  names = [n for n in args.backbones.split(',') if n]
  ks = [int(k) for k in args.ks.split(',') if k]
  here = machine()
  rows = compute(names, ks)
  if args.record:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(dict(machine=here, rows=rows, command=' '.join(
          ['python -m benchmarks.backbone_hashes'] + sys.argv[1:])), f, indent=1)
    print(f'recorded {len(rows)} rows in {args.out}')
    return 0
  with open(args.out) as f:
    recorded = json.load(f)
  if {k: v for k, v in recorded['machine'].items() if k != 'numpy'} != \
      {k: v for k, v in here.items() if k != 'numpy'}:
    print(f'recorded on {recorded["machine"]}, running on {here}: bytes are '
          'only comparable on the same machine and software; record anew here '
          'before the change (--record) and compare after it.')
  changed = []
  for name, row in rows.items():
    old = recorded['rows'].get(name)
    if old is None:
      print(f'{name}: not recorded')
      continue
    for what in ('arrays', 'file'):
      if old[what] != row[what]:
        changed.append(f'{name} ({what})')
    same = 'same' if old['arrays'] == row['arrays'] else 'CHANGED'
    note = '' if old['file'] == row['file'] else ' (file differs: config keys?)'
    print(f'{name}: arrays {same}{note}')
  arrays_changed = [c for c in changed if c.endswith('(arrays)')]
  print('all arrays bitwise equal' if not arrays_changed else
        f'changed: {", ".join(arrays_changed)}')
  return 1 if arrays_changed else 0


if __name__ == '__main__':
  sys.exit(main())
