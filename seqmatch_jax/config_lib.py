"""Shared defaults for every config file in configs/, and the `name=value`
variant-argument parser. It lives in the package so that config files work from
any working directory.

A config file's `get_config(arg)` starts from `base_config()`, sets the dataset's
reference hyperparameters, and applies variant arguments such as
`configs/cifar10.py:ipc=50`.
"""

from __future__ import annotations

import os

import ml_collections

from seqmatch_jax import backbones
from seqmatch_jax.errors import ConfigError


def base_config() -> ml_collections.ConfigDict:
  """Every key the program reads, with the reference defaults."""
  c = ml_collections.ConfigDict()
  c.mode = 'all'  # all | experts | distill | evaluate
  c.seed = 0
  c.ipc = 10

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'digits'
  c.dataset.data_dir = ''  # '' = not needed (digits) / not given
  c.dataset.zca = False
  c.dataset.val_size = 0  # images carved from train for selecting the best set
  c.dataset.cache_dir = ''  # '' = WORKDIR/cache

  c.model = ml_collections.ConfigDict()
  c.model.name = 'convnet'
  c.model.width = 128
  c.model.depth = 3
  c.model.norm = 'instance'
  c.model.conv_impl = 'auto'  # auto | xla | im2col

  c.augment = ml_collections.ConfigDict()
  c.augment.strategy = 'color_crop_cutout_flip_scale_rotate'  # '' = none

  c.experts = ml_collections.ConfigDict()
  c.experts.num = 100
  c.experts.epochs = 50
  c.experts.lr = 0.01
  c.experts.momentum = 0.0
  c.experts.batch_size = 256
  c.experts.dir = ''  # '' = WORKDIR/experts; set to share one expert set
  c.experts.per_batch = 0  # experts trained together (vmap); 0 = per backend
  c.experts.staged_epochs = 20  # real-data epochs of SeqMatch's staged experts
  # sgd | gsam. GSAM (FTD's flat experts; backbone.name=ftd needs it) costs
  # two forward/backward passes per step. rho: FTD's run_buffer.sh (0.01,
  # constant). alpha: FTD's Table 7 (0.3 for CIFAR-10 ipc 1/10, 1 elsewhere;
  # the official script passes none, so its argparse default 0.4 is used).
  c.experts.optimizer = 'sgd'
  c.experts.rho = 0.01
  c.experts.alpha = 0.3

  c.backbone = ml_collections.ConfigDict()
  c.backbone.name = 'mtt'  # mtt | ftd | dm | dc | dsa | idc (backbones.REGISTRY)
  # How stored images decode into training images (parameterization.py), for
  # any backbone: 'auto' = the backbone's own (IDC: multi-formation, factor
  # 2; the others: identity) | identity | multiformation. factor 0 = that
  # parameterisation's default.
  c.param = ml_collections.ConfigDict()
  c.param.name = 'auto'
  c.param.factor = 0
  # One sub-dict per backbone (c.mtt, c.ftd, c.dm, c.dc, c.idc; DSA reads c.dc), each with
  # its scalars and a `per_subset` dict of SeqMatch's per-subset tuples.
  for key, defaults in backbones.default_configs().items():
    c[key] = defaults

  c.distill = ml_collections.ConfigDict()  # the loop, whatever the backbone
  c.distill.pix_init = 'real'  # real | noise
  c.distill.eval_every = 500
  c.distill.eval_models = 1  # models per in-run evaluation (val split)
  c.distill.eval_epochs = 300  # epochs per in-run evaluation
  c.distill.checkpoint_every = 100
  c.distill.trajectories_per_step = 0  # resources per step; 0 = the method's:
  # one per device (MTT, FTD, DATM), 1 (DM, DC, DSA, IDC: their official loops)

  c.seqmatch = ml_collections.ConfigDict()
  c.seqmatch.num_subsets = 1  # K; 1 = the plain backbone
  c.seqmatch.subset_ipc = ()  # images per class of each subset; () = equal split
  c.seqmatch.compare_backbone = False  # also distil the plain backbone (K=1)

  c.eval = ml_collections.ConfigDict()
  c.eval.lr = 0.01  # protocol lr: baselines and backbones without a learned lr
  c.eval.num_models = 5
  c.eval.epochs = 1000
  c.eval.batch_size = 256
  c.eval.momentum = 0.9
  c.eval.weight_decay = 5e-4
  c.eval.architectures = ('convnet',)
  c.eval.baselines = ('random_real',)  # random_real | whole
  c.eval.whole_epochs = 30
  c.eval.synthetic = ''  # path of a saved set, for mode=evaluate
  c.eval.parallel = 'auto'  # auto | vmap | sequential
  # backbone: each method's own official evaluation (DM/DSA: DSA with
  # align_corners=False; DC: 300 epochs, no augmentation; IDC: its schedule and
  # CutMix; DATM: batch 128); common: the eval.* protocol (MTT's) for every
  # set, to compare sets of different methods under one evaluation.
  c.eval.protocol = 'backbone'
  # Train on only the real rows of a short batch (< batch_size images; every
  # ipc-10 evaluation): 2.5x less work than padding it to batch_size, same loss
  # and gradient up to float32 summation order; BatchNorm nets also get the
  # reference's batch statistics (issue 26). False = the padded computation
  # of runs made before issue 17.
  c.eval.trim_short_batch = True
  # Normalisation of the cross-architecture networks (every eval architecture
  # other than model.name): '' = model.norm, AlexNet without (the literature's
  # tables); instance | batch | layer | none sets it for all of them. On 8x8
  # images VGG11 and ResNet18 normalise 1x1 maps, where instance norm outputs a
  # constant (the run is refused): use batch, layer or none there.
  c.eval.cross_arch_norm = ''

  c.parallel = ml_collections.ConfigDict()
  c.parallel.distributed = 'auto'  # auto | yes | no: jax.distributed.initialize
  c.parallel.num_devices = 0  # 0 = every device
  # Explicit multi-process set-up (e.g. several processes on one machine);
  # empty = JAX's own detection (SLURM, TPU pods) when distributed is auto/yes.
  c.parallel.coordinator_address = ''  # host:port of process 0
  c.parallel.num_processes = 0
  c.parallel.process_id = -1
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `a=1,b=x` into a ConfigDict, typed after `defaults`.

  Strict, because `bool('no')` is True: bools take only true/false, 1/0 or
  yes/no, and a number that does not parse names its argument.

  Raises:
    ValueError: an unknown name, or a value not of its default's type; the
      message names the argument (main prints it as the one error line).
  """
  def convert(key: str, value: str, default):
    text = value.strip().lower()
    if isinstance(default, bool):
      if text in ('true', '1', 'yes', 'false', '0', 'no'):
        return text in ('true', '1', 'yes')
      raise ValueError(f'variant argument {key} must be true or false (or '
                       f'1/0, yes/no), got {value!r}')
    if isinstance(default, (int, float)):
      kind, what = (int, 'an integer') if isinstance(default, int) else (
          float, 'a number')
      try:
        return kind(value)
      except ValueError:
        raise ValueError(f'variant argument {key} must be {what}, got '
                         f'{value!r}') from None
    return type(default)(value)

  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(','):
    if not item:
      continue
    key, sep, value = item.partition('=')
    if not sep or key not in defaults:
      raise ValueError(
          f'Unknown config argument {item!r}; valid: '
          f'{", ".join(f"{k}=..." for k in sorted(defaults))} '
          '(e.g. configs/cifar10.py:ipc=50)')
    out[key] = convert(key, value, defaults[key])
  return out


def apply_settings(c: ml_collections.ConfigDict, settings: dict) -> None:
  """Sets dotted keys, e.g. {'mtt.syn_steps': 30, 'mtt.per_subset.syn_steps': (30, 80)}.

  Existing keys only: a misspelt key in a config table would otherwise become
  a new key that nothing reads, and the run would silently use the default.

  Raises:
    ValueError: an unknown key, naming the closest existing ones.
  """
  import difflib  # pylint: disable=g-import-not-at-top

  def dotted_keys(node, prefix=''):
    for k, v in node.items():
      if isinstance(v, ml_collections.ConfigDict):
        yield from dotted_keys(v, f'{prefix}{k}.')
      else:
        yield f'{prefix}{k}'

  for dotted, value in settings.items():
    *path, leaf = dotted.split('.')
    node = c
    for part in path:
      found = isinstance(node, ml_collections.ConfigDict) and part in node
      node = node[part] if found else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      close = difflib.get_close_matches(dotted, list(dotted_keys(c)), n=3)
      hint = (f'did you mean {", ".join(close)}?' if close else
              f'top-level keys are {", ".join(sorted(c.keys()))}.')
      raise ValueError(f'unknown config key {dotted!r} in the settings; {hint}')
    node[leaf] = value


def table_config(dataset: str, arg: str | None, tables: dict[int, dict],
                 base: dict | None = None,
                 backbone_tables: dict[str, dict[int, dict]] | None = None
                 ) -> ml_collections.ConfigDict:
  """A dataset config: `base` settings, then the row of `tables` for `ipc`.

  Variant arguments: `ipc=N` picks the row (an ipc without a row uses the
  nearest smaller one); `backbone=NAME` selects that backbone and applies its
  own row from `backbone_tables[NAME]` (e.g. IDC's settings, which differ from
  the MTT row's data preprocessing and subset count); `k=N` overrides the
  number of subsets (1 = the plain backbone, which also drops the per-subset
  lists), and a backbone row's `variants[N]` settings come with it (e.g.
  the official SeqMatch-IDC script's K=2 split at CIFAR-10 ipc 50).
  """
  args = parse_arg(arg, ipc=10, k=0, backbone='')
  c = base_config()
  c.dataset.name = dataset
  apply_settings(c, base or {})
  apply_settings(c, _row(tables, args.ipc))
  variants = {}
  if args.backbone:
    backbones.backbone_class(args.backbone)  # a clear error for an unknown one
    c.backbone.name = args.backbone
    rows = (backbone_tables or {}).get(args.backbone)
    if rows:
      row = dict(_row(rows, args.ipc))
      variants = row.pop('variants', {})
      apply_settings(c, row)
  c.ipc = args.ipc
  if args.k == 1:
    clear_subsets(c)
  elif args.k:
    c.seqmatch.num_subsets = args.k
  if args.k in variants:
    apply_settings(c, variants[args.k])
  return c


def _row(tables: dict[int, dict], ipc: int) -> dict:
  rows = sorted(tables)
  return tables[max([r for r in rows if r <= ipc] or rows[:1])]


def clear_subsets(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Makes `c` the plain backbone in place: one subset, every backbone's
  scalars (its per-subset tuples emptied)."""
  c.seqmatch.num_subsets = 1
  c.seqmatch.subset_ipc = ()
  for key in backbones.default_configs():
    for name in c[key].per_subset:
      c[key].per_subset[name] = ()
  return c


def ftd_row(n: int, m: int, t_plus: int, lr_img: float, lr_lr: float,
            lr_teacher: float, alpha: float, ema: float, batch_syn: int = 0,
            **per_subset) -> dict:
  """A row of FTD's Table 7 (N/M/T+/lr_img/lr_lr/lr_teacher/alpha/EMA,
  batch_syn) as `ftd.*` settings plus `experts.alpha`; the table's alpha is
  the paper's (the official run_buffer.sh passes none: 0.4). `per_subset`:
  SeqMatch-FTD's `ftd.per_subset.*` tuples (no published values: the dataset
  configs reuse SeqMatch-MTT's Table 4 windows)."""
  row = {'ftd.syn_steps': n, 'ftd.expert_epochs': m, 'ftd.max_start_epoch': t_plus,
         'ftd.lr_img': lr_img, 'ftd.lr_lr': lr_lr, 'ftd.lr_teacher': lr_teacher,
         'ftd.ema_decay': ema, 'ftd.batch_syn': batch_syn, 'experts.alpha': alpha}
  row.update({f'ftd.per_subset.{k}': tuple(v) for k, v in per_subset.items()})
  return row


# K per ipc by the SeqMatch paper's rule (ipc 1: the plain method; ipc 10: 2
# subsets; ipc 50: 3), for methods without a published SeqMatch table.
PAPER_SUBSETS = {1: 1, 10: 2, 50: 3}


def dc_dm_rows(name: str) -> dict[int, dict]:
  """CIFAR rows of DM, DC or DSA as their official scripts run them
  (DatasetCondensation `main.py`, `main_DM.py` and README): mean/std
  normalisation (no ZCA), DSA `color_crop_cutout_flip_scale_rotate`,
  real batches of 256 per class. DM: 20,000 iterations, lr_img 1, real init.
  DC: 1000 iterations, lr_img 0.1, the official (outer, inner) loops of the
  ipc, noise init (`main.py`'s default); DSA: as DC with real init (the
  README's command). SeqMatch's K per `PAPER_SUBSETS`; every subset runs the
  method's full iteration count, as SeqMatch-MTT's subsets do."""
  if name == 'dm':
    row = {'dm.iterations': 20000, 'dm.lr_img': 1.0, 'dm.batch_real': 256,
           'distill.pix_init': 'real'}
  elif name in ('dc', 'dsa'):
    row = {'dc.iterations': 1000, 'dc.lr_img': 0.1, 'dc.batch_real': 256,
           'dc.outer_loop': 0, 'dc.inner_loop': 0, 'dc.lr_net': 0.01,
           'distill.pix_init': 'noise' if name == 'dc' else 'real'}
  else:
    raise ValueError(f'no DC/DM row for {name!r}')
  row.update({'dataset.zca': False,
              'augment.strategy': 'color_crop_cutout_flip_scale_rotate'})
  return {ipc: dict(row, **{'seqmatch.num_subsets': k})
          for ipc, k in PAPER_SUBSETS.items()}


def idc_seqmatch_row(num_subsets: int) -> dict:
  """A CIFAR SeqMatch-IDC row: no ZCA (IDC normalises pixels itself), K
  subsets, each with the official seqmatch-idc/run.sh schedule (inner loop 50
  for the first subset, 100 after; 4000 outer iterations each). The plain IDC
  row (k=1) keeps `idc.*`'s scalars: IDC's reproduce settings."""
  return {'dataset.zca': False, 'seqmatch.num_subsets': num_subsets,
          'idc.per_subset.inner_loop': (50,) + (100,) * (num_subsets - 1),
          'idc.per_subset.iterations': (4000,) * num_subsets}


# MNIST, Fashion-MNIST and SVHN are not in the paper's Table 4: our values,
# following the MTT/SeqMatch CIFAR-10 rows (N 30, M 2, lr_img 100, lr_lr 1e-5,
# lr_teacher 0.01; K 2 at ipc 10 with T+ {20,10}, K 3 at ipc 50), no ZCA.
MNIST_LIKE_TABLES = {
    1: {'mtt.syn_steps': 50, 'mtt.expert_epochs': 2,
        'mtt.max_start_epoch': 2, 'mtt.lr_img': 100.0,
        'mtt.lr_lr': 1e-7, 'mtt.lr_teacher': 0.01,
        'seqmatch.num_subsets': 1},
    10: {'mtt.syn_steps': 30, 'mtt.expert_epochs': 2,
         'mtt.max_start_epoch': 20, 'mtt.lr_img': 100.0,
         'mtt.lr_lr': 1e-5, 'mtt.lr_teacher': 0.01,
         'seqmatch.num_subsets': 2, 'mtt.per_subset.max_start_epoch': (20, 10)},
    50: {'mtt.syn_steps': 30, 'mtt.expert_epochs': 2,
         'mtt.max_start_epoch': 40, 'mtt.lr_img': 100.0,
         'mtt.lr_lr': 1e-5, 'mtt.lr_teacher': 0.01,
         'seqmatch.num_subsets': 3, 'mtt.per_subset.max_start_epoch': (20, 20, 10)},
}


def imagenet_subset_config(name: str, arg: str | None,
                           max_start_epoch=(10, 5)) -> ml_collections.ConfigDict:
  """ImageNet subsets at 128x128 (ConvNetD5), paper Table 4: K 2, N 20, M 2,
  batch_syn 20, lr_img 1e5, lr_lr 1e-6, lr_teacher 0.01, T+ {10,5}."""
  tables = {
      10: {'mtt.syn_steps': 20, 'mtt.expert_epochs': 2,
           'mtt.max_start_epoch': 10, 'mtt.lr_img': 1e5,
           'mtt.lr_lr': 1e-6, 'mtt.lr_teacher': 0.01,
           'mtt.batch_syn': 20, 'seqmatch.num_subsets': 2,
           'mtt.per_subset.max_start_epoch': tuple(max_start_epoch)},
  }
  return table_config(name, arg, tables, {'model.depth': 5})


def resolve_config_path(path: str) -> str:
  """A config file's path as given, or under the repository this package is
  installed from (so 'configs/cifar10.py' works from any directory)."""
  if os.path.isfile(path) or os.path.isabs(path):
    return path
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  candidate = os.path.join(repo, path)
  return candidate if os.path.isfile(candidate) else path


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config of `spec`, written as on the command line:
  'configs/cifar10.py' or 'configs/cifar10.py:ipc=50,k=3' (for notebooks,
  tests and benchmarks; relative paths also resolve against the repository).

  Raises:
    ConfigError: the file does not exist.
  """
  path, _, arg = spec.partition(':')
  resolved = resolve_config_path(path)
  if not os.path.isfile(resolved):
    raise ConfigError(f'config file {path!r} does not exist; give a path such '
                      'as configs/digits.py (optionally with :ipc=N,...).')
  return _load_config_file(resolved).get_config(arg or None)


def _load_config_file(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('_config_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _with_variant(arg: str, key: str, value) -> str:
  items = [i for i in (arg or '').split(',') if i and not i.startswith(f'{key}=')]
  return ','.join(items + [f'{key}={value}'])


def _flat(c: ml_collections.ConfigDict, prefix: str = '') -> dict:
  out = {}
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _split_string_tuples(config: ml_collections.ConfigDict,
                         overrides: dict) -> None:
  """`--config.eval.architectures='(convnet,resnet18)'` as the tuple it means.

  ml_collections reads a tuple override with `ast.literal_eval`, which needs
  quoted names; unquoted ones arrive as one string, '(convnet,resnet18)'.
  Such a value is split at its commas (each item a number when it reads as
  one, else a name), in place in `config` and `overrides`.
  """
  import ast  # pylint: disable=g-import-not-at-top
  for key, value in list(overrides.items()):
    if not (isinstance(value, tuple) and len(value) == 1 and
            isinstance(value[0], str)):
      continue
    text = value[0].strip()
    if not (text.startswith(('(', '[')) and text.endswith((')', ']'))):
      continue
    items = []
    for item in text[1:-1].split(','):
      item = item.strip().strip('\'"')
      if item:
        try:
          items.append(ast.literal_eval(item))
        except (ValueError, SyntaxError):
          items.append(item)
    *path, leaf = key.split('.')
    node = config
    for part in path:
      node = node[part]
    node[leaf] = overrides[key] = tuple(items)


def _refuse_other_backbone_keys(config: ml_collections.ConfigDict,
                                overrides: dict) -> None:
  """An override of a backbone section the chosen backbone never reads
  (`--config.backbone.name=ftd --config.mtt.syn_steps=7`) would be silently
  unused: refused, naming the key to use."""
  chosen = backbones.backbone_class(config.backbone.name)
  sections = set(backbones.default_configs())
  for key in sorted(overrides):
    section, _, rest = key.partition('.')
    if section not in sections or section == chosen.config_key:
      continue
    readers = sorted(n for n in backbones.REGISTRY
                     if backbones.backbone_class(n).config_key == section)
    mine = f'{chosen.config_key}.{rest}'
    node, found = config, True
    for part in mine.split('.'):
      found = isinstance(node, ml_collections.ConfigDict) and part in node
      node = node[part] if found else None
    hint = (f'use --config.{mine}' if found else
            f'backbone {config.backbone.name} has no such setting (its keys: '
            f'{chosen.config_key}.*)')
    raise ConfigError(
        f'--config.{key} is read only by backbone {"/".join(readers)}, but '
        f'this run uses backbone.name={config.backbone.name}: {hint}.')


def reconcile_overrides(config: ml_collections.ConfigDict, overrides: dict,
                        config_spec: str) -> list[str]:
  """Command-line overrides that would silently change meaning.

  - `--config.ipc=N`: a table config picks its hyperparameter row from the
    *variant* ipc, so the override would keep another row's values. Refused
    (ConfigError) with the command that picks row N, when the rows differ.
  - `--config.<section>.<name>=v` of a backbone the run does not use:
    refused (ConfigError) with the chosen backbone's key.
  - a tuple of unquoted names, `'(convnet,resnet18)'`: split into names.
  - `--config.<backbone>.<name>=v` where the config's per-subset tuple
    `<backbone>.per_subset.<name>` is set (and not overridden too): the tuple
    would shadow v for SeqMatch. Applied consistently instead: the tuple is
    emptied, so every subset (and the plain comparison) uses v.

  Returns one line per adjustment made, for the log.
  """
  notes = []
  _split_string_tuples(config, overrides)
  _refuse_other_backbone_keys(config, overrides)
  path, _, arg = config_spec.partition(':')
  ipc = overrides.get('ipc')
  if (isinstance(ipc, int) and ipc >= 1 and path.endswith('.py')
      and os.path.isfile(path)):
    module = _load_config_file(path)
    try:
      base = module.get_config(arg or None)
      row = module.get_config(_with_variant(arg, 'ipc', overrides['ipc']))
    except (ValueError, TypeError, KeyError, AttributeError):
      base = row = None  # the file has no ipc variant: nothing to pick
    if base is not None:
      old, new = _flat(base), _flat(row)
      diff = sorted(k for k in set(old) | set(new)
                    if k != 'ipc' and old.get(k) != new.get(k))
      if diff:
        raise ConfigError(
            f'--config.ipc={overrides["ipc"]} would keep the settings {path} '
            f'picks for ipc={base.ipc} ({", ".join(diff[:6])}'
            f'{", ..." if len(diff) > 6 else ""} differ for '
            f'ipc={overrides["ipc"]}); use '
            f'--config={path}:{_with_variant(arg, "ipc", overrides["ipc"])} '
            'instead of --config.ipc.')
  for key in backbones.default_configs():
    for name in config[key].per_subset:
      scalar, tuple_key = f'{key}.{name}', f'{key}.per_subset.{name}'
      if scalar in overrides and tuple_key not in overrides and \
          config[key].per_subset[name]:
        notes.append(f'--config.{scalar}={overrides[scalar]} applies to every '
                     f'subset: it replaces the config\'s {tuple_key}='
                     f'{tuple(config[key].per_subset[name])}')
        config[key].per_subset[name] = ()
  return notes
