"""The synthetic-set file format: the one module that reads and writes it.

`synthetic.npz` holds `images` (pixels in [0,1], NHWC), `images_model` (the
exact model-space images the run produced), `labels` (integers; for a set with
learned soft labels their argmax, the soft labels themselves, logits whose
softmax is the target, in `soft_labels` [N, C]), `subset` (0-based subset
id per image), `lr` (the evaluation step size of each subset: MTT's learned
`syn_lr`, the protocol's lr for the other backbones), `backbone`, the run's
`config` and a `preprocessing` tag saying what model space meant. Backbones
that keep an EMA of the images (FTD) add `images_ema` / `images_ema_model`
beside the raw ones (same layout, labels and lrs). Backbones whose stored
images decode into the training set (IDC's multi-formation tiles) save the
decoded set as `images` and what was learned as `stored_images` (in the
parameterisation's space: [0,1] pixels for IDC) with `stored_labels` /
`stored_subset`. Users' own npz files need only `images` and `labels` (and
may add `soft_labels`: evaluation then trains on them).

`subsets/subset_k.npz` is a finished subset of a run in progress:
`images_model` (stored form), `lr`, `labels` (the class of each image),
`settings` (the record that made it), and `soft_labels` / `ema_model` when the
method learns or keeps them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile

from absl import logging
import numpy as np

from seqmatch_jax import files
from seqmatch_jax.errors import CheckpointError, DataError


@dataclasses.dataclass(frozen=True)
class SyntheticSet:
  """A distilled set in model space, subset-major, class-blocked per subset."""
  images: np.ndarray  # model space
  labels: np.ndarray
  subset: np.ndarray | None = None  # None: one subset
  lrs: np.ndarray | None = None  # one per subset; None: the protocol's lr
  backbone: str = ''
  ema: np.ndarray | None = None  # model space, like `images` (FTD's EMA)
  # What the backbone learned, when `images` are decoded from it (IDC: [0,1]
  # pixel tiles), with its own labels and subset ids; None otherwise.
  stored: np.ndarray | None = None
  stored_labels: np.ndarray | None = None
  stored_subset: np.ndarray | None = None
  # Learned soft labels (logits [N, C], the layout of `images`); evaluation
  # trains on softmax(soft_labels) when they are present.
  soft_labels: np.ndarray | None = None

  @property
  def targets(self) -> np.ndarray:
    """What evaluation trains on: the soft labels, else the labels."""
    return self.labels if self.soft_labels is None else self.soft_labels

  @property
  def num_subsets(self) -> int:
    return 1 if self.subset is None else int(self.subset.max()) + 1


def preprocessing_tag(config) -> str:
  """What model space means for a saved set (see `same_preprocessing`)."""
  return json.dumps(dict(dataset=config.dataset.name, zca=bool(config.dataset.zca),
                         val_size=config.dataset.val_size, seed=config.seed),
                    sort_keys=True)


def same_preprocessing(tag: str, config) -> bool:
  """Whether a set tagged `tag` lives in this config's model space. The
  normalisation depends on the dataset alone; a ZCA whitening is fitted on the
  training split, which the validation carve-out (val_size, seed) changes."""
  try:
    old = json.loads(tag)
    new = json.loads(preprocessing_tag(config))
    keys = ('dataset', 'zca') + (('val_size', 'seed') if new['zca'] else ())
    return all(old[k] == new[k] for k in keys)
  except (ValueError, KeyError, TypeError):
    return False


def save(path: str, syn: SyntheticSet, preprocessor, config) -> None:
  pixels = np.clip(np.asarray(preprocessor.to_pixels(syn.images)), 0.0, 1.0)
  subset = (np.zeros(len(syn.labels), np.int32) if syn.subset is None
            else syn.subset)
  ema = {}
  if syn.ema is not None:
    ema = dict(images_ema=np.clip(np.asarray(preprocessor.to_pixels(syn.ema)),
                                  0.0, 1.0).astype(np.float32),
               images_ema_model=np.asarray(syn.ema, np.float32))
  if syn.stored is not None:
    ema.update(stored_images=np.asarray(syn.stored, np.float32),
               stored_labels=np.asarray(syn.stored_labels, np.int32),
               stored_subset=np.asarray(syn.stored_subset, np.int32))
  if syn.soft_labels is not None:
    ema.update(soft_labels=np.asarray(syn.soft_labels, np.float32))
  labels = (syn.labels if syn.soft_labels is None
            else np.argmax(syn.soft_labels, axis=-1).astype(np.int32))
  files.write_npz(
      path, **ema, images=pixels.astype(np.float32),
      images_model=np.asarray(syn.images, np.float32), labels=labels,
      subset=subset, lr=np.asarray(syn.lrs, np.float32),
      backbone=np.asarray(syn.backbone),
      config=np.asarray(config.to_json_best_effort(sort_keys=True)),
      preprocessing=np.asarray(preprocessing_tag(config)))


_USER_FIX = "write one with np.savez(path, images=..., labels=...)"


def _read_npz(path: str, what: str, fix: str = _USER_FIX) -> dict[str, np.ndarray]:
  if os.path.isdir(path):
    raise DataError(f'{what} {path} is a directory; give the path of an .npz file.')
  if not os.path.isfile(path):
    raise DataError(f'{what} {path} does not exist; pass '
                    '--config.eval.synthetic=PATH/synthetic.npz.')
  try:
    with np.load(path, allow_pickle=False) as f:
      if not isinstance(f, np.lib.npyio.NpzFile):
        raise DataError(f'{path} is a single .npy array, not an .npz archive with '
                        "'images' and 'labels'; save it with np.savez.")
      return {k: f[k] for k in f.files}
  except DataError:
    raise
  except Exception as e:
    raise DataError(f'{path} is not a readable .npz archive ({type(e).__name__}); '
                    f'{fix}.') from e


def load(path: str, num_classes: int, image_shape, preprocessor=None,
         config=None, fix: str = _USER_FIX) -> SyntheticSet:
  """Reads and validates a saved set (ours or a user's npz), in model space.

  The stored `images_model` are used when the file's preprocessing tag equals
  this config's (exactly what the run trained on); otherwise the pixels are
  converted with `preprocessor` (e.g. a user's npz, or another dataset seed).
  `fix`: what to do about an unreadable file (a run's own set is rebuilt).
  """
  data = _read_npz(path, 'Synthetic set', fix)
  for k in ('images', 'labels'):
    if k not in data:
      raise DataError(f'{path} lacks {k!r} (needs images (N,H,W,C) in [0,1] and '
                      'integer labels (N,)).')
  images, labels = data['images'], data['labels']
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
    raise DataError(f'{path}: images have shape {images.shape}, expected '
                    f'(N, {", ".join(map(str, image_shape))}) for this dataset.')
  if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f'{path}: labels must be integers of shape ({images.shape[0]},), '
                    f'got {labels.dtype} {labels.shape}.')
  if labels.min() < 0 or labels.max() >= num_classes:
    raise DataError(f'{path}: labels must lie in [0, {num_classes - 1}], got '
                    f'[{labels.min()}, {labels.max()}].')
  if not np.all(np.isfinite(images)):
    raise DataError(f'{path}: images contain NaN or inf.')
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 255.0
  subset = data.get('subset')
  if subset is not None:
    if subset.shape != labels.shape:
      raise DataError(f'{path}: subset must have shape {labels.shape}.')
    ids = sorted(set(subset.tolist()))
    if ids != list(range(int(subset.max()) + 1)):
      raise DataError(f'{path}: subset ids must be 0..K-1 without gaps, got {ids}.')
    subset = subset.astype(np.int32)
  lrs = data.get('lr')
  if lrs is not None:
    lrs = np.atleast_1d(lrs).astype(np.float32)
    num_subsets = 1 if subset is None else int(subset.max()) + 1
    if lrs.shape[0] not in (1, num_subsets) or not np.all(lrs > 0):
      raise DataError(f'{path}: lr must be {num_subsets} positive values, got {lrs}.')
  tag = data.get('preprocessing')
  same = config is not None and tag is not None and same_preprocessing(str(tag),
                                                                       config)

  def model_space(pixels, model):
    if model is not None and model.shape == pixels.shape and same:
      return model.astype(np.float32)
    if preprocessor is not None:
      logging.info('%s: converting its pixel images with this config\'s '
                   'preprocessing', path)
      return np.asarray(preprocessor.to_model(pixels.astype(np.float32)), np.float32)
    return pixels
  images = model_space(images, data.get('images_model'))
  ema = data.get('images_ema')
  if ema is not None:
    if ema.shape != data['images'].shape or not np.all(np.isfinite(ema)):
      raise DataError(f'{path}: images_ema must be finite with the shape of '
                      f'images {data["images"].shape}, got {ema.shape}.')
    ema = model_space(ema, data.get('images_ema_model')).astype(np.float32)
  soft = data.get('soft_labels')
  if soft is not None:
    if (soft.shape != (len(labels), num_classes) or
        not np.issubdtype(soft.dtype, np.floating) or not np.all(np.isfinite(soft))):
      raise DataError(f'{path}: soft_labels must be finite floats of shape '
                      f'({len(labels)}, {num_classes}) (logits, one row per '
                      f'image), got {soft.dtype} {soft.shape}.')
    soft = soft.astype(np.float32)
  backbone = str(data['backbone']) if 'backbone' in data else ''
  return SyntheticSet(images.astype(np.float32), labels.astype(np.int32), subset,
                      lrs, backbone, ema, soft_labels=soft)


@dataclasses.dataclass(frozen=True)
class FinishedSubset:
  """A distilled subset of a run in progress (subsets/subset_k.npz)."""
  images: np.ndarray  # stored form
  lr: float  # its evaluation step size
  labels: np.ndarray  # the class of each image
  record: dict | None  # the settings that made it (None: not recorded)
  soft_labels: np.ndarray | None = None  # learned soft labels [n, C]
  ema: np.ndarray | None = None  # an EMA of the images (FTD)


def save_subset(path: str, subset: FinishedSubset, record: dict | None) -> None:
  extra = {}
  if subset.ema is not None:
    extra['ema_model'] = np.asarray(subset.ema, np.float32)
  if subset.soft_labels is not None:
    extra['soft_labels'] = np.asarray(subset.soft_labels, np.float32)
  files.write_npz(path, images_model=np.asarray(subset.images, np.float32),
                  lr=np.float32(subset.lr), labels=np.asarray(subset.labels),
                  settings=np.asarray(json.dumps(record or {}, sort_keys=True)),
                  **extra)


def load_subset(path: str) -> FinishedSubset:
  """A finished subset (raises CheckpointError naming the fix if damaged)."""
  try:
    with np.load(path, allow_pickle=False) as f:
      settings = json.loads(str(f['settings'])) if 'settings' in f.files else None
      get = lambda k: f[k] if k in f.files else None
      return FinishedSubset(images=f['images_model'], lr=float(f['lr']),
                            labels=f['labels'], record=settings or None,
                            soft_labels=get('soft_labels'), ema=get('ema_model'))
  except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
    raise CheckpointError(
        f'{path} is damaged ({type(e).__name__}); delete it and rerun the same '
        'command to distil that subset again (its checkpoint in distill/ is '
        'reused).') from e
