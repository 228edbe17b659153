"""Input pipeline: offline toy datasets and TFDS image classification, no TF.

One entry point, `load(config.data)`, returns a `Dataset` of host numpy arrays:
train, validation (carved from the training split by `split_seed`) and
optionally test. Images stay uint8 on the host (4x less memory and transfer than
float32); the jittable `preprocess` casts and normalises them on device and
`augment` applies random crops and flips to training batches only. Evaluation
(validation rewards, test accuracy) never augments.

Sources:
  * `digits`: scikit-learn's 8x8 handwritten digits (1797 images, values
    0..16), split into train/validation/test by `split_seed`. Offline.
  * `mnist1d`: Greydanus 2020, 40-sample 1D signals of 10 digit templates,
    generated locally with the package's default arguments (4000 train / 1000
    test). Offline; never downloads.
  * Any TFDS image classification dataset with fixed-size `image` and a
    `label` ClassLabel (mnist, fashion_mnist, cifar10, cifar100, svhn_cropped,
    ...), read through `tfds.data_source`, which needs the dataset prepared in
    `array_record` format. Loading never downloads; a missing dataset raises a
    `DataError` that says how to prepare it.

Typical use:

  ds = data.load(config.data)
  x = data.preprocess(ds.train.images[idx], ds.mean, ds.std)  # [B, H, W, C]
  x = data.augment(rng, x, random_crop_padding=4, horizontal_flip=True)
"""

import dataclasses
import difflib
import functools
import os
import random
import threading
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict
import numpy as np

BUILTIN_DATASETS = ("digits", "mnist1d")
# TFDS datasets known to work; any TFDS dataset with fixed-size `image` and a
# ClassLabel `label` feature works too.
TFDS_DATASETS = (
    "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn_cropped")

# Examples read per `__getitems__` call: large enough to amortise the Python
# overhead, small enough to keep the per-call memory low.
_READ_CHUNK = 2048
# Pixels per chunk when accumulating normalisation statistics in float64, so
# that a float64 copy of CIFAR-10's 45k train images (1.1 GB) never exists.
_STATS_CHUNK = 1 << 18


# Returned as `test` by sources without a test split: carve it from train.
_NO_TEST_SPLIT = object()


