"""Dataset registry and loaders; every dataset ends as float32 NHWC in [0, 1].

Loaders never download anything (the training machines are offline). TFDS
datasets are read with `tfds.data_source(..., download=False)` from the
array_record files `tfds build` writes, which works without TensorFlow. Every
failure a user can fix surfaces as a one-line `DataError` naming the path that
was searched and the command that prepares the data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import os
import pathlib
import re
import tempfile
from typing import Any
import zipfile

from absl import logging
import numpy as np
from PIL import Image

from seqmatch_jax import files
from seqmatch_jax.errors import ConfigError, DataError

# Per-channel normalisation constants used by the reference code (DC/DSA, MTT,
# SeqMatch). CIFAR-100 deliberately reuses the CIFAR-10 constants: that is what
# the MTT and SeqMatch reference code do, so non-ZCA CIFAR-100 runs match them.
_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    'mnist': ((0.1307,), (0.3081,)),
    'fashion_mnist': ((0.2861,), (0.3530,)),
    'svhn_cropped': ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'cifar100': ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# The MTT paper's 10-class ImageNet subsets (Cazenavette et al. 2022, the
# `Config` class in utils.py of GeorgeCazenavette/mtt-distillation; SeqMatch
# reuses them for its Table 3). Ids index the 1000 ImageNet-1k classes in sorted
# WordNet-id order, which is the label order of tfds `imagenet2012` and of
# torchvision's ImageFolder alike. Names are MTT's own comments (imagenette's
# are fast.ai's). Label k of a subset is the k-th id of its list.
IMAGENET_SUBSETS: dict[str, tuple[tuple[int, str], ...]] = {
    'imagenette': (
        (0, 'tench'), (217, 'english_springer'), (482, 'cassette_player'),
        (491, 'chain_saw'), (497, 'church'), (566, 'french_horn'),
        (569, 'garbage_truck'), (571, 'gas_pump'), (574, 'golf_ball'),
        (701, 'parachute'),
    ),
    'imagewoof': (
        (193, 'australian_terrier'), (182, 'border_terrier'), (258, 'samoyed'),
        (162, 'beagle'), (155, 'shih-tzu'), (167, 'english_foxhound'),
        (159, 'rhodesian_ridgeback'), (273, 'dingo'),
        (207, 'golden_retriever'), (229, 'english_sheepdog'),
    ),
    'imagemeow': (
        (281, 'tabby_cat'), (282, 'bengal_cat'), (283, 'persian_cat'),
        (284, 'siamese_cat'), (285, 'egyptian_cat'), (291, 'lion'),
        (292, 'tiger'), (290, 'jaguar'), (289, 'snow_leopard'), (287, 'lynx'),
    ),
    'imagesquawk': (
        (84, 'peacock'), (130, 'flamingo'), (88, 'macaw'), (144, 'pelican'),
        (145, 'king_penguin'), (22, 'bald_eagle'), (96, 'toucan'),
        (9, 'ostrich'), (100, 'black_swan'), (89, 'cockatoo'),
    ),
    'imagefruit': (
        (953, 'pineapple'), (954, 'banana'), (949, 'strawberry'),
        (950, 'orange'), (951, 'lemon'), (957, 'pomegranate'), (952, 'fig'),
        (945, 'bell_pepper'), (943, 'cucumber'), (948, 'green_apple'),
    ),
    'imageyellow': (
        (309, 'bee'), (986, 'ladys_slipper'), (954, 'banana'), (951, 'lemon'),
        (987, 'corn'), (779, 'school_bus'), (599, 'honeycomb'), (291, 'lion'),
        (72, 'garden_spider'), (11, 'goldfinch'),
    ),
}

IMAGENET_RESOLUTION = 128  # MTT / SeqMatch ImageNet-subset resolution.
TINY_RESOLUTION = 64
_CACHE_ENV = 'SEQMATCH_CACHE_DIR'
_CACHE_FORMAT = 1  # Bump when the layout of the cached npz files changes.
_DECODE_BATCH = 1024  # ImageNet JPEGs held before decoding a batch.
_BILINEAR = Image.Resampling.BILINEAR  # Antialiased when shrinking.


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A labelled image dataset held in memory.

  Images are float32 NHWC in [0, 1]; `mean`/`std` are the per-channel
  normalisation constants (the literature's where they exist) so that every
  consumer normalises the same way. `eq=False`: arrays have no boolean `==`.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  class_names: tuple[str, ...]
  mean: np.ndarray
  std: np.ndarray

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one image."""
    h, w, c = self.x_train.shape[1:]
    return int(h), int(w), int(c)


# --------------------------------------------------------------------------
# Shared helpers.


