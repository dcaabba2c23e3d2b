"""Tests for seqmatch_jax.data: loaders on tiny files in their real formats."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from seqmatch_jax import data
from seqmatch_jax.data import datasets as datasets_lib
from seqmatch_jax.data import preprocess as preprocess_lib
from seqmatch_jax.errors import ConfigError, DataError

_SMALL_TFDS = ('mnist', 'fashion_mnist', 'svhn_cropped', 'cifar10', 'cifar100')
_CIFAR10_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog',
                  'frog', 'horse', 'ship', 'truck']
_MEOW = [i for i, _ in data.IMAGENET_SUBSETS['imagemeow']]


def _label_image(feature, label: int, rng: np.random.Generator,
                 flat: bool) -> Image.Image:
  """An image whose content encodes its label, to catch image/label mix-ups.

  Lossless (PNG) images carry the label in pixel (0, 0); lossy (JPEG) ones are
  a flat grey of 10 + 20 * label on a random-sized canvas.
  """
  h, w, c = feature.shape
  if flat:
    h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
    arr = np.full((h, w, c), 10 + 20 * label, np.uint8)
  else:
    arr = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    arr[0, 0, :] = label
  return Image.fromarray(arr[..., 0] if c == 1 else arr)


def _build_fake_tfds(data_dir: pathlib.Path, tfds_name: str,
                     split_labels: dict[str, list[int]], flat: bool = False,
                     label_of=lambda k: k,
                     label_names: list[str] | None = None) -> None:
  """Writes a real array_record dataset with tfds' own writer, no TensorFlow.

  Subclasses the registered builder (so features/dataset_info are exactly
  what `tfds build` would write) and only replaces the example generators.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  base_name, _, config = tfds_name.partition('/')
  base_cls = tfds.builder_cls(base_name)

  def split_generators(self, dl_manager):
    del dl_manager
    if label_names:  # As the CIFAR builders do from the downloaded meta file.
      self.info.features['label'].names = label_names

    def gen(split, labels):
      rng = np.random.default_rng(len(split))
      for i, k in enumerate(labels):
        ex = {}
        for key, feat in self.info.features.items():
          if isinstance(feat, tfds.features.Image):
            ex[key] = _label_image(feat, label_of(k), rng, flat)
          elif isinstance(feat, tfds.features.ClassLabel):
            ex[key] = k if key == 'label' else 0
          else:
            ex[key] = f'{split}_{i}'
        yield f'{split}_{i}', ex

    return {s: gen(s, labels) for s, labels in split_labels.items()}

  fake = type('Fake', (base_cls,), {'_split_generators': split_generators},
              skip_registration=True)
  fake.name = base_name
  builder = fake(data_dir=str(data_dir), file_format='array_record',
                 **({'config': config} if config else {}))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          manual_dir=str(data_dir / 'manual')))


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  root = tmp_path_factory.mktemp('tfds')
  for name in _SMALL_TFDS:
    _build_fake_tfds(root, name, {'train': [i % 10 for i in range(23)],
                                  'test': [i % 10 for i in range(7)]},
                     label_names=_CIFAR10_NAMES if name == 'cifar10' else None)
  # ImageNet: all ten imagemeow classes plus two classes it must skip.
  train = _MEOW * 2 + [0, 999]
  _build_fake_tfds(root, 'imagenet2012',
                   {'train': train, 'validation': _MEOW[:4] + [500]},
                   flat=True, label_of=lambda k: _MEOW.index(k) if k in _MEOW
                   else 12)
  _build_fake_tfds(root, 'imagenette/full-size-v2',
                   {'train': list(range(10)) * 2, 'validation': [3, 7]},
                   flat=True)
  return root


# ---------------------------------------------------------------- registry


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(DataError) as e:
    data.load_dataset('cifar11')
  msg = str(e.value)
  assert "'cifar11'" in msg and 'cifar10' in msg and 'digits' in msg
  assert '\n' not in msg