class DataError(ValueError):
  """A user-fixable data problem; the message names the problem and the fix."""


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """Examples of one split, on the host.

  Attributes:
    images: [N, *input_shape]; uint8 for image datasets, float32 for mnist1d.
    labels: [N] int32 class ids in [0, num_classes).
  """
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return int(self.labels.shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A loaded dataset. Arrays are read-only (they may be shared by a cache).

  Attributes:
    train: training examples (the training split minus validation).
    validation: held-out examples for rewards / model selection.
    test: test examples, or None unless `load(..., with_test=True)`.
    num_classes: number of classes.
    input_shape: per-example shape, e.g. (32, 32, 3) or (40, 1).
    mean: [C] float32 per-channel mean of `train` (raw units, e.g. 0..255).
    std: [C] float32 per-channel standard deviation of `train`.
    name: the dataset name from the config.
  """
  train: Split
  validation: Split
  test: Optional[Split]
  num_classes: int
  input_shape: tuple[int, ...]
  mean: np.ndarray
  std: np.ndarray
  name: str


# Defaults per dataset: (validation_size, test_size, crop padding, flip).
_DEFAULTS = {
    # 1797 examples, no official split: 300 validation and 300 test leave
    # 1197 for training. Digits are not flip-invariant; 8x8 is too small to
    # crop.
    "digits": (300, 300, 0, False),
    # Official 4000/1000 train/test split (Greydanus 2020); 1D signals.
    "mnist1d": (500, 0, 0, False),
    # Zoph & Le 2017, sec. 4.1: 5,000 of the 50,000 training images are held out
    # as the validation set that gives the controller's reward. Augmentation:
    # pad 4 pixels, random 32x32 crop, random horizontal flip (He et al. 2016,
    # sec. 4.2), as in ENAS's child training (Pham et al. 2018, sec. 4.1). Zoph
    # & Le 2017 describe the same in-image random translation and flips.
    "cifar10": (5000, 0, 4, True),
    "cifar100": (5000, 0, 4, True),
    # Digit datasets: flips change the class; validation held out like CIFAR.
    "mnist": (5000, 0, 0, False),
    "fashion_mnist": (5000, 0, 0, False),
    "svhn_cropped": (5000, 0, 0, False),
}


def get_data_config(name: str = "digits") -> ml_collections.ConfigDict:
  """Returns the data config (`config.data`) with defaults for `name`."""
  validation_size, test_size, padding, flip = _DEFAULTS.get(
      name, (5000, 0, 0, False))
  config = ml_collections.ConfigDict()
  # 'digits' / 'mnist1d' (built in, offline) or a TFDS image classification
  # dataset name.
  config.name = name
  # TFDS data_dir holding the prepared dataset; None: $TFDS_DATA_DIR or
  # ~/tensorflow_datasets. Ignored by the built-in datasets.
  config.data_dir = config_dict.placeholder(str)
  # Examples held out of the training split for validation (controller rewards).
  config.validation_size = validation_size
  # Examples held out of the training split as the test set, only for datasets
  # without a test split (digits, some TFDS datasets).
  config.test_size = test_size
  # Seed of the permutation that carves validation (and test) out of train.
  config.split_seed = 0
  config.augment = ml_collections.ConfigDict()
  # Zero-pad by this many pixels, then crop back to size at random; 0 = off.
  config.augment.random_crop_padding = padding
  # Flip each training image left-right with probability 1/2.
  config.augment.horizontal_flip = flip
  return config


# ----------------------------------------------------------------------------
# Device-side transforms.


@jax.jit
def preprocess(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """Casts to float32 and normalises per channel.

  Args:
    images: [B, *input_shape], any dtype (uint8 on the host is fine).
    mean: [C] per-channel mean, C = input_shape[-1].
    std: [C] per-channel standard deviation.

  Returns:
    [B, *input_shape] float32, `(images - mean) / std`.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (jnp.asarray(images).astype(jnp.float32) - mean) / std


@functools.partial(
    jax.jit, static_argnames=("random_crop_padding", "horizontal_flip"))
def augment(rng: jax.Array, images: jax.Array, *, random_crop_padding: int,
            horizontal_flip: bool) -> jax.Array:
  """Random crop with zero padding and random horizontal flip, per example.

  Apply after `preprocess`, so the zero padding is the mean pixel (as ENAS pads
  its normalised images). Only for training batches.

  Args:
    rng: a PRNG key.
    images: [B, H, W, C] float. With both augmentations off any shape passes
      through unchanged.
    random_crop_padding: pad H and W by this much on each side, then crop a
      random H x W window; 0 disables cropping.
    horizontal_flip: flip each image along W with probability 1/2.

  Returns:
    [B, H, W, C], same dtype as `images`.
  """
  if not random_crop_padding and not horizontal_flip:
    return images
  if images.ndim != 4:
    raise ValueError(
        f"augment expects NHWC images, got shape {images.shape}; set "
        "augment.random_crop_padding=0 and augment.horizontal_flip=False for "
        "non-image data.")
  b, h, w, c = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  if random_crop_padding:
    p = random_crop_padding
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    # Offsets in [0, 2p]: the crop moves at most p pixels in each direction.
    offsets = jax.random.randint(crop_rng, (b, 2), 0, 2 * p + 1)
    crop = lambda x, o: jax.lax.dynamic_slice(x, (o[0], o[1], 0), (h, w, c))
    images = jax.vmap(crop)(padded, offsets)
  if horizontal_flip:
    flip = jax.random.bernoulli(flip_rng, 0.5, (b, 1, 1, 1))
    images = jnp.where(flip, images[:, :, ::-1, :], images)
  return images


# ----------------------------------------------------------------------------
# Loading.


def load(data_config: ml_collections.ConfigDict, *,
         with_test: bool = False) -> Dataset:
  """Loads a dataset and carves validation out of its training split.

  The train/validation split depends only on `name`, `split_seed`,
  `validation_size` and `test_size`, never on `with_test`.

  Args:
    data_config: see `get_data_config`.
    with_test: also return the test split (TFDS test splits are read only then).

  Returns:
    A `Dataset` whose `mean`/`std` are computed on its `train` part only.

  Raises:
    DataError: unknown dataset, missing or unprepared data, bad split sizes.
  """
  name = data_config.name
  if name == "digits":
    pool, test, num_classes = _digits()
  elif name == "mnist1d":
    pool, test, num_classes = _mnist1d()
  else:
    pool, test, num_classes = _tfds(name, data_config.get("data_dir"),
                                    with_test)
  validation_size = int(data_config.validation_size)
  test_size = int(data_config.test_size) if test is _NO_TEST_SPLIT else 0
  if validation_size < 0 or test_size < 0:
    raise DataError(
        f"data.validation_size={validation_size} and data.test_size="
        f"{test_size} must be >= 0.")
  if validation_size + test_size >= len(pool):
    raise DataError(
        f"data.validation_size={validation_size}"
        + (f" plus data.test_size={test_size}" if test_size else "")
        + f" must be smaller than the {len(pool)} training examples of "
        f"{name!r}; lower it.")
  if test is _NO_TEST_SPLIT and with_test and not test_size:
    raise DataError(
        f"{name!r} has no test split; set data.test_size > 0 to carve a test "
        "set out of the training split.")

  # One permutation of the training split: [test | validation | train].
  perm = np.random.default_rng(int(data_config.split_seed)).permutation(
      len(pool))
  # Sorted indices keep the gathers sequential in memory.
  test_idx = np.sort(perm[:test_size])
  val_idx = np.sort(perm[test_size:test_size + validation_size])
  train_idx = np.sort(perm[test_size + validation_size:])
  train = _take(pool, train_idx)
  if test is _NO_TEST_SPLIT:
    test = _take(pool, test_idx) if with_test else None
  mean, std = _channel_stats(train.images)
  return Dataset(
      train=train,
      validation=_take(pool, val_idx),
      test=test if with_test else None,
      num_classes=num_classes,
      input_shape=tuple(int(d) for d in pool.images.shape[1:]),
      mean=_readonly(mean),
      std=_readonly(std),
      name=name)


def _readonly(x: np.ndarray) -> np.ndarray:
  x.flags.writeable = False
  return x


def _make_split(images: np.ndarray, labels: np.ndarray) -> Split:
  return Split(_readonly(images), _readonly(labels.astype(np.int32)))


def _take(split: Split, idx: np.ndarray) -> Split:
  return _make_split(split.images[idx], split.labels[idx])


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std ([C] float32) of [N, ..., C], exact in float64."""
  c = images.shape[-1]
  flat = images.reshape(-1, c)
  total = np.zeros(c, np.float64)
  total_sq = np.zeros(c, np.float64)
  for start in range(0, len(flat), _STATS_CHUNK):
    chunk = flat[start:start + _STATS_CHUNK].astype(np.float64)
    total += chunk.sum(0)
    total_sq += np.einsum("ij,ij->j", chunk, chunk)
  count = max(len(flat), 1)
  mean = total / count
  var = np.maximum(total_sq / count - np.square(mean), 0.0)
  # A constant channel would divide by zero; leave it unscaled instead.
  std = np.where(var > 0, np.sqrt(var), 1.0)
  return mean.astype(np.float32), std.astype(np.float32)


@functools.lru_cache(maxsize=None)
def _digits() -> tuple[Split, object, int]:
  """sklearn digits: [1797, 8, 8, 1] uint8 in 0..16, no test split."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = digits.images.astype(np.uint8)[..., None]
  return _make_split(images, digits.target), _NO_TEST_SPLIT, 10


@functools.lru_cache(maxsize=None)
def _mnist1d() -> tuple[Split, Split, int]:
  """MNIST-1D: train [4000, 40, 1] and test [1000, 40, 1] float32 signals."""
  # `get_dataset` downloads and writes a pickle into the cwd; generate instead.
  # pylint: disable-next=g-import-not-at-top
  from mnist1d.data import get_dataset_args, make_dataset
  # make_dataset seeds the global `random` / `np.random` generators; restore
  # them so loading data does not change the caller's random streams.
  py_state, np_state = random.getstate(), np.random.get_state()
  try:
    data = make_dataset(get_dataset_args())
  finally:
    random.setstate(py_state)
    np.random.set_state(np_state)
  as_split = lambda x, y: _make_split(x.astype(np.float32)[..., None], y)
  return (as_split(data["x"], data["y"]),
          as_split(data["x_test"], data["y_test"]), 10)


# ----------------------------------------------------------------------------
# TFDS.

# Decoded splits keyed by (name, data_dir, split); see `clear_cache`.
_TFDS_CACHE: dict[tuple[str, Optional[str], str], Split] = {}
_TFDS_LOCK = threading.Lock()


def clear_cache() -> None:
  """Forgets the decoded TFDS splits kept in this process."""
  with _TFDS_LOCK:
    _TFDS_CACHE.clear()


def _unknown_dataset(name: str, candidates=()) -> DataError:
  close = difflib.get_close_matches(
      name, [*BUILTIN_DATASETS, *TFDS_DATASETS, *candidates], n=3)
  hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
  return DataError(
      f"Unknown dataset {name!r}.{hint} Set data.name to a built-in dataset "
      f"({', '.join(BUILTIN_DATASETS)}), to one of the TFDS datasets "
      f"{', '.join(TFDS_DATASETS)}, or to any TFDS image classification "
      "dataset with fixed-size 'image' and 'label' features.")


def _prepare_hint(name: str, data_dir: str) -> str:
  return (
      "On a machine with network access, prepare it once with\n"
      "  pip install 'rlnas[prepare]'  # TensorFlow, only needed to build\n"
      f"  tfds build {name} --data_dir={data_dir} --file_format=array_record\n"
      f"then copy {data_dir}/ here, or point data.data_dir at the folder that "
      "holds it.")


def _tfds(name: str, data_dir: Optional[str],
          with_test: bool) -> tuple[Split, Any, int]:
  """Reads a TFDS split 'train' (and 'test') into uint8 arrays.

  Returns:
    (train [N, H, W, C] uint8, test, num_classes); test is a Split, None when
    not asked for, or _NO_TEST_SPLIT.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if ":" in name.split("/")[0] and not name.split(":")[-1][:1].isdigit():
    raise DataError(
        f"data.name={name!r} names a community dataset ('namespace:name'), "
        "which TFDS fetches over the network; rlnas loads offline only. Use a "
        "TFDS catalog name prepared with `tfds build`.")
  if data_dir is not None:
    try:
      exists = _is_dir(data_dir)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(
          f"data.data_dir={data_dir!r} is not reachable ({e}); set it to a "
          "readable folder that holds prepared TFDS datasets.") from e
    if not exists:
      raise DataError(
          f"data.data_dir={data_dir!r} does not exist. Set it to the folder "
          "you passed as --data_dir to `tfds build`, or to None for "
          "$TFDS_DATA_DIR (default ~/tensorflow_datasets).")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except ValueError as e:  # DatasetNotFoundError, or a malformed name.
    raise _unknown_dataset(
        name, tfds.list_builders(with_community_datasets=False)) from e

  features = builder.info.features
  image = features["image"] if "image" in features else None
  label = features["label"] if "label" in features else None
  if (not isinstance(image, tfds.features.Image)
      or not isinstance(label, tfds.features.ClassLabel)):
    raise DataError(
        f"TFDS dataset {name!r} is not image classification: it needs an "
        f"'image' Image and a 'label' ClassLabel feature, it has {features}. "
        "Choose another data.name.")
  shape = tuple(image.shape)
  if None in shape or np.dtype(image.np_dtype) != np.uint8:
    raise DataError(
        f"TFDS dataset {name!r} has images of shape {shape} and dtype "
        f"{image.np_dtype}; rlnas needs fixed-size uint8 images. Choose "
        "another data.name.")

  shown_dir = data_dir or os.environ.get("TFDS_DATA_DIR",
                                         "~/tensorflow_datasets")
  try:
    train_source = tfds.data_source(
        name, split="train", data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    # The only cheap, mock-compatible check: the real data source refuses.
    if not builder.is_prepared():
      raise DataError(
          f"TFDS dataset {name!r} is not prepared in {shown_dir} (no "
          f"{builder.data_dir}); rlnas never downloads while loading.\n"
          + _prepare_hint(name, shown_dir)) from e
    formats = builder.info.available_file_formats()
    if formats.isdisjoint(tfds.core.FileFormat.with_random_access()):
      raise DataError(
          f"TFDS dataset {name!r} in {builder.data_dir} is stored as "
          f"{', '.join(sorted(f.value for f in formats))}, which needs "
          "TensorFlow to read; rlnas reads array_record through "
          "tfds.data_source. Rebuild it with --file_format=array_record "
          "(add --overwrite to replace this copy).\n"
          + _prepare_hint(name, shown_dir)) from e
    raise DataError(
        f"TFDS dataset {name!r} in {builder.data_dir} could not be opened "
        f"({type(e).__name__}: {e}); the copy may be incomplete. Rebuild it.\n"
        + _prepare_hint(name, shown_dir)) from e

  # Real datasets know their splits; mocked ones report none (assume both).
  splits = set(builder.info.splits.keys())
  if splits and "train" not in splits:
    raise DataError(
        f"TFDS dataset {name!r} has no 'train' split (it has "
        f"{sorted(splits)}); choose another data.name.")
  key = (name, data_dir)
  train = _read_cached(key, "train", lambda: train_source, shape)
  test = _NO_TEST_SPLIT
  if not splits or "test" in splits:
    if with_test:
      test = _read_cached(key, "test", lambda: tfds.data_source(
          name, split="test", data_dir=data_dir, download=False), shape)
    else:
      test = None
  return train, test, int(label.num_classes)


def _is_dir(path: str) -> bool:
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path).is_dir()


def _read_cached(key, split: str, open_source, shape) -> Split:
  with _TFDS_LOCK:
    cached = _TFDS_CACHE.get((*key, split))
  if cached is None:
    cached = _read_split(open_source(), shape)
    with _TFDS_LOCK:
      _TFDS_CACHE[(*key, split)] = cached
  return cached


def _read_split(source: Any, shape: tuple[int, ...]) -> Split:
  """Decodes a TFDS data source into [N, *shape] uint8 images and [N] labels."""
  n = len(source)
  images = np.empty((n, *shape), np.uint8)
  labels = np.empty((n,), np.int32)
  batched = hasattr(source, "__getitems__")
  for start in range(0, n, _READ_CHUNK):
    keys = list(range(start, min(start + _READ_CHUNK, n)))
    examples = None
    if batched:
      try:
        examples = source.__getitems__(keys)
      except (TypeError, NotImplementedError, AttributeError):
        # E.g. under tfds.testing.mock_data; read one at a time instead.
        batched = False
    if examples is None:
      examples = [source[k] for k in keys]
    for i, example in zip(keys, examples):
      images[i] = example["image"]
      labels[i] = example["label"]
  return _make_split(images, labels)