def _to_unit_float(x: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [0, 1], in chunks to bound peak memory."""
  out = np.empty(x.shape, np.float32)
  step = 8192
  for i in range(0, len(x), step):
    np.multiply(x[i:i + step], np.float32(1.0 / 255.0), out=out[i:i + step],
                dtype=np.float32)
  return out


def _channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean/std of float images (population std; 0 std -> 1)."""
  c = x.shape[-1]
  flat = x.reshape(-1, c)
  total = np.zeros(c, np.float64)
  total_sq = np.zeros(c, np.float64)
  step = 1 << 20
  for i in range(0, len(flat), step):
    chunk = flat[i:i + step].astype(np.float64)
    total += chunk.sum(0)
    total_sq += np.square(chunk).sum(0)
  n = max(len(flat), 1)
  mean = total / n
  std = np.sqrt(np.maximum(total_sq / n - mean**2, 0.0))
  std = np.where(std > 1e-8, std, 1.0)
  return mean.astype(np.float32), std.astype(np.float32)


def _constants(key: str) -> tuple[np.ndarray, np.ndarray]:
  mean, std = _NORMALIZATION[key]
  return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def _finish(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    class_names: Sequence[str],
    stats: tuple[np.ndarray, np.ndarray] | None,
) -> Dataset:
  """Converts to the canonical dtypes; `stats=None` computes mean/std."""
  if x_train.dtype == np.uint8:
    x_train = _to_unit_float(x_train)
  if x_test.dtype == np.uint8:
    x_test = _to_unit_float(x_test)
  x_train = np.ascontiguousarray(x_train, np.float32)
  x_test = np.ascontiguousarray(x_test, np.float32)
  mean, std = stats if stats is not None else _channel_stats(x_train)
  return Dataset(
      name=name,
      x_train=x_train,
      y_train=np.ascontiguousarray(y_train, np.int32),
      x_test=x_test,
      y_test=np.ascontiguousarray(y_test, np.int32),
      class_names=tuple(str(c) for c in class_names),
      mean=np.asarray(mean, np.float32),
      std=np.asarray(std, np.float32),
  )


def _writable_dir(path: pathlib.Path) -> bool:
  """True when files can be created in `path` (created if missing)."""
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix='.probe'):
      pass
    return True
  except OSError:
    return False


def _cache_dir(preferred: pathlib.Path) -> pathlib.Path | None:
  """`preferred` if writable, else $SEQMATCH_CACHE_DIR or ~/.cache, or None."""
  fallback = pathlib.Path(
      os.environ.get(_CACHE_ENV) or '~/.cache/seqmatch_jax').expanduser()
  for candidate in (preferred, fallback):
    if _writable_dir(candidate):
      return candidate
  logging.warning('No writable cache directory (tried %s and %s); decoded '
                  'images will not be cached.', preferred, fallback)
  return None


def _load_cached_arrays(path: pathlib.Path,
                        fingerprint: str) -> dict[str, np.ndarray] | None:
  """Returns the cached arrays if the file is intact and matches."""
  if not path.is_file():
    return None
  keys = ('x_train', 'y_train', 'x_test', 'y_test', 'class_names')
  try:
    with np.load(path, allow_pickle=False) as f:
      if str(f['fingerprint']) != fingerprint:
        logging.info('Cache %s is for other data; rebuilding it.', path)
        return None
      out = {k: f[k] for k in keys}
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Ignoring unreadable cache %s (%s); rebuilding it.', path,
                    e)
    return None
  if len(out['x_train']) != len(out['y_train']) or len(out['x_test']) != len(
      out['y_test']):
    logging.warning('Ignoring inconsistent cache %s; rebuilding it.', path)
    return None
  return out


def _store_cache(path: pathlib.Path | None, fingerprint: str,
                 **arrays: np.ndarray) -> None:
  if path is None:
    return
  try:
    files.write_npz(str(path), fingerprint=np.asarray(fingerprint), **arrays)
    logging.info('Cached decoded images in %s', path)
  except OSError as e:
    logging.warning('Could not write cache %s: %s', path, e)


def _decode_rgb(data: bytes | str | os.PathLike[str], size: int,
                center_crop: bool) -> np.ndarray:
  """Decodes an image to RGB uint8 (size, size, 3).

  With `center_crop` the short side is resized to `size` and the centre cut
  out (aspect ratio kept); otherwise the image is resized straight to size.
  """
  src = io.BytesIO(data) if isinstance(data, bytes) else data
  with Image.open(src) as img:
    if img.format == 'JPEG':
      img.draft('RGB', (size, size))  # DCT-domain downscale: much faster.
    img = img.convert('RGB')
    w, h = img.size
    if (w, h) == (size, size):
      return np.asarray(img, np.uint8)
    if not center_crop:
      return np.asarray(img.resize((size, size), _BILINEAR), np.uint8)
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), _BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)), np.uint8)


def _decode_many(items: Sequence[bytes | str], size: int, center_crop: bool,
                 where: str) -> np.ndarray:
  """Decodes images on a thread pool (PIL releases the GIL while decoding)."""
  out = np.empty((len(items), size, size, 3), np.uint8)
  chunk = 256

  def work(start: int) -> None:
    for i, item in enumerate(items[start:start + chunk], start):
      try:
        out[i] = _decode_rgb(item, size, center_crop)
      except (OSError, ValueError, SyntaxError) as e:  # PIL's decode errors.
        what = item if isinstance(item, str) else f'image #{i}'
        raise DataError(f'{where}: cannot decode {what} ({e}); the data is '
                        'damaged, copy or prepare it again') from None

  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    list(pool.map(work, range(0, len(items), chunk)))
  return out


# --------------------------------------------------------------------------
# digits (scikit-learn, embedded; needs no files).


def load_digits_dataset(data_dir: str | None = None) -> Dataset:
  """sklearn's 1,797 8x8 digits with a fixed stratified 1,347/450 split.

  Needs no files, which makes it the default dataset for smoke runs and tests.
  """
  del data_dir  # Embedded in scikit-learn.
  # pylint: disable=g-import-not-at-top
  from sklearn import datasets as sk_datasets
  from sklearn import model_selection

  digits = sk_datasets.load_digits()
  x = (digits.images.astype(np.float32) / 16.0)[..., None]
  y = digits.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
      x, y, test_size=450, stratify=y, random_state=0)
  return _finish('digits', x_tr, y_tr, x_te, y_te,
                 [str(i) for i in range(10)], None)


