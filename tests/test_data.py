"""Tests for rlnas.data: splits, statistics, TFDS loading and augmentation.

Everything runs offline and without TensorFlow: TFDS is exercised under
`tfds.testing.mock_data` and on a tiny mnist prepared here in array_record
format from PNGs encoded with Pillow.
"""

import importlib.resources
import io
import random
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from rlnas import data


def _config(name, **overrides):
  config = data.get_data_config(name)
  config.update(overrides)
  return config


def _rows(split):
  """The set of examples of a split, as bytes, for disjointness checks."""
  return {x.tobytes() for x in split.images}


def _assert_disjoint(*splits):
  rows = [_rows(s) for s in splits]
  assert sum(map(len, rows)) == len(set().union(*rows))


# ----------------------------------------------------------------------------
# Built-in datasets.


def test_digits_splits_shapes_and_dtypes():
  ds = data.load(_config("digits"), with_test=True)
  # 1797 sklearn digits = 300 test + 300 validation + 1197 train.
  assert (len(ds.train), len(ds.validation), len(ds.test)) == (1197, 300, 300)
  assert ds.input_shape == (8, 8, 1) and ds.num_classes == 10
  for split in (ds.train, ds.validation, ds.test):
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
    assert split.images.shape[1:] == (8, 8, 1)
    assert split.images.max() <= 16 and 0 <= split.labels.min()
    assert split.labels.max() <= 9
  # Every example appears exactly once (all 1797 digits are distinct).
  _assert_disjoint(ds.train, ds.validation, ds.test)
  assert len(_rows(ds.train) | _rows(ds.validation) | _rows(ds.test)) == 1797
  assert ds.mean.shape == ds.std.shape == (1,)
  assert ds.mean.dtype == ds.std.dtype == np.float32
  assert ds.name == "digits"


def test_digits_split_is_deterministic_per_seed_and_ignores_with_test():
  a = data.load(_config("digits", split_seed=3), with_test=True)
  b = data.load(_config("digits", split_seed=3))
  c = data.load(_config("digits", split_seed=4), with_test=True)
  assert b.test is None
  np.testing.assert_array_equal(a.train.images, b.train.images)
  np.testing.assert_array_equal(a.validation.labels, b.validation.labels)
  np.testing.assert_array_equal(a.mean, b.mean)
  assert _rows(a.validation) != _rows(c.validation)
  assert _rows(a.test) != _rows(c.test)


