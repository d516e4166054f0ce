"""Fashion-MNIST: the files, a tfds builder that checks them, and the pipelines.

Debian's `dataset-fashion-mnist` installs the real Fashion-MNIST in
`/usr/share/datasets/fashion-mnist`, but re-compressed: the gzip bytes differ
from upstream's, so tfds's own `fashion_mnist` builder rejects them on
checksum. `FashionMnistLocal` reads the same four IDX files from a folder and
checks the SHA-256 of their *decompressed* content, which is what identifies
the data; without those files tfds's own downloading builder is used.

The splits are small enough to hold in memory (`load_arrays`). Training
batches are a deterministic function of (seed, step): the example order of
epoch e is a stateless shuffle seeded by (seed, e) and every augmentation is
seeded by (seed, position in the stream). Resuming at step s therefore
replays exactly the batches an uninterrupted run would have seen.

Evaluation walks the whole split once, pads the last batch and marks padded
examples with mask 0, so every example is counted exactly once. Each image
goes through `eval_input`, which also prepares image files for a trained
network (`alexnet_jax.inference`: `file_image`, then `eval_input`), and
`pixels` turns an input back into the stored image. The images are grey:
`dataset.channel_order` has nothing to reorder.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax.data import common


# ---------------------------------------------------------------- files and builder

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
CLASS_NAMES = ('t-shirt/top', 'trouser', 'pullover', 'dress', 'coat', 'sandal',
               'shirt', 'sneaker', 'bag', 'ankle boot')
# SHA-256 of the decompressed IDX files of Fashion-MNIST (Xiao et al., 2017).
CONTENT_SHA256 = {
    'train-images-idx3-ubyte':
        'c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888',
    'train-labels-idx1-ubyte':
        'bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9',
    't10k-images-idx3-ubyte':
        '5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b',
    't10k-labels-idx1-ubyte':
        '0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34',
}
SPLITS = {'train': ('train', 60_000), 'test': ('t10k', 10_000)}
INSTRUCTIONS = f"""\
Fashion-MNIST was not found. Either
  * install Debian's copy:  sudo apt-get install -y dataset-fashion-mnist
    (puts the four *-ubyte.gz files in {DEBIAN_DIR}), or
  * put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
    t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from
    https://github.com/zalandoresearch/fashion-mnist in a folder and pass
    --config.dataset.manual_dir=FOLDER, or
  * on a machine with internet, tfds's own `fashion_mnist` download is used
    automatically when neither of the above is present."""


def read_idx(path: str) -> np.ndarray:
  """Reads a (possibly gzipped) IDX file into a uint8 array."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    raw = f.read()
  return parse_idx(raw, path)


def parse_idx(raw: bytes, name: str = 'IDX data') -> np.ndarray:
  if len(raw) < 8 or raw[:2] != b'\x00\x00' or raw[2] != 0x08:
    raise ValueError(f'{name} is not an unsigned-byte IDX file')
  ndim = raw[3]
  dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
  offset = 4 + 4 * ndim
  if len(raw) - offset != int(np.prod(dims)):
    raise ValueError(f'{name} is truncated: header says {dims}')
  return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def find_file(folder: str, stem: str) -> str | None:
  for name in (stem + '.gz', stem):
    path = os.path.join(folder, name)
    if os.path.exists(path):
      return path
  return None


def content_sha256(path: str) -> str:
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def verify_folder(folder: str) -> None:
  """Raises FileNotFoundError / ValueError unless `folder` holds the real data."""
  for stem, want in CONTENT_SHA256.items():
    path = find_file(folder, stem)
    if path is None:
      raise FileNotFoundError(f'{stem}(.gz) is missing from {folder}.\n{INSTRUCTIONS}')
    got = content_sha256(path)
    if want and got != want:
      raise ValueError(
          f'{path} does not hold Fashion-MNIST (content SHA-256 {got}, expected '
          f'{want}); the file is corrupt or another dataset.\n{INSTRUCTIONS}')


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from local IDX files, verified by content hash."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Reads the IDX files of Debian or upstream.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017), 28x28 grey.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(28, 28, 1)),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _split_generators(self, dl_manager):
    folder = str(dl_manager.manual_dir)
    verify_folder(folder)
    return {split: self._generate_examples(folder, prefix)
            for split, (prefix, _) in SPLITS.items()}

  def _generate_examples(self, folder, prefix):
    images = read_idx(find_file(folder, f'{prefix}-images-idx3-ubyte'))
    labels = read_idx(find_file(folder, f'{prefix}-labels-idx1-ubyte'))
    if len(images) != len(labels):
      raise ValueError(f'{folder}: {len(images)} images but {len(labels)} labels')
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image[:, :, None], 'label': int(label)}