# --------------------------------------------------------------------------
# TFDS datasets (array_record, read without TensorFlow).

_VERSION_RE = re.compile(r'^\d+\.\d+\.\d+$')


def _version_key(v: str) -> tuple[int, ...]:
  return tuple(int(p) for p in v.split('.'))


def _tfds_prepare_hint(tfds_name: str, data_dir: str) -> str:
  base = tfds_name.split('/')[0]
  config = tfds_name.split('/')[1] if '/' in tfds_name else None
  cfg = f' --config={config}' if config else ''
  if base == 'imagenet2012':
    return (
        'download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into '
        'MANUAL_DIR on any machine, then run `pip install tensorflow '
        f'tensorflow-datasets && tfds build imagenet2012 --data_dir={data_dir} '
        '--manual_dir=MANUAL_DIR --file_format=array_record` and copy '
        f"{data_dir}/imagenet2012 to this machine's {data_dir}")
  return (
      'on a machine with internet run `pip install tensorflow '
      f'tensorflow-datasets && tfds build {base}{cfg} --data_dir={data_dir} '
      f"--file_format=array_record` there, then copy {data_dir}/{base} to this "
      f"machine's {data_dir}")


def _find_prepared(tfds_name: str, data_dir: str) -> tuple[str, str]:
  """Finds the prepared dataset; returns (tfds data_dir, version).

  Accepts the TFDS root (the usual case) or the dataset's own folder. Checks
  for array_record files so that a TFRecord-prepared dataset gets an exact fix
  instead of TFDS's misleading message.
  """
  root = pathlib.Path(data_dir).expanduser()
  parts = tfds_name.split('/')
  candidates = [root, root.parent]
  if len(parts) > 1:
    candidates.append(root.parent.parent)
  for cand in candidates:
    base = cand.joinpath(*parts)
    if not base.is_dir():
      continue
    versions = sorted(
        (p.name for p in base.iterdir()
         if _VERSION_RE.match(p.name) and (p / 'dataset_info.json').is_file()),
        key=_version_key)
    if not versions:
      continue
    version = versions[-1]
    files = [p.name for p in (base / version).iterdir()]
    if not any('.array_record' in f for f in files):
      fmt = 'TFRecord' if any('.tfrecord' in f for f in files) else 'an unknown'
      raise DataError(
          f'{tfds_name} at {base / version} is prepared in {fmt} format but '
          'reading without TensorFlow needs array_record: rebuild it with '
          f'`tfds build {parts[0]}'
          f'{" --config=" + parts[1] if len(parts) > 1 else ""} '
          f'--data_dir={cand} --file_format=array_record`')
    return str(cand), version
  raise DataError(
      f'{tfds_name} not found: no prepared '
      f'{pathlib.PurePath(*parts)}/<version>/dataset_info.json under {root}; '
      + _tfds_prepare_hint(tfds_name, str(root)))


def _info_digest(root: str, tfds_name: str, version: str) -> str:
  """Hash of dataset_info.json: a re-prepared dataset invalidates caches."""
  info = pathlib.Path(root).joinpath(*tfds_name.split('/'), version,
                                     'dataset_info.json')
  return hashlib.sha256(info.read_bytes()).hexdigest()[:16]


def _require_data_dir(name: str, data_dir: str | None, what: str) -> str:
  if not data_dir:
    raise DataError(
        f'dataset {name!r} needs a data directory ({what}): set '
        '--config.dataset.data_dir=/path/to/it')
  return data_dir