def test_statistics_come_from_train_only():
  ds = data.load(_config("digits"), with_test=True)
  train = ds.train.images.astype(np.float64).reshape(-1, 1)
  np.testing.assert_allclose(ds.mean, train.mean(0), rtol=1e-6)
  np.testing.assert_allclose(ds.std, train.std(0), rtol=1e-6)
  everything = np.concatenate(
      [ds.train.images, ds.validation.images, ds.test.images])
  assert not np.allclose(ds.mean, everything.mean(), rtol=1e-6, atol=0)
  # Normalised training data is standardised per channel.
  x = np.asarray(data.preprocess(ds.train.images, ds.mean, ds.std))
  assert x.dtype == np.float32
  np.testing.assert_allclose(x.mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(x.std(), 1.0, atol=1e-5)


def test_mnist1d_uses_its_own_test_split():
  py_state, np_state = random.getstate(), np.random.get_state()
  data._mnist1d.cache_clear()  # Regenerate to check the RNG restoration.
  ds = data.load(_config("mnist1d"), with_test=True)
  # Loading must not reseed the caller's global generators.
  assert random.getstate() == py_state
  np.testing.assert_array_equal(np.random.get_state()[1], np_state[1])
  # Greydanus 2020: 4000 train / 1000 test; 500 of train held out.
  assert (len(ds.train), len(ds.validation), len(ds.test)) == (3500, 500, 1000)
  assert ds.input_shape == (40, 1) and ds.num_classes == 10
  assert ds.train.images.dtype == np.float32
  assert ds.train.labels.dtype == np.int32
  _assert_disjoint(ds.train, ds.validation, ds.test)
  other = data.load(_config("mnist1d", split_seed=1), with_test=True)
  np.testing.assert_array_equal(ds.test.images, other.test.images)
  assert _rows(ds.validation) != _rows(other.validation)
  assert _rows(ds.train) | _rows(ds.validation) == (
      _rows(other.train) | _rows(other.validation))


def test_arrays_are_read_only():
  ds = data.load(_config("digits"))
  with pytest.raises(ValueError):
    ds.train.images[0, 0, 0, 0] = 1


def test_get_data_config_defaults():
  cifar = data.get_data_config("cifar10")
  assert cifar.validation_size == 5000  # Zoph & Le 2017, sec. 4.1.
  assert cifar.augment.random_crop_padding == 4
  assert cifar.augment.horizontal_flip
  digits = data.get_data_config()
  assert digits.name == "digits" and digits.data_dir is None
  assert (digits.validation_size, digits.test_size) == (300, 300)
  assert not digits.augment.horizontal_flip
  digits.data_dir = "/some/dir"  # A placeholder(str): overridable later.


# ----------------------------------------------------------------------------
# TFDS, offline and without TensorFlow.


@pytest.mark.parametrize("name,shape,num_classes", [
    ("cifar10", (32, 32, 3), 10),
    ("mnist", (28, 28, 1), 10),
])
def test_tfds_mock(tmp_path, name, shape, num_classes):
  data.clear_cache()
  with tfds.testing.mock_data(num_examples=60):
    ds = data.load(_config(name, data_dir=str(tmp_path), validation_size=20),
                   with_test=True)
  assert (len(ds.train), len(ds.validation), len(ds.test)) == (40, 20, 60)
  assert ds.input_shape == shape and ds.num_classes == num_classes
  assert ds.train.images.dtype == np.uint8
  assert ds.train.labels.dtype == np.int32
  assert ds.mean.shape == (shape[-1],)
  _assert_disjoint(ds.train, ds.validation)
  data.clear_cache()


def test_tfds_mock_validation_too_large(tmp_path):
  data.clear_cache()
  with tfds.testing.mock_data(num_examples=10):
    with pytest.raises(data.DataError, match="smaller than the 10 training"):
      data.load(_config("cifar10", data_dir=str(tmp_path), validation_size=10))
  data.clear_cache()


def _prepare_fake_mnist(data_dir, sizes):
  """Writes a real array_record mnist with random images, without TensorFlow.

  Images are PNG-encoded with Pillow, so TFDS serialises them without TF.
  Relies on TFDS internals; skips the test if they changed.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  # TFDS reads `importlib_resources.abc` while locating checksums; the
  # standard library module is equivalent.
  sys.modules.setdefault("importlib_resources", importlib.resources)
  rng = np.random.default_rng(0)
  expected = {}

  def examples(split, n):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    expected[split] = (images, labels)
    for i in range(n):
      png = io.BytesIO()
      Image.fromarray(images[i]).save(png, format="PNG")
      png.seek(0)
      yield i, {"image": png, "label": int(labels[i])}

  try:
    builder = tfds.builder("mnist", data_dir=data_dir,
                           file_format="array_record")
    builder._split_generators = lambda _: {  # pylint: disable=protected-access
        split: examples(split, n) for split, n in sizes.items()}
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False,
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f"cannot fake-prepare a TFDS dataset here: {e!r}")
  return expected


def test_tfds_real_array_record(tmp_path):
  """The non-mocked path: batched reads and PNG decoding of real records."""
  expected = _prepare_fake_mnist(str(tmp_path), {"train": 50, "test": 12})
  data.clear_cache()
  config = _config("mnist", data_dir=str(tmp_path), validation_size=10)
  ds = data.load(config, with_test=True)
  assert (len(ds.train), len(ds.validation), len(ds.test)) == (40, 10, 12)
  assert ds.input_shape == (28, 28, 1)
  # The records come back in TFDS's shuffled order; compare as sets.
  train_images, train_labels = expected["train"]
  got = {x.tobytes(): y for x, y in zip(
      np.concatenate([ds.train.images, ds.validation.images])[..., 0],
      np.concatenate([ds.train.labels, ds.validation.labels]))}
  want = {x.tobytes(): y for x, y in zip(train_images, train_labels)}
  assert got == want
  assert _rows(ds.test) == {x[..., None].tobytes() for x in expected["test"][0]}
  pixels = ds.train.images.astype(np.float64)
  np.testing.assert_allclose(ds.mean, [pixels.mean()], rtol=1e-6)
  data.clear_cache()


def test_tfds_prepared_as_tfrecord(tmp_path):
  """A copy built without --file_format=array_record gets its own message."""
  _prepare_fake_mnist(str(tmp_path), {"train": 4, "test": 2})
  # Pretend it was built in the default TFRecord format, which needs TF.
  (info_path,) = tmp_path.glob("mnist/*/dataset_info.json")
  info_path.write_text(info_path.read_text().replace(
      '"fileFormat": "array_record"', '"fileFormat": "tfrecord"'))
  data.clear_cache()
  with pytest.raises(data.DataError) as e:
    data.load(_config("mnist", data_dir=str(tmp_path), validation_size=1))
  message = str(e.value)
  assert "is stored as tfrecord" in message
  assert "--file_format=array_record" in message and "--overwrite" in message


# ----------------------------------------------------------------------------
# Errors a user can make.


def test_unknown_dataset():
  with pytest.raises(data.DataError) as e:
    data.load(_config("cifar-10"))
  message = str(e.value)
  assert "Unknown dataset 'cifar-10'" in message
  assert "Did you mean 'cifar10'" in message
  assert "digits" in message and "mnist1d" in message
  assert isinstance(e.value, ValueError)


def test_unprepared_tfds_dataset(tmp_path):
  with pytest.raises(data.DataError) as e:
    data.load(_config("cifar10", data_dir=str(tmp_path)))
  message = str(e.value)
  assert "'cifar10' is not prepared" in message
  assert (f"tfds build cifar10 --data_dir={tmp_path} "
          "--file_format=array_record") in message
  assert "pip install 'rlnas[prepare]'" in message
  assert not list(tmp_path.iterdir())  # Nothing was downloaded or written.


def test_nonexistent_data_dir(tmp_path):
  missing = str(tmp_path / "missing")
  with pytest.raises(data.DataError, match="does not exist") as e:
    data.load(_config("cifar10", data_dir=missing))
  assert missing in str(e.value)


def test_community_dataset_is_refused():
  with pytest.raises(data.DataError, match="offline only"):
    data.load(_config("huggingface:mnist"))


def test_validation_size_too_large():
  with pytest.raises(data.DataError) as e:
    data.load(_config("digits", validation_size=1600))
  assert "validation_size=1600" in str(e.value)
  assert "smaller than the 1797 training examples" in str(e.value)


def test_missing_test_split_needs_test_size():
  with pytest.raises(data.DataError, match="set data.test_size > 0"):
    data.load(_config("digits", test_size=0), with_test=True)


# ----------------------------------------------------------------------------
# Augmentation.


def _images(b=16, h=8, w=8, c=3):
  # Distinct, left-right asymmetric values so every flip and shift shows.
  return jax.random.uniform(jax.random.key(0), (b, h, w, c)) + 1.0


def test_augment_off_is_identity():
  x = _images()
  y = data.augment(jax.random.key(1), x, random_crop_padding=0,
                   horizontal_flip=False)
  np.testing.assert_array_equal(x, y)
  signals = np.ones((4, 40, 1), np.float32)  # 1D data passes through.
  np.testing.assert_array_equal(data.augment(
      jax.random.key(1), signals, random_crop_padding=0,
      horizontal_flip=False), signals)


def test_augment_flip():
  x = np.asarray(_images(b=64))
  y = np.asarray(data.augment(jax.random.key(1), x, random_crop_padding=0,
                              horizontal_flip=True))
  assert y.shape == x.shape and y.dtype == x.dtype
  flipped = np.all(y == x[:, :, ::-1], axis=(1, 2, 3))
  kept = np.all(y == x, axis=(1, 2, 3))
  assert np.all(flipped ^ kept)  # Each image is flipped or kept whole.
  assert 10 < flipped.sum() < 54  # About half of 64 (p < 1e-6 to fail).


def test_augment_crop_is_a_shifted_window_of_the_padded_image():
  p = 2
  x = np.asarray(_images())
  y = np.asarray(data.augment(jax.random.key(2), x, random_crop_padding=p,
                              horizontal_flip=False))
  assert y.shape == x.shape
  padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  offsets = []
  for i in range(len(x)):
    matches = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
               if np.array_equal(y[i], padded[i, dy:dy + 8, dx:dx + 8])]
    assert matches, f"example {i} is not a crop of its padded image"
    offsets.append(matches[0])
  assert len(set(offsets)) > 1  # Offsets are drawn per example.
  assert any(o != (p, p) for o in offsets)  # Some images actually moved.


def test_augment_rejects_non_images():
  with pytest.raises(ValueError, match="NHWC"):
    data.augment(jax.random.key(0), np.ones((4, 40, 1), np.float32),
                 random_crop_padding=0, horizontal_flip=True)