# ---------------------------------------------------------------- pipelines


def _fashion_mnist_builder(config):
  """Local verified IDX files if present, else tfds's downloading builder."""
  manual_dir = config.dataset.manual_dir or DEBIAN_DIR
  data_dir = config.dataset.data_dir or None
  if find_file(manual_dir, 'train-images-idx3-ubyte'):
    builder = FashionMnistLocal(data_dir=data_dir)
    dl_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  else:
    builder = tfds.builder('fashion_mnist', data_dir=data_dir)
    dl_config = None
  try:
    builder.download_and_prepare(download_config=dl_config)
  except Exception as e:  # network errors have many types across tfds versions
    if isinstance(e, ValueError) and 'does not hold Fashion-MNIST' in str(e):
      raise
    raise common.DataNotFoundError(
        f'Could not prepare Fashion-MNIST ({type(e).__name__}: {e}).\n'
        f'{INSTRUCTIONS}') from e
  return builder


def load_arrays(config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Whole split as (uint8 images NHWC, int32 labels) for small datasets."""
  if config.dataset.name != 'fashion_mnist':
    raise ValueError(f'load_arrays only serves small datasets, not {config.dataset.name}')
  builder = _fashion_mnist_builder(config)
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1,
                                          as_supervised=True))
  images, labels = data
  return images, labels.astype(np.int32)


def train_dataset(config, images: np.ndarray, labels: np.ndarray, *,
                  local_batch: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
  """Infinite dataset of augmented training batches from in-memory arrays.

  Batch s is a pure function of (config.seed, s): epoch e's order is a
  stateless shuffle seeded by (seed, e) and batch s's augmentation is seeded
  by (seed, s), so resuming at `start_step` replays the same stream.

  With `process_count` > 1 every process holds all the arrays and yields
  its `local_batch` rows of each global batch of `local_batch *
  process_count`, augmented as in the whole batch: the global stream, and so
  the training, is the same for any number of processes.
  """
  n = len(images)
  global_batch = local_batch * process_count
  steps_per_epoch = n // global_batch
  if steps_per_epoch == 0:
    raise ValueError(f'{n} training examples cannot fill one batch of {global_batch}')
  mine = slice(process_index * local_batch, (process_index + 1) * local_batch)
  seed = tf.constant(config.seed, tf.int64)
  ds_cfg = config.dataset
  mean = tf.constant(ds_cfg.mean, tf.float32)
  std = tf.constant(ds_cfg.std, tf.float32)
  images_t = tf.constant(images)
  labels_t = tf.constant(labels)

  def epoch_batches(epoch):
    order = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64), seed=tf.stack([seed, epoch]))
    index = tf.reshape(order[:steps_per_epoch * global_batch],
                       [steps_per_epoch, global_batch])[:, mine]
    steps = epoch * steps_per_epoch + tf.range(steps_per_epoch, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices((steps, index))

  def load(step, index):
    image = common.crop_and_flip_batch(
        tf.gather(images_t, index), tf.stack([seed, -1 - step]),
        crop_padding=ds_cfg.crop_padding, flip=ds_cfg.random_flip,
        part=(process_index, process_count))
    return {'image': common._normalize(image, mean, std), 'label': tf.gather(labels_t, index)}

  first_epoch, skip = divmod(start_step, steps_per_epoch)
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch_batches).skip(skip)
  ds = ds.map(load, num_parallel_calls=2, deterministic=True)
  options = tf.data.Options()
  # One thread: the cores belong to the training step, and a 28x28 batch is
  # ready long before the step that consumes it.
  options.threading.private_threadpool_size = 1
  return ds.with_options(options).prefetch(4)


def eval_input(image_HWC, config, crops: str) -> tf.Tensor:
  """One stored uint8 image as evaluation feeds it to the network, float32.

  crops='ten': (10, H, W, C), the ten patches of `common.padded_ten_crops`;
  'center': (H, W, C), the image itself. Normalised by dataset.mean and
  dataset.std after cropping, so the zero padding is black, as in training.
  """
  ds_cfg = config.dataset
  x = common.padded_ten_crops(image_HWC, ds_cfg.crop_padding) if crops == 'ten' else image_HWC
  return common._normalize(x, np.asarray(ds_cfg.mean, np.float32),
                           np.asarray(ds_cfg.std, np.float32))


def file_image(data: bytes, config) -> tf.Tensor:
  """An image file's bytes as a stored image: (size, size, 1) uint8 grey.

  An image of the dataset's size keeps its pixels; any other is converted to
  grey and its central square rescaled to dataset.image_size. Eager only;
  raises tf.errors.InvalidArgumentError on bytes that are not an image.
  """
  square = common.file_square(tf.constant(data), config.dataset.image_size, channels=1)
  return tf.cast(tf.clip_by_value(tf.round(square), 0.0, 255.0), tf.uint8)


def pixels(inputs: np.ndarray, config) -> np.ndarray:
  """Centre-crop network inputs (..., H, W, 1) back to the stored uint8 images."""
  ds_cfg = config.dataset
  x = inputs * np.asarray(ds_cfg.std, np.float32) + np.asarray(ds_cfg.mean, np.float32)
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def eval_batches(config, images: np.ndarray, labels: np.ndarray, *,
                 local_batch: int, num_batches: int = 0,
                 crops: str = 'center') -> Iterator[common.Batch]:
  """Every example once, the last batch padded; `mask` is 1 for real examples.

  crops='ten': images are (B, 10, H, W, C), the ten patches of
  `common.padded_ten_crops`; the eval step averages their softmax. Every
  image goes through `eval_input`.

  With `num_batches`, batches of padding only (mask 0) follow up to that
  many, so that processes with different shares take part in the same
  number of cross-device evaluation steps.
  """
  ds = tf.data.Dataset.from_tensor_slices((images, labels))
  ds = ds.map(lambda x, y: (eval_input(x, config, crops), y))
  ds = ds.batch(local_batch).prefetch(2)
  image_shape = images.shape[1:] if crops != 'ten' else (10,) + images.shape[1:]
  done = 0
  for x, y in ds.as_numpy_iterator():
    done += 1
    yield common.pad_batch(
        {'image': x, 'label': y, 'mask': np.ones(len(y), np.float32)}, local_batch)
  empty = {'image': np.zeros((0,) + image_shape, np.float32),
           'label': np.zeros((0,), labels.dtype), 'mask': np.zeros((0,), np.float32)}
  for _ in range(done, num_batches):
    yield common.pad_batch(empty, local_batch)


def create_data(config, *, local_batch: int, eval_local_batch: int) -> common.Data:
  """The train/eval pipelines of Fashion-MNIST for this process.

  Training: every process keeps the whole (small) training set and takes its
  rows of each global batch. Evaluation: each process its own share.
  """
  train_images, train_labels = load_arrays(config, config.dataset.train_split)
  eval_images, eval_labels = load_arrays(config, config.dataset.eval_split)
  index, count = jax.process_index(), jax.process_count()
  largest_share = math.ceil(len(eval_images) / count)
  part = common.process_part(len(eval_images), index, count)
  eval_images, eval_labels = eval_images[part], eval_labels[part]
  return common.Data(
      train=lambda start: train_dataset(config, train_images, train_labels,
                                        local_batch=local_batch, start_step=start,
                                        process_index=index, process_count=count),
      eval=lambda crops='': eval_batches(
          config, eval_images, eval_labels, local_batch=eval_local_batch,
          num_batches=math.ceil(largest_share / eval_local_batch),
          crops=crops or config.dataset.eval_crops),
      steps_per_epoch=len(train_images) // (local_batch * count),
      num_train=len(train_images), num_eval=len(eval_images))