def _open_tfds(tfds_name: str, data_dir: str, split: str,
               skip_image_decoding: bool = False):
  """Opens one split as a random-access tfds data source (no TensorFlow)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  root, version = _find_prepared(tfds_name, data_dir)
  decoders = ({'image': tfds.decode.SkipDecoding()} if skip_image_decoding
              else None)
  try:
    return tfds.data_source(f'{tfds_name}:{version}', split=split,
                            data_dir=root, download=False, decoders=decoders)
  except Exception as e:  # pylint: disable=broad-except
    msg = ' '.join(str(e).split())[:300]
    raise DataError(
        f'could not open split {split!r} of {tfds_name} {version} in {root} '
        f'({type(e).__name__}: {msg}); the copy may be incomplete: '
        + _tfds_prepare_hint(tfds_name, root)) from None


def _iter_chunks(source, chunk: int = 4096) -> Iterator[list[dict[str, Any]]]:
  """Batched reads; a damaged file becomes a DataError, not a traceback."""
  n = len(source)
  for start in range(0, n, chunk):
    try:
      examples = source.__getitems__(list(range(start, min(start + chunk, n))))
    except Exception as e:  # pylint: disable=broad-except
      info = source.dataset_info
      msg = ' '.join(str(e).split())[:200]
      raise DataError(
          f'reading split {source.split!r} of {info.full_name} in '
          f'{info.data_dir} failed at record {start} ({type(e).__name__}: '
          f'{msg}); the files are damaged, copy or prepare them again'
      ) from None
    yield examples


def _read_fixed_size(source) -> tuple[np.ndarray, np.ndarray]:
  """Reads a fixed-shape image split into (uint8 NHWC, int32 labels)."""
  n = len(source)
  if n == 0:
    raise DataError(f'{source} is empty; re-prepare the dataset')
  x = None
  y = np.empty((n,), np.int32)
  i = 0
  for examples in _iter_chunks(source):
    for ex in examples:
      if x is None:  # Shape from the first image, all reads stay guarded.
        x = np.empty((n,) + np.shape(ex['image']), np.uint8)
      x[i] = ex['image']
      y[i] = ex['label']
      i += 1
  return x, y


def _tfds_class_names(source) -> tuple[str, ...]:
  return tuple(source.dataset_info.features['label'].names)


def _load_tfds_small(name: str, tfds_name: str, data_dir: str | None,
                     stats_key: str) -> Dataset:
  """mnist / fashion_mnist / svhn_cropped / cifar10 / cifar100 via tfds."""
  data_dir = _require_data_dir(name, data_dir, 'the TFDS data_dir holding '
                               f'{tfds_name}/<version>/')
  train = _open_tfds(tfds_name, data_dir, 'train')
  test = _open_tfds(tfds_name, data_dir, 'test')
  x_tr, y_tr = _read_fixed_size(train)
  x_te, y_te = _read_fixed_size(test)
  return _finish(name, x_tr, y_tr, x_te, y_te, _tfds_class_names(train),
                 _constants(stats_key))


# --------------------------------------------------------------------------
# ImageNet subsets (tfds imagenet2012) and fast.ai Imagenette (tfds imagenette).


def _filtered_split(source, wanted: dict[int, int], size: int,
                    split: str) -> tuple[np.ndarray, np.ndarray]:
  """Scans a split (image bytes undecoded), decodes only the wanted labels.

  Decodes as it goes, so only resized uint8 images (not ~110 KB JPEGs) pile
  up in memory.
  """
  where = f'imagenet2012 {split} in {source.dataset_info.data_dir}'
  images = [np.empty((0, size, size, 3), np.uint8)]
  blobs: list[bytes] = []
  labels: list[int] = []
  n = len(source)
  for done, examples in enumerate(_iter_chunks(source, 2048)):
    for ex in examples:
      label = int(ex['label'])
      if label in wanted:
        blobs.append(bytes(ex['image']))
        labels.append(wanted[label])
    if len(blobs) >= _DECODE_BATCH:
      images.append(_decode_many(blobs, size, True, where))
      blobs = []
    if done % 50 == 0:
      logging.info('imagenet2012 %s: scanned %d/%d, kept %d', split,
                   min((done + 1) * 2048, n), n, len(labels))
  if blobs:
    images.append(_decode_many(blobs, size, True, where))
  return np.concatenate(images), np.asarray(labels, np.int32)


def _few(values, limit: int = 8) -> str:
  """`values` for an error line: at most `limit` of them."""
  values = [int(v) for v in values]
  more = f' (+{len(values) - limit} more)' if len(values) > limit else ''
  return ', '.join(map(str, values[:limit])) + more


def _check_all_classes(name: str, y: np.ndarray, num_classes: int,
                       where: str, fix: str) -> None:
  """Distillation starts every class from its real images: none may be empty."""
  missing = sorted(set(range(num_classes)) - set(np.unique(y).tolist()))
  if missing:
    raise DataError(f'{name}: classes {missing} have no images in {where}; '
                    + fix)


def load_imagenet_subset(subset: str, data_dir: str | None) -> Dataset:
  """An MTT 10-class ImageNet subset at 128x128, from tfds imagenet2012.

  ImageNet train is the training set and ImageNet validation the test set, as
  in MTT/SeqMatch. Images: short side resized to 128 and centre-cropped.
  SLOW ON FIRST USE: the whole of imagenet2012 (~150 GB) is scanned once for
  the wanted labels; the result is cached as an npz (uint8) in
  `<data_dir>/seqmatch_cache/` or, if that is read-only, $SEQMATCH_CACHE_DIR /
  ~/.cache/seqmatch_jax, and later loads take seconds.
  """
  data_dir = _require_data_dir(
      subset, data_dir, 'the TFDS data_dir holding imagenet2012/<version>/')
  ids = [i for i, _ in IMAGENET_SUBSETS[subset]]
  names = [n for _, n in IMAGENET_SUBSETS[subset]]
  size = IMAGENET_RESOLUTION
  root, version = _find_prepared('imagenet2012', data_dir)
  fingerprint = (f'v{_CACHE_FORMAT}:imagenet2012:{version}:'
                 f'{_info_digest(root, "imagenet2012", version)}:{ids}:{size}:'
                 'shortside-centercrop-bilinear')
  tag = hashlib.sha256(fingerprint.encode()).hexdigest()[:10]
  cdir = _cache_dir(pathlib.Path(root) / 'seqmatch_cache')
  cache = cdir / f'{subset}_{size}px_{tag}.npz' if cdir else None
  cached = _load_cached_arrays(cache, fingerprint) if cache else None
  if cached is None:
    logging.info('Building %s from imagenet2012 in %s (one-off full scan).',
                 subset, root)
    wanted = {imagenet_id: k for k, imagenet_id in enumerate(ids)}
    x_tr, y_tr = _filtered_split(
        _open_tfds('imagenet2012', data_dir, 'train', True), wanted, size,
        'train')
    x_te, y_te = _filtered_split(
        _open_tfds('imagenet2012', data_dir, 'validation', True), wanted, size,
        'validation')
    _check_all_classes(subset, y_tr, len(ids), f'{root}/imagenet2012 train',
                       'the prepared imagenet2012 is incomplete, rebuild it')
    cached = dict(x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                  class_names=np.asarray(names))
    _store_cache(cache, fingerprint, **cached)
  return _finish(subset, cached['x_train'], cached['y_train'],
                 cached['x_test'], cached['y_test'], names,
                 _constants('imagenet'))


def load_imagenette_fastai(data_dir: str | None) -> Dataset:
  """fast.ai's Imagenette (tfds `imagenette/full-size-v2`) at 128x128.

  Same 10 classes as the MTT `imagenette` subset but fast.ai's own split
  (train / validation as test), for users without the ImageNet archives.
  Decoding ~13k full-size JPEGs is slow on first use, so the resized uint8
  arrays are cached like the ImageNet subsets.
  """
  tfds_name = 'imagenette/full-size-v2'
  data_dir = _require_data_dir('imagenette_fastai', data_dir,
                               f'the TFDS data_dir holding {tfds_name}/')
  size = IMAGENET_RESOLUTION
  root, version = _find_prepared(tfds_name, data_dir)
  fingerprint = (f'v{_CACHE_FORMAT}:{tfds_name}:{version}:'
                 f'{_info_digest(root, tfds_name, version)}:{size}')
  tag = hashlib.sha256(fingerprint.encode()).hexdigest()[:10]
  cdir = _cache_dir(pathlib.Path(root) / 'seqmatch_cache')
  cache = cdir / f'imagenette_fastai_{size}px_{tag}.npz' if cdir else None
  cached = _load_cached_arrays(cache, fingerprint) if cache else None
  if cached is None:
    arrays = {}
    names: tuple[str, ...] = ()
    for split, key in (('train', 'train'), ('validation', 'test')):
      source = _open_tfds(tfds_name, data_dir, split, True)
      names = _tfds_class_names(source)
      blobs, labels = [], []
      for examples in _iter_chunks(source, 2048):
        for ex in examples:
          blobs.append(bytes(ex['image']))
          labels.append(int(ex['label']))
      arrays[f'x_{key}'] = _decode_many(
          blobs, size, True, f'{tfds_name} {split} in {root}')
      arrays[f'y_{key}'] = np.asarray(labels, np.int32)
    cached = dict(arrays, class_names=np.asarray(names))
    _store_cache(cache, fingerprint, **cached)
  return _finish('imagenette_fastai', cached['x_train'], cached['y_train'],
                 cached['x_test'], cached['y_test'],
                 [str(c) for c in cached['class_names']],
                 _constants('imagenet'))


# --------------------------------------------------------------------------
# Tiny ImageNet (the standard tiny-imagenet-200 folder).


def _tiny_root(data_dir: str) -> pathlib.Path:
  base = pathlib.Path(data_dir).expanduser()
  for cand in (base, base / 'tiny-imagenet-200'):
    if (cand / 'wnids.txt').is_file():
      return cand
  raise DataError(
      f'Tiny ImageNet not found: no wnids.txt in {base} or '
      f'{base / "tiny-imagenet-200"}; on a connected machine run `wget '
      'http://cs231n.stanford.edu/tiny-imagenet-200.zip && unzip '
      f'tiny-imagenet-200.zip -d {base}` there and copy '
      f"{base}/tiny-imagenet-200 to this machine's {base}")


def _image_files(folder: pathlib.Path) -> list[str]:
  return sorted(f for f in os.listdir(folder)
                if f.lower().endswith(('.jpeg', '.jpg', '.png')))


def _tiny_listing(root: pathlib.Path) -> tuple[
    list[str], list[str], list[int], list[str], list[int]]:
  """Returns (wnids, train paths, train labels, val paths, val labels)."""
  wnids = sorted({w.strip() for w in (root / 'wnids.txt').read_text().split()
                  if w.strip()})
  index = {w: i for i, w in enumerate(wnids)}
  train_paths, train_labels = [], []
  for w in wnids:
    img_dir = root / 'train' / w / 'images'
    if not img_dir.is_dir():
      raise DataError(f'Tiny ImageNet at {root} is incomplete: {img_dir} is '
                      'missing; re-extract tiny-imagenet-200.zip')
    files = _image_files(img_dir)
    train_paths += [str(img_dir / f) for f in files]
    train_labels += [index[w]] * len(files)
  val_paths, val_labels = [], []
  ann = root / 'val' / 'val_annotations.txt'
  if (root / 'val' / 'images').is_dir() and ann.is_file():
    for line in ann.read_text().splitlines():
      fields = line.split('\t')
      if len(fields) < 2 or not fields[0].strip():
        continue
      if fields[1] not in index:
        raise DataError(f'{ann}: unknown class {fields[1]!r} (not in '
                        'wnids.txt); re-extract tiny-imagenet-200.zip')
      val_paths.append(str(root / 'val' / 'images' / fields[0]))
      val_labels.append(index[fields[1]])
  else:  # Validation images already sorted into val/<wnid>/images/.
    for w in wnids:
      img_dir = root / 'val' / w / 'images'
      if img_dir.is_dir():
        files = _image_files(img_dir)
        val_paths += [str(img_dir / f) for f in files]
        val_labels += [index[w]] * len(files)
  if not val_paths:
    raise DataError(f'Tiny ImageNet at {root} has no validation images: '
                    f'expected {ann} and {root / "val" / "images"}; '
                    're-extract tiny-imagenet-200.zip')
  return wnids, train_paths, train_labels, val_paths, val_labels


def _tiny_class_names(root: pathlib.Path, wnids: list[str]) -> list[str]:
  words: dict[str, str] = {}
  words_file = root / 'words.txt'
  if words_file.is_file():
    for line in words_file.read_text().splitlines():
      if '\t' in line:
        wnid, text = line.split('\t', 1)
        words[wnid.strip()] = text.split(',')[0].strip()
  return [words.get(w, w) for w in wnids]


def load_tiny_imagenet(data_dir: str | None) -> Dataset:
  """Tiny ImageNet (200 classes, 64x64); its val split is the test set.

  Classes are in sorted-wnid order (torchvision ImageFolder's, as MTT). The
  ~110k JPEGs are decoded once and cached as uint8 npz next to the folder, or
  in $SEQMATCH_CACHE_DIR / ~/.cache/seqmatch_jax when that is read-only.
  """
  data_dir = _require_data_dir('tiny_imagenet', data_dir,
                               'the tiny-imagenet-200 folder or its parent')
  root = _tiny_root(data_dir)
  wnids, tr_paths, tr_labels, te_paths, te_labels = _tiny_listing(root)
  names = _tiny_class_names(root, wnids)
  size = TINY_RESOLUTION
  rel = [os.path.relpath(p, root) for p in tr_paths + te_paths]
  fingerprint = f'v{_CACHE_FORMAT}:tiny:{size}:' + hashlib.sha256(
      '\n'.join(rel + [str(v) for v in tr_labels + te_labels]).encode()
  ).hexdigest()
  path_tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:10]
  cdir = _cache_dir(root.parent)
  cache = None
  if cdir is not None:
    fname = (f'{root.name}_seqmatch_{size}px.npz' if cdir == root.parent else
             f'tiny_imagenet_{path_tag}_{size}px.npz')
    cache = cdir / fname
  cached = _load_cached_arrays(cache, fingerprint) if cache else None
  if cached is None:
    if not tr_paths:
      raise DataError(f'Tiny ImageNet at {root} has no training images under '
                      'train/<wnid>/images/; re-extract tiny-imagenet-200.zip')
    logging.info('Decoding %d Tiny ImageNet images from %s (one-off).',
                 len(tr_paths) + len(te_paths), root)
    where = f'Tiny ImageNet at {root}'
    x_tr = _decode_many(tr_paths, size, False, where)
    x_te = _decode_many(te_paths, size, False, where)
    cached = dict(x_train=x_tr, y_train=np.asarray(tr_labels, np.int32),
                  x_test=x_te, y_test=np.asarray(te_labels, np.int32),
                  class_names=np.asarray(names))
    _store_cache(cache, fingerprint, **cached)
  return _finish('tiny_imagenet', cached['x_train'], cached['y_train'],
                 cached['x_test'], cached['y_test'], names,
                 _constants('imagenet'))


# --------------------------------------------------------------------------
# A user's own npz file.


def _npz_image_shape(shape: tuple[int, ...], key: str,
                     path: str) -> tuple[int, int, int]:
  """(H, W, C) of an npz image array of `shape`, refusing other layouts.

  Checks the shape alone, so the CLI can run it on the file header before
  loading anything. A channels-first array would otherwise be read as 1xH
  (or 3xH) images with H channels and train without an error.
  """
  if len(shape) == 3:  # (N, H, W) greyscale: a channel axis is added.
    shape = (*shape, 1)
  if len(shape) != 4 or min(shape) == 0:
    raise DataError(f'{path}: {key} has shape {tuple(shape)}; expected '
                    'non-empty NHWC images (N, H, W, C)')
  if shape[1] in (1, 3) and shape[-1] not in (1, 3):
    raise DataError(
        f'{path}: {key} has shape {tuple(shape)}, which is channels-first '
        f'(N, C, H, W) but images must be NHWC (N, H, W, C); save '
        f'{key}.transpose(0, 2, 3, 1) instead')
  return int(shape[1]), int(shape[2]), int(shape[3])


def _npz_images(f, key: str, path: str) -> np.ndarray:
  x = f[key]
  _npz_image_shape(x.shape, key, path)
  if x.ndim == 3:  # (N, H, W) greyscale: add the channel axis.
    x = x[..., None]
  if x.dtype == np.uint8:
    return x
  if not np.issubdtype(x.dtype, np.floating):
    raise DataError(f'{path}: {key} has dtype {x.dtype}; use uint8 in 0..255 '
                    'or float in [0, 1]')
  if not np.all(np.isfinite(x)):
    raise DataError(f'{path}: {key} contains NaN or inf values; clean the '
                    'images before saving')
  lo, hi = float(x.min()), float(x.max())
  if lo < 0.0 or hi > 1.0:
    raise DataError(f'{path}: {key} float values span [{lo:.4g}, {hi:.4g}] '
                    'but must lie in [0, 1] (divide uint8 data by 255)')
  return x.astype(np.float32)


def _npz_labels(f, key: str, path: str, n: int) -> np.ndarray:
  y = f[key]
  if y.ndim == 2 and y.shape[1] == 1:
    y = y[:, 0]
  if y.ndim != 1 or len(y) != n:
    raise DataError(f'{path}: {key} has shape {y.shape}; expected ({n},) '
                    'integer labels, one per image')
  if not np.issubdtype(y.dtype, np.integer):
    raise DataError(f'{path}: {key} has dtype {y.dtype}; labels must be '
                    'integers 0..C-1')
  return y.astype(np.int64)


def _npz_path(data_dir: str | None) -> str:
  """The npz dataset's path, refusing a missing file or a directory."""
  path = _require_data_dir('npz', data_dir, 'the path of your .npz file')
  if os.path.isdir(path):
    found = sorted(p.name for p in pathlib.Path(path).glob('*.npz'))[:3]
    held = f' (it holds {", ".join(found)})' if found else ''
    raise DataError(f'npz dataset path {path} is a directory{held}; set '
                    '--config.dataset.data_dir to the .npz file itself, e.g. '
                    f'{os.path.join(path, found[0] if found else "data.npz")}')
  if not os.path.isfile(path):
    raise DataError(f'npz dataset file {path} does not exist; set '
                    '--config.dataset.data_dir to the path of an .npz with '
                    'x_train, y_train, x_test, y_test')
  return path


def _open_npz(path: str) -> np.lib.npyio.NpzFile:
  """Opens an npz archive lazily; a lone .npy array gets the exact fix."""
  try:
    # mmap: a large .npy given by mistake is not read just to refuse it.
    f = np.load(path, allow_pickle=False, mmap_mode='r')
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{path} is not a readable .npz file ({type(e).__name__}); '
                    're-save it with numpy.savez') from None
  if not isinstance(f, np.lib.npyio.NpzFile):
    raise DataError(f'{path} holds a single .npy array (shape {f.shape}), not '
                    'an .npz archive of the dataset; save it with '
                    'numpy.savez("data.npz", x_train=..., y_train=..., '
                    'x_test=..., y_test=...) and pass that file')
  return f