def test_registry_names():
  names = data.dataset_names()
  assert names == sorted(data.DATASETS)
  for required in ('digits', 'mnist', 'fashion_mnist', 'svhn_cropped', 'svhn',
                   'cifar10', 'cifar100', 'tiny_imagenet', 'npz', 'imagenette',
                   'imagewoof', 'imagefruit', 'imagemeow', 'imagesquawk',
                   'imageyellow'):
    assert required in names
  for subset, classes in data.IMAGENET_SUBSETS.items():
    ids = [i for i, _ in classes]
    assert len(ids) == 10 == len(set(ids)), subset
    assert all(0 <= i < 1000 for i in ids)
  assert [i for i, _ in data.IMAGENET_SUBSETS['imagesquawk']] == [
      84, 130, 88, 144, 145, 22, 96, 9, 100, 89]


# ---------------------------------------------------------------- digits


def test_digits_shapes_range_and_stratified_split():
  ds = data.load_dataset('digits')
  assert ds.name == 'digits'
  assert ds.x_train.shape == (1347, 8, 8, 1)
  assert ds.x_test.shape == (450, 8, 8, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10
  assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
  assert ds.class_names == tuple(str(i) for i in range(10))
  # Stratified: every class's test share matches its overall share to +-1.
  total = np.bincount(np.concatenate([ds.y_train, ds.y_test]))
  expected = total * 450 / total.sum()
  assert np.all(np.abs(np.bincount(ds.y_test) - expected) <= 1)
  np.testing.assert_allclose(ds.mean, ds.x_train.mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(ds.std, ds.x_train.std((0, 1, 2)), rtol=1e-4)
  again = data.load_dataset('digits')
  np.testing.assert_array_equal(ds.x_test, again.x_test)
  np.testing.assert_array_equal(ds.y_train, again.y_train)


# ---------------------------------------------------------------- tfds


def test_tfds_needs_data_dir():
  with pytest.raises(DataError, match=r'--config\.dataset\.data_dir'):
    data.load_dataset('cifar10', None)


def test_tfds_missing_names_path_and_command(tmp_path):
  with pytest.raises(DataError) as e:
    data.load_dataset('cifar10', str(tmp_path))
  msg = str(e.value)
  assert str(tmp_path) in msg and '\n' not in msg
  assert (f'tfds build cifar10 --data_dir={tmp_path} '
          '--file_format=array_record') in msg
  with pytest.raises(DataError, match='--manual_dir'):
    data.load_dataset('imagewoof', str(tmp_path))


def test_tfds_tfrecord_copy_gets_array_record_fix(tmp_path):
  version_dir = tmp_path / 'cifar10' / '3.0.2'
  version_dir.mkdir(parents=True)
  (version_dir / 'dataset_info.json').write_text('{}')
  (version_dir / 'cifar10-train.tfrecord-00000-of-00001').write_bytes(b'')
  with pytest.raises(DataError, match='TFRecord.*--file_format=array_record'):
    data.load_dataset('cifar10', str(tmp_path))


def test_tfds_broken_copy_is_a_data_error(tmp_path):
  version_dir = tmp_path / 'mnist' / '3.0.1'
  version_dir.mkdir(parents=True)
  (version_dir / 'dataset_info.json').write_text('not json')
  (version_dir / 'mnist-train.array_record-00000-of-00001').write_bytes(b'x')
  with pytest.raises(DataError, match='could not open'):
    data.load_dataset('mnist', str(tmp_path))


@pytest.mark.parametrize('name', _SMALL_TFDS + ('svhn',))
def test_tfds_loaders(tfds_dir, name):
  ds = data.load_dataset(name, str(tfds_dir))
  grey = name in ('mnist', 'fashion_mnist')
  shape = (28, 28, 1) if grey else (32, 32, 3)
  assert ds.x_train.shape == (23,) + shape and ds.x_test.shape == (7,) + shape
  assert ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int32
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
  assert ds.name == ('svhn_cropped' if name == 'svhn' else name)
  # Pixel (0, 0) carries the label: images and labels stayed aligned.
  for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
    np.testing.assert_array_equal(np.round(x[:, 0, 0, 0] * 255), y)
  assert sorted(ds.y_train.tolist()) == sorted(i % 10 for i in range(23))
  assert ds.num_classes == (100 if name == 'cifar100' else 10)
  assert ds.mean.shape == ds.std.shape == (shape[-1],)
  if name == 'cifar10':
    assert ds.class_names[:2] == ('airplane', 'automobile')
    np.testing.assert_allclose(ds.mean, [0.4914, 0.4822, 0.4465])
    np.testing.assert_allclose(ds.std, [0.2023, 0.1994, 0.2010])
  if name == 'mnist':
    np.testing.assert_allclose(ds.mean, [0.1307])
    np.testing.assert_allclose(ds.std, [0.3081])


def test_tfds_damaged_records_are_a_data_error(tfds_dir, tmp_path):
  shutil.copytree(tfds_dir / 'mnist', tmp_path / 'mnist')
  (shard,) = (tmp_path / 'mnist').glob('*/mnist-train.array_record-*')
  raw = bytearray(shard.read_bytes())
  raw[100:-200] = bytes((b * 7 + 3) % 256 for b in raw[100:-200])
  shard.write_bytes(bytes(raw))
  with pytest.raises(DataError, match="split 'train' of mnist.*damaged"):
    data.load_dataset('mnist', str(tmp_path))


def test_tfds_accepts_the_dataset_folder_itself(tfds_dir):
  ds = data.load_dataset('mnist', str(tfds_dir / 'mnist'))
  assert ds.x_train.shape == (23, 28, 28, 1)


def _forbid_tfds(monkeypatch):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  def boom(*args, **kwargs):
    raise AssertionError('tfds read although a cache exists')

  monkeypatch.setattr(tfds, 'data_source', boom)


def test_imagenet_subset_filters_resizes_and_caches(tfds_dir, monkeypatch):
  with monkeypatch.context() as m:
    m.setattr(datasets_lib, '_DECODE_BATCH', 3)  # Several decode batches.
    ds = data.load_dataset('imagemeow', str(tfds_dir))
  assert ds.x_train.shape == (20, 128, 128, 3)
  assert ds.x_test.shape == (4, 128, 128, 3)
  assert ds.name == 'imagemeow' and ds.num_classes == 10
  assert ds.class_names[0] == 'tabby_cat'
  np.testing.assert_array_equal(np.bincount(ds.y_train), [2] * 10)
  assert sorted(ds.y_test.tolist()) == [0, 1, 2, 3]
  # Each image is a flat grey encoding its subset label: mapping is right.
  for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
    np.testing.assert_allclose(x.mean((1, 2, 3)) * 255, 10 + 20 * y, atol=3)
  np.testing.assert_allclose(ds.mean, [0.485, 0.456, 0.406])
  caches = list((tfds_dir / 'seqmatch_cache').glob('imagemeow_128px_*.npz'))
  assert len(caches) == 1
  with monkeypatch.context() as m:
    _forbid_tfds(m)
    cached = data.load_dataset('imagemeow', str(tfds_dir))
  np.testing.assert_array_equal(cached.x_train, ds.x_train)
  np.testing.assert_array_equal(cached.y_test, ds.y_test)
  caches[0].write_bytes(b'corrupt')  # A corrupt cache is rebuilt, not trusted.
  rebuilt = data.load_dataset('imagemeow', str(tfds_dir))
  np.testing.assert_array_equal(rebuilt.x_train, ds.x_train)


def test_imagenet_subset_missing_class_is_reported(tfds_dir):
  with pytest.raises(DataError, match='no images'):
    data.load_dataset('imagesquawk', str(tfds_dir))


def test_imagenette_fastai(tfds_dir):
  ds = data.load_dataset('imagenette_fastai', str(tfds_dir))
  assert ds.x_train.shape == (20, 128, 128, 3) and ds.num_classes == 10
  np.testing.assert_array_equal(np.bincount(ds.y_train), [2] * 10)
  np.testing.assert_allclose(ds.x_test.mean((1, 2, 3)) * 255,
                             10 + 20 * ds.y_test, atol=3)
  assert len(ds.class_names) == 10


def test_resize_center_crop_keeps_centre():
  img = np.zeros((100, 300, 3), np.uint8)
  img[:, 100:200] = 255  # Centre square white, side bands black.
  out = datasets_lib._decode_rgb(
      _png_bytes(img), 50, center_crop=True)  # pylint: disable=protected-access
  assert out.shape == (50, 50, 3)
  assert out[5:-5, 5:-5].min() > 200  # Only the white centre survives.


def _png_bytes(arr: np.ndarray) -> bytes:
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format='PNG')
  return buf.getvalue()


# ---------------------------------------------------------------- tiny


def _fake_tiny(parent: pathlib.Path) -> pathlib.Path:
  root = parent / 'tiny-imagenet-200'
  wnids = ['n0300', 'n0100', 'n0200']  # Unsorted, as in the real file.
  (root / 'val' / 'images').mkdir(parents=True)
  (root / 'wnids.txt').write_text('\n'.join(wnids) + '\n')
  (root / 'words.txt').write_text(
      'n0100\tgoldfish, Carassius auratus\nn0200\tlion\nn0300\tbus, coach\n'
      'n9999\tunused\n')
  order = sorted(wnids)
  for w in wnids:
    d = root / 'train' / w / 'images'
    d.mkdir(parents=True)
    for j in range(2):
      value = 10 + 40 * order.index(w)
      mode = 'L' if j == 1 else 'RGB'  # Some Tiny ImageNet JPEGs are grey.
      Image.new(mode, (64, 64), value if mode == 'L' else (value,) * 3).save(
          d / f'{w}_{j}.JPEG')
  lines = []
  for j, w in enumerate(['n0200', 'n0100', 'n0300', 'n0200']):
    Image.new('RGB', (64, 64), (10 + 40 * order.index(w),) * 3).save(
        root / 'val' / 'images' / f'val_{j}.JPEG')
    lines.append(f'val_{j}.JPEG\t{w}\t0\t0\t10\t10')
  (root / 'val' / 'val_annotations.txt').write_text('\n'.join(lines) + '\n')
  return root


def test_tiny_imagenet_folder_and_cache(tmp_path, monkeypatch):
  root = _fake_tiny(tmp_path)
  ds = data.load_dataset('tiny_imagenet', str(tmp_path))  # Parent dir.
  assert ds.x_train.shape == (6, 64, 64, 3)
  assert ds.x_test.shape == (4, 64, 64, 3)
  assert ds.class_names == ('goldfish', 'lion', 'bus')  # Sorted wnids.
  np.testing.assert_array_equal(np.bincount(ds.y_train), [2, 2, 2])
  np.testing.assert_array_equal(ds.y_test, [1, 0, 2, 1])
  for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
    np.testing.assert_allclose(x.mean((1, 2, 3)) * 255, 10 + 40 * y, atol=3)
  cache = tmp_path / 'tiny-imagenet-200_seqmatch_64px.npz'
  assert cache.is_file()

  def no_decode(*args, **kwargs):
    raise AssertionError('decoded although a cache exists')

  with monkeypatch.context() as m:
    m.setattr(datasets_lib, '_decode_many', no_decode)
    again = data.load_dataset('tiny_imagenet', str(root))  # Folder itself.
  np.testing.assert_array_equal(again.x_train, ds.x_train)
  cache.write_bytes(b'\x00' * 10)  # Corrupt: rebuilt.
  rebuilt = data.load_dataset('tiny_imagenet', str(root))
  np.testing.assert_array_equal(rebuilt.x_test, ds.x_test)
  # New images make the cache stale: it is rebuilt, not reused.
  Image.new('RGB', (64, 64), (0, 0, 0)).save(
      root / 'train' / 'n0100' / 'images' / 'n0100_9.JPEG')
  assert len(data.load_dataset('tiny_imagenet', str(root)).x_train) == 7


def test_tiny_imagenet_val_sorted_into_class_folders(tmp_path):
  root = _fake_tiny(tmp_path)  # The layout SeqMatch's download script makes.
  for line in (root / 'val' / 'val_annotations.txt').read_text().splitlines():
    name, wnid = line.split('\t')[:2]
    (root / 'val' / wnid / 'images').mkdir(parents=True, exist_ok=True)
    (root / 'val' / 'images' / name).rename(
        root / 'val' / wnid / 'images' / name)
  (root / 'val' / 'images').rmdir()
  ds = data.load_dataset('tiny_imagenet', str(root))
  np.testing.assert_array_equal(ds.y_test, [0, 1, 1, 2])
  np.testing.assert_allclose(ds.x_test.mean((1, 2, 3)) * 255,
                             10 + 40 * ds.y_test, atol=3)


def test_tiny_imagenet_cache_falls_back_when_read_only(tmp_path, monkeypatch):
  root = _fake_tiny(tmp_path / 'ro')
  alt = tmp_path / 'alt'
  monkeypatch.setenv('SEQMATCH_CACHE_DIR', str(alt))
  real = datasets_lib._writable_dir  # pylint: disable=protected-access
  monkeypatch.setattr(datasets_lib, '_writable_dir',
                      lambda p: p != root.parent and real(p))
  ds = data.load_dataset('Tiny-ImageNet', str(root))  # Name is normalised.
  assert ds.name == 'tiny_imagenet' and ds.num_classes == 3
  assert not list(root.parent.glob('*.npz'))
  assert len(list(alt.glob('tiny_imagenet_*_64px.npz'))) == 1


def test_tiny_imagenet_damaged_jpeg(tmp_path):
  root = _fake_tiny(tmp_path)
  bad = root / 'train' / 'n0200' / 'images' / 'n0200_1.JPEG'
  bad.write_bytes(b'not a jpeg')
  with pytest.raises(DataError, match='cannot decode .*n0200_1.JPEG'):
    data.load_dataset('tiny_imagenet', str(root))


def test_tiny_imagenet_missing(tmp_path):
  with pytest.raises(DataError, match='tiny-imagenet-200.zip') as e:
    data.load_dataset('tiny_imagenet', str(tmp_path))
  assert str(tmp_path) in str(e.value)


# ---------------------------------------------------------------- npz


def _valid_npz_arrays() -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  return dict(
      x_train=rng.integers(0, 256, (12, 5, 5, 3), dtype=np.uint8),
      y_train=np.arange(12) % 3,
      x_test=rng.integers(0, 256, (4, 5, 5, 3), dtype=np.uint8),
      y_test=np.array([0, 1, 2, 1]),
  )


def test_npz_valid_uint8_and_float(tmp_path):
  arrays = _valid_npz_arrays()
  path = tmp_path / 'mine.npz'
  np.savez(path, class_names=np.array(['a', 'b', 'c']), **arrays)
  ds = data.load_dataset('npz', str(path))
  assert ds.name == 'npz' and ds.class_names == ('a', 'b', 'c')
  np.testing.assert_allclose(ds.x_train, arrays['x_train'] / 255.0, atol=1e-6)
  np.testing.assert_array_equal(ds.y_test, arrays['y_test'])
  np.testing.assert_allclose(ds.mean, ds.x_train.mean((0, 1, 2)), rtol=1e-5)
  # Float in [0, 1], greyscale NHW, no class names.
  grey = dict(x_train=np.linspace(0, 1, 12 * 16).reshape(12, 4, 4),
              y_train=np.arange(12) % 2, x_test=np.zeros((2, 4, 4)),
              y_test=np.array([1, 0]))
  np.savez(tmp_path / 'grey.npz', **grey)
  ds = data.load_dataset('npz', str(tmp_path / 'grey.npz'))
  assert ds.image_shape == (4, 4, 1) and ds.class_names == ('0', '1')
  assert ds.x_train.dtype == np.float32


@pytest.mark.parametrize('change, pattern', [
    (dict(x_test=None), 'lacks the key.*x_test'),
    (dict(x_train=np.full((12, 5, 5, 3), np.nan)), 'x_train contains NaN'),
    (dict(x_train=np.full((12, 5, 5, 3), 2.0)), r'x_train float.*\[0, 1\]'),
    (dict(x_train=np.zeros((12, 5, 5, 3), np.int64)), 'x_train has dtype'),
    (dict(x_test=np.zeros((4, 6, 5, 3), np.uint8)), 'share'),
    (dict(x_train=np.zeros((12, 5), np.uint8)), 'x_train has shape'),
    (dict(y_train=np.arange(11) % 3), r'y_train has shape \(11,\)'),
    (dict(y_train=(np.arange(12) % 3).astype(np.float32)), 'y_train has dtype'),
    (dict(y_test=np.array([0, 1, 2, -1])), r'y_test holds the labels -1, outside 0\.\.2'),
    # The stray labels are named, not every class they leave empty.
    (dict(y_train=np.arange(12) % 3 * 2), 'the labels 2, 4 leave 2 classes from 1 on'),
    (dict(class_names=np.array(['a', 'b'])),
     r'y_train holds the labels 2, outside 0\.\.1 \(one per class_names entry'),
])
def test_npz_malformed(tmp_path, change, pattern):
  arrays = _valid_npz_arrays()
  for key, value in change.items():
    if value is None:
      del arrays[key]
    else:
      arrays[key] = value
  path = tmp_path / 'bad.npz'
  np.savez(path, **arrays)
  with pytest.raises(DataError, match=pattern) as e:
    data.load_dataset('npz', str(path))
  assert '\n' not in str(e.value)


def test_npz_missing_or_corrupt_file(tmp_path):
  with pytest.raises(DataError, match='does not exist'):
    data.load_dataset('npz', str(tmp_path / 'nope.npz'))
  (tmp_path / 'junk.npz').write_bytes(b'not a zip')
  with pytest.raises(DataError, match='not a readable'):
    data.load_dataset('npz', str(tmp_path / 'junk.npz'))
  with pytest.raises(DataError, match='data_dir'):
    data.load_dataset('npz', None)


def test_npz_path_mistakes_get_the_fix(tmp_path):
  np.save(tmp_path / 'x.npy', np.zeros((4, 5, 5, 3), np.uint8))
  with pytest.raises(DataError, match='single .npy array.*numpy.savez'):
    data.load_dataset('npz', str(tmp_path / 'x.npy'))
  folder = tmp_path / 'folder'
  folder.mkdir()
  with pytest.raises(DataError, match='is a directory; set --config.dataset'):
    data.load_dataset('npz', str(folder))
  np.savez(folder / 'mine.npz', **_valid_npz_arrays())
  with pytest.raises(DataError, match=r'holds mine.npz.*folder/mine.npz'):
    data.load_dataset('npz', str(folder))


@pytest.mark.parametrize('channels', [1, 3])
def test_npz_channels_first_is_refused(tmp_path, channels):
  arrays = _valid_npz_arrays()
  arrays['x_train'] = np.zeros((12, channels, 5, 5), np.uint8)
  arrays['x_test'] = np.zeros((4, channels, 5, 5), np.uint8)
  np.savez(tmp_path / 'nchw.npz', **arrays)
  for load in (data.load_dataset, data.peek_image_shape):
    with pytest.raises(DataError, match=r'channels-first.*transpose\(0, 2, 3, 1\)'):
      load('npz', str(tmp_path / 'nchw.npz'))


def test_npz_peek_reads_the_header_only(tmp_path):
  np.savez(tmp_path / 'ok.npz', **_valid_npz_arrays())
  assert data.peek_image_shape('npz', str(tmp_path / 'ok.npz')) == (5, 5, 3)
  (tmp_path / 'junk.npz').write_bytes(b'not a zip')
  with pytest.raises(DataError, match='not a readable'):
    data.peek_image_shape('npz', str(tmp_path / 'junk.npz'))
  assert data.peek_image_shape('digits') == (8, 8, 1)
  assert data.peek_image_shape('no_such_set') is None


# ---------------------------------------------------------------- validation


def _toy_dataset(n_per_class=(10, 10, 10), shape=(2, 2, 1)) -> data.Dataset:
  y = np.repeat(np.arange(len(n_per_class)), n_per_class).astype(np.int32)
  x = np.random.default_rng(1).random((len(y),) + shape, np.float32)
  return data.Dataset('toy', x, y, x[:3], y[:3],
                      tuple(str(i) for i in range(len(n_per_class))),
                      np.zeros(shape[-1], np.float32),
                      np.ones(shape[-1], np.float32))


def test_split_validation_stratified_disjoint_deterministic():
  ds = _toy_dataset((10, 10, 10))
  reduced, (x_val, y_val) = data.split_validation(ds, 7, seed=3)
  counts = np.bincount(y_val, minlength=3)
  assert counts.sum() == 7 and counts.max() - counts.min() <= 1
  assert len(reduced.y_train) == 23 and reduced.x_test is ds.x_test
  rows = lambda a: {r.tobytes() for r in a.reshape(len(a), -1)}
  assert not rows(x_val) & rows(reduced.x_train)
  assert rows(x_val) | rows(reduced.x_train) == rows(ds.x_train)
  again = data.split_validation(ds, 7, seed=3)
  np.testing.assert_array_equal(again[1][0], x_val)
  other = data.split_validation(ds, 7, seed=4)
  assert not np.array_equal(other[1][0], x_val)


def test_split_validation_small_classes_and_edges():
  ds = _toy_dataset((2, 10, 10))  # Class 0 can give only one image.
  reduced, (_, y_val) = data.split_validation(ds, 9, seed=0)
  np.testing.assert_array_equal(np.bincount(y_val), [1, 4, 4])
  assert np.all(np.bincount(reduced.y_train) >= 1)
  reduced, (x_val, y_val) = data.split_validation(ds, 0, seed=0)
  assert reduced is ds
  assert x_val.shape == (0, 2, 2, 1) and y_val.shape == (0,)
  assert y_val.dtype == np.int32
  with pytest.raises(ConfigError, match='too large'):
    data.split_validation(ds, 20, seed=0)


# ---------------------------------------------------------------- preprocess


def _correlated_dataset(n=400, shape=(4, 4, 3)) -> data.Dataset:
  """Smooth, correlated images (like natural ones) in [0, 1]."""
  rng = np.random.default_rng(0)
  d = int(np.prod(shape))
  mix = rng.normal(size=(8, d))
  x = rng.normal(size=(n, 8)) @ mix * 0.05 + 0.02 * rng.normal(size=(n, d))
  x = np.clip(0.5 + x, 0, 1).astype(np.float32).reshape((n,) + shape)
  y = (np.arange(n) % 4).astype(np.int32)
  return data.Dataset('corr', x, y, x[:10], y[:10], ('a', 'b', 'c', 'd'),
                      np.full(shape[-1], 0.5, np.float32),
                      np.full(shape[-1], 0.25, np.float32))


def test_normalisation_without_zca():
  ds = _correlated_dataset()
  pre = data.fit_preprocessor(ds, zca=False)
  assert not pre.use_zca and pre.zca_whiten is None
  x = ds.x_test
  np.testing.assert_allclose(pre.to_model(x), (x - 0.5) / 0.25, rtol=1e-6)
  out = pre.to_model(jnp.asarray(x))
  assert isinstance(out, jax.Array)
  np.testing.assert_allclose(np.asarray(out), (x - 0.5) / 0.25, rtol=1e-6)
  np.testing.assert_allclose(pre.to_pixels(pre.to_model(x)), x, atol=1e-6)


def test_zca_round_trip_and_whitening(tmp_path):
  ds = _correlated_dataset()
  x = ds.x_train.reshape(len(ds.x_train), -1).astype(np.float64)
  cov = np.cov(x, rowvar=False)  # Unbiased, as kornia.
  for eps in (0.1, 1e-2):
    pre = data.fit_preprocessor(ds, zca=True, eps=eps)
    assert pre.use_zca and pre.zca_whiten.shape == (48, 48)
    w = pre.zca_whiten.astype(np.float64)
    # W is the symmetric inverse square root of (cov + eps I).
    np.testing.assert_allclose(w, w.T, atol=1e-5)
    np.testing.assert_allclose(w @ w @ (cov + eps * np.eye(48)), np.eye(48),
                               atol=1e-4)
    np.testing.assert_allclose(w @ pre.zca_unwhiten, np.eye(48), atol=1e-4)
    z = pre.to_model(ds.x_train)
    assert z.shape == ds.x_train.shape and z.dtype == np.float32
    # Whitened covariance = cov (cov + eps)^-1: identity shrunk by eps.
    s = np.linalg.eigvalsh(cov)
    cov_z = np.cov(z.reshape(len(z), -1).astype(np.float64), rowvar=False)
    np.testing.assert_allclose(np.linalg.eigvalsh(cov_z),
                               np.sort(s / (s + eps)), atol=1e-4)
    assert np.abs(z.reshape(len(z), -1).mean(0)).max() < 1e-4
    np.testing.assert_allclose(pre.to_pixels(z), ds.x_train, atol=2e-5)
  # Tiny eps: whitened covariance is the identity where the data has variance.
  pre = data.fit_preprocessor(ds, zca=True, eps=1e-9)
  z = pre.to_model(ds.x_train).reshape(len(ds.x_train), -1).astype(np.float64)
  np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(48), atol=2e-3)


