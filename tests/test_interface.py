"""The method interface: small, cycle-free, and enough for a new method in
one short file (a toy that defines only `loss` runs SeqMatch K=2 end to end)."""

import ast
import os
import sys
import textwrap

import numpy as np

from seqmatch_jax import backbones, config_lib, pipeline
from seqmatch_jax.backbones import base

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       'seqmatch_jax')


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, '.')
  return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def _imports(path: str, modules: set[str]) -> set[str]:
  """Every package module `path` imports, at module level or inside a
  function (a lazy import hides a cycle, it does not remove it)."""
  me = _module_name(path)
  package = me if path.endswith('__init__.py') else me.rpartition('.')[0]
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base_name = node.module or ''
      if node.level:  # relative import
        base_name = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1]
                             + ([node.module] if node.module else []))
      names = [base_name] + [f'{base_name}.{a.name}' for a in node.names]
    for name in names:
      parts = name.split('.')
      for i in range(2, len(parts) + 1):  # a module and the packages above it
        candidate = '.'.join(parts[:i])
        # A module's own packages are initialised before it runs: importing
        # from them adds no edge that could close a cycle.
        if candidate in modules and not (me + '.').startswith(candidate + '.'):
          out.add(candidate)
  return out


def test_no_module_imports_a_module_that_imports_it_back():
  paths = [os.path.join(d, f) for d, _, fs in os.walk(PACKAGE) for f in fs
           if f.endswith('.py')]
  modules = {_module_name(p) for p in paths}
  graph = {_module_name(p): _imports(p, modules) for p in paths}
  assert 'seqmatch_jax.backbones.base' in graph['seqmatch_jax.distill']

  def cycle_from(start):
    stack, seen = [(start, [start])], set()
    while stack:
      node, route = stack.pop()
      for nxt in sorted(graph[node]):
        if nxt == start:
          return route + [start]
        if nxt not in seen:
          seen.add(nxt)
          stack.append((nxt, route + [nxt]))
    return None
  cycles = [c for c in map(cycle_from, sorted(graph)) if c]
  assert not cycles, ' ; '.join(' -> '.join(c) for c in cycles[:3])


def test_the_interface_is_small():
  """What a method can define: BUILD_NOTES.md, "How to add a method"."""
  members = sorted(n for n, v in vars(base.Backbone).items()
                   if not n.startswith('_'))
  assert members == ['config_key', 'default_config', 'init', 'loss',
                     'name', 'needs_experts', 'parameterization', 'prepare',
                     'protocol', 'step', 'title', 'validate']


TOY = '''
"""Matches each class's mean synthetic image to the mean of a real batch."""
import jax.numpy as jnp
from seqmatch_jax import real_data
from seqmatch_jax.backbones import base


class MeanImages(base.Backbone):
  name = 'toy_mean'

  def loss(self, plan, syn, inner, key, data):
    real, mask, _ = real_data.class_batches(key, data, 16)
    weights = mask[..., None, None, None]
    real_mean = (real * weights).sum(1) / weights.sum(1)
    return jnp.sum(jnp.square(syn.by_class().mean(1) - real_mean))
'''


def test_a_toy_method_in_one_file_runs_seqmatch_k2(tmp_path, monkeypatch):
  (tmp_path / 'toy_method.py').write_text(textwrap.dedent(TOY))
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(backbones.REGISTRY, 'toy_mean', 'toy_method:MeanImages')
  config = config_lib.base_config()  # now with the toy's section
  config_lib.apply_settings(config, {
      'backbone.name': 'toy_mean', 'ipc': 2, 'seqmatch.num_subsets': 2,
      'toy_mean.iterations': 5, 'toy_mean.per_subset.lr_img': (1.0, 0.5),
      'model.width': 8, 'model.depth': 2, 'augment.strategy': 'flip',
      'dataset.val_size': 0, 'distill.checkpoint_every': 2, 'eval.epochs': 3,
      'eval.num_models': 1,
      'eval.baselines': (), 'parallel.num_devices': 1})
  results = pipeline.run(config, str(tmp_path / 'run'))
  assert 'SeqMatch-TOY_MEAN (K=2)' in results['rows']
  with np.load(tmp_path / 'run' / 'synthetic.npz') as f, \
       np.load(tmp_path / 'run' / 'subsets' / 'subset_1.npz') as first:
    assert f['subset'].tolist() == [0] * 10 + [1] * 10  # ipc 2 = 1 + 1
    np.testing.assert_array_equal(f['images_model'][:10], first['images_model'])
    np.testing.assert_allclose(f['lr'], [0.01, 0.01])  # the protocol's lr
  sys.modules.pop('toy_method', None)