def _npz_array_shape(path: str, key: str) -> tuple[int, ...] | None:
  """Shape of `key` read from its .npy header only (None if unreadable)."""
  try:
    with zipfile.ZipFile(path) as z, z.open(f'{key}.npy') as f:
      version = np.lib.format.read_magic(f)
      read = (np.lib.format.read_array_header_1_0 if version == (1, 0) else
              np.lib.format.read_array_header_2_0)
      return tuple(read(f)[0])
  except Exception:  # pylint: disable=broad-except
    return None  # the loader reports what is wrong with the file


def load_npz(data_dir: str | None) -> Dataset:
  """A user's own dataset: `data_dir` is the path of an .npz file.

  Required keys x_train, y_train, x_test, y_test (images NHWC, or NHW for
  grey; uint8 0..255 or float in [0, 1]; integer labels 0..C-1); optional
  class_names (C strings). mean/std are computed from x_train.
  """
  path = _npz_path(data_dir)
  with _open_npz(path) as f:
    missing = [k for k in ('x_train', 'y_train', 'x_test', 'y_test')
               if k not in f.files]
    if missing:
      raise DataError(f'{path} lacks the key(s) {", ".join(missing)} (it has '
                      f'{", ".join(f.files) or "none"}); save all of x_train, '
                      'y_train, x_test, y_test')
    try:
      x_tr = _npz_images(f, 'x_train', path)
      x_te = _npz_images(f, 'x_test', path)
      y_tr = _npz_labels(f, 'y_train', path, len(x_tr))
      y_te = _npz_labels(f, 'y_test', path, len(x_te))
      names = ([str(c) for c in f['class_names'].reshape(-1)]
               if 'class_names' in f.files else None)
    except ValueError as e:  # e.g. object arrays refused by allow_pickle=False.
      raise DataError(f'{path}: cannot read arrays ({e}); save plain numeric '
                      'arrays (and class_names as a str array)') from None
  if x_tr.shape[1:] != x_te.shape[1:]:
    raise DataError(f'{path}: x_train images are {x_tr.shape[1:]} but x_test '
                    f'images are {x_te.shape[1:]}; both must share (H, W, C)')
  num_classes = len(names) if names is not None else int(
      max(y_tr.max(), y_te.max())) + 1
  for key, y in (('y_train', y_tr), ('y_test', y_te)):
    bad = np.unique(y[(y < 0) | (y >= num_classes)])
    if len(bad):
      raise DataError(
          f'{path}: {key} holds the labels {_few(bad)}, outside '
          f'0..{num_classes - 1}' + (' (one per class_names entry); relabel '
                                     'them or add their class_names' if names
                                     else '; relabel them to ids 0..C-1'))
  # Without class_names the classes are 0..max: a stray large label leaves a
  # gap of empty classes. Name the labels past the gap, not every empty class.
  present = set(np.unique(y_tr).tolist())
  gap = min(set(range(num_classes)) - present, default=None)
  if names is None and gap is not None:
    stray = np.unique(np.concatenate([y_tr, y_te]))
    stray = stray[stray > gap]
    empty = num_classes - len(present)
    raise DataError(f'{path}: the labels {_few(stray)} leave {empty} '
                    f'class{"es" if empty > 1 else ""} from {gap} on without '
                    'training images; labels must be consecutive ids 0..C-1: '
                    'relabel them (or save class_names)')
  _check_all_classes(path, y_tr, num_classes, 'y_train',
                     'relabel to consecutive ids 0..C-1 or add images')
  if names is None:
    names = [str(i) for i in range(num_classes)]
  return _finish('npz', x_tr, y_tr, x_te, y_te, names, None)