def test_zca_on_jax_arrays_and_under_jit():
  ds = _correlated_dataset()
  pre = data.fit_preprocessor(ds, zca=True)
  x = ds.x_test
  expected = pre.to_model(x)
  out = jax.jit(pre.to_model)(jnp.asarray(x))
  assert isinstance(out, jax.Array) and out.shape == x.shape
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
  back = pre.to_pixels(out)
  np.testing.assert_allclose(np.asarray(back), x, atol=2e-5)
  # Gradients flow through (the distilled pixels are trained in pixel space).
  g = jax.grad(lambda v: jnp.sum(pre.to_model(v)))(jnp.asarray(x))
  assert g.shape == x.shape and bool(jnp.all(jnp.isfinite(g)))
  with pytest.raises(ValueError, match='H\\*W\\*C=48'):
    pre.to_model(np.zeros((2, 5, 5, 3), np.float32))


def test_zca_cache_reuse_and_corrupt_refit(tmp_path, monkeypatch):
  ds = _correlated_dataset()
  first = data.fit_preprocessor(ds, zca=True, cache_dir=str(tmp_path))
  files = list(tmp_path.glob('zca_corr_4x4x3_eps0.1_*.npz'))
  assert len(files) == 1
  calls = []
  real_fit = preprocess_lib._fit_zca  # pylint: disable=protected-access

  def counting_fit(*args):
    calls.append(1)
    return real_fit(*args)

  monkeypatch.setattr(preprocess_lib, '_fit_zca', counting_fit)
  second = data.fit_preprocessor(ds, zca=True, cache_dir=str(tmp_path))
  assert not calls  # Loaded, not refitted.
  np.testing.assert_array_equal(second.zca_whiten, first.zca_whiten)
  files[0].write_bytes(b'PK\x03\x04 truncated')
  third = data.fit_preprocessor(ds, zca=True, cache_dir=str(tmp_path))
  assert len(calls) == 1
  np.testing.assert_allclose(third.zca_whiten, first.zca_whiten, atol=1e-6)
  fourth = data.fit_preprocessor(ds, zca=True, cache_dir=str(tmp_path))
  assert len(calls) == 1  # The refit rewrote a good cache.
  np.testing.assert_array_equal(fourth.zca_unwhiten, third.zca_unwhiten)
  # Different data or eps -> a different cache entry, never a stale one.
  changed = dataclasses.replace(ds, x_train=ds.x_train[::-1] * 0.9)
  data.fit_preprocessor(changed, zca=True, cache_dir=str(tmp_path))
  data.fit_preprocessor(ds, zca=True, cache_dir=str(tmp_path), eps=0.2)
  assert len(calls) == 3
  assert len(list(tmp_path.glob('zca_*.npz'))) == 3


def test_zca_refuses_high_resolution():
  ds = _toy_dataset((1, 1), shape=(128, 128, 3))
  with pytest.raises(DataError, match='dataset.zca=False'):
    data.fit_preprocessor(ds, zca=True)