# --------------------------------------------------------------------------
# Registry and public functions.

DATASETS: dict[str, Callable[[str | None], Dataset]] = {
    'digits': load_digits_dataset,
    'mnist': functools.partial(_load_tfds_small, 'mnist', 'mnist',
                               stats_key='mnist'),
    'fashion_mnist': functools.partial(_load_tfds_small, 'fashion_mnist',
                                       'fashion_mnist',
                                       stats_key='fashion_mnist'),
    'svhn_cropped': functools.partial(_load_tfds_small, 'svhn_cropped',
                                      'svhn_cropped', stats_key='svhn_cropped'),
    'svhn': functools.partial(_load_tfds_small, 'svhn_cropped', 'svhn_cropped',
                              stats_key='svhn_cropped'),  # Alias.
    'cifar10': functools.partial(_load_tfds_small, 'cifar10', 'cifar10',
                                 stats_key='cifar10'),
    'cifar100': functools.partial(_load_tfds_small, 'cifar100', 'cifar100',
                                  stats_key='cifar100'),
    'tiny_imagenet': load_tiny_imagenet,
    'imagenette_fastai': load_imagenette_fastai,
    'npz': load_npz,
    **{subset: functools.partial(load_imagenet_subset, subset)
       for subset in IMAGENET_SUBSETS},
}


def dataset_names() -> list[str]:
  """All names `load_dataset` accepts (aliases included), sorted."""
  return sorted(DATASETS)


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
  """Loads a registered dataset; an unknown name lists the valid ones."""
  key = name.strip().lower().replace('-', '_')
  if key not in DATASETS:
    raise DataError(f'unknown dataset {name!r}; choose one of: '
                    f'{", ".join(dataset_names())}')
  return DATASETS[key](data_dir)


# (H, W, C) of the registered datasets whose size is fixed by their loader.
_IMAGE_SHAPES: dict[str, tuple[int, int, int]] = {
    'digits': (8, 8, 1),
    'mnist': (28, 28, 1),
    'fashion_mnist': (28, 28, 1),
    'svhn_cropped': (32, 32, 3),
    'svhn': (32, 32, 3),
    'cifar10': (32, 32, 3),
    'cifar100': (32, 32, 3),
    'tiny_imagenet': (TINY_RESOLUTION, TINY_RESOLUTION, 3),
    'imagenette_fastai': (IMAGENET_RESOLUTION, IMAGENET_RESOLUTION, 3),
    **{subset: (IMAGENET_RESOLUTION, IMAGENET_RESOLUTION, 3)
       for subset in IMAGENET_SUBSETS},
}


def peek_image_shape(name: str,
                     data_dir: str | None = None) -> tuple[int, int, int] | None:
  """(H, W, C) of a dataset's images without loading it; None if unknown.

  Lets the CLI refuse a network too deep for the images, and a misplaced or
  channels-first npz, in a second instead of after minutes of loading. For
  npz only the file header is read; its problems raise the loader's DataError.
  """
  key = name.strip().lower().replace('-', '_')
  if key != 'npz':
    return _IMAGE_SHAPES.get(key)
  path = _npz_path(data_dir)
  _open_npz(path).close()
  shape = _npz_array_shape(path, 'x_train')
  return None if shape is None else _npz_image_shape(shape, 'x_train', path)


def _balanced_quotas(capacity: np.ndarray, total: int,
                     rng: np.random.Generator) -> np.ndarray:
  """Spreads `total` over classes as evenly as each class's capacity allows."""
  quotas = np.zeros_like(capacity)
  remaining = total
  while remaining > 0:
    open_classes = np.flatnonzero(quotas < capacity)
    share = remaining // len(open_classes)
    if share == 0:  # Fewer left than open classes: a seeded random few get +1.
      quotas[rng.choice(open_classes, remaining, replace=False)] += 1
      break
    add = np.minimum(share, capacity[open_classes] - quotas[open_classes])
    quotas[open_classes] += add
    remaining -= int(add.sum())
  return quotas


def split_validation(
    ds: Dataset, val_size: int, seed: int
) -> tuple[Dataset, tuple[np.ndarray, np.ndarray]]:
  """Carves a class-balanced validation set out of the training set.

  Model selection must never look at the test set (a reference bug picks the
  "best" iteration on it). Deterministic in `seed`; every class keeps at least
  one training image. Returns (dataset with the reduced train set,
  (x_val, y_val)); both keep the original image order.
  """
  y = ds.y_train
  if val_size < 0:
    raise ConfigError(f'validation size must be >= 0, got {val_size}; fix '
                      '--config.dataset.val_size')
  if val_size == 0:
    return ds, (ds.x_train[:0].copy(), y[:0].copy())
  counts = np.bincount(y, minlength=ds.num_classes)
  capacity = np.maximum(counts - 1, 0)
  if val_size > capacity.sum():
    raise ConfigError(
        f'validation size {val_size} is too large for {ds.name}: its '
        f'{len(y)} training images allow at most {int(capacity.sum())} '
        '(one image per class must stay in training); lower '
        '--config.dataset.val_size')
  rng = np.random.default_rng(seed)
  quotas = _balanced_quotas(capacity, val_size, rng)
  val_mask = np.zeros(len(y), bool)
  for c in np.flatnonzero(quotas):
    members = np.flatnonzero(y == c)
    val_mask[rng.permutation(members)[:quotas[c]]] = True
  reduced = dataclasses.replace(ds, x_train=ds.x_train[~val_mask],
                                y_train=y[~val_mask])
  return reduced, (ds.x_train[val_mask], y[val_mask])
