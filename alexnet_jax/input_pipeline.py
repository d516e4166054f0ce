"""tf.data input pipelines.

Training batches are a deterministic function of (seed, step): the example
order of epoch e is a stateless shuffle seeded by (seed, e) and every
augmentation is seeded by (seed, position in the stream). Resuming at step s
therefore replays exactly the batches an uninterrupted run would have seen.

Evaluation walks the whole split once, pads the last batch and marks padded
examples with mask 0, so every example is counted exactly once.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax import fashion_mnist

Batch = dict[str, np.ndarray]


class DataNotFoundError(FileNotFoundError):
  """The dataset is not on this machine; the message says how to get it."""


def _fashion_mnist_builder(config):
  """Local verified IDX files if present, else tfds's downloading builder."""
  manual_dir = config.dataset.manual_dir or fashion_mnist.DEBIAN_DIR
  data_dir = config.dataset.data_dir or None
  if fashion_mnist.find_file(manual_dir, 'train-images-idx3-ubyte'):
    builder = fashion_mnist.FashionMnistLocal(data_dir=data_dir)
    dl_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  else:
    builder = tfds.builder('fashion_mnist', data_dir=data_dir)
    dl_config = None
  try:
    builder.download_and_prepare(download_config=dl_config)
  except Exception as e:  # network errors have many types across tfds versions
    if isinstance(e, ValueError) and 'does not hold Fashion-MNIST' in str(e):
      raise
    raise DataNotFoundError(
        f'Could not prepare Fashion-MNIST ({type(e).__name__}: {e}).\n'
        f'{fashion_mnist.INSTRUCTIONS}') from e
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


def process_part(n: int, index: int, count: int) -> slice:
  """Process `index`'s contiguous share of `n` examples split over `count`.

  Shares differ by at most one example and together cover all `n`.
  """
  per, extra = divmod(n, count)
  start = index * per + min(index, extra)
  return slice(start, start + per + (index < extra))


def _normalize(image, mean, std):
  return (tf.cast(image, tf.float32) - mean) / std


def crop_and_flip_batch(images_BHWC, seed, *, crop_padding: int, flip: bool,
                        part: tuple[int, int] = (0, 1)):
  """Random crops of the zero-padded images and horizontal flips, per example.

  Vectorised over the batch (two batched gathers), so the cost per example is
  a few memory copies rather than a few tf.data ops. `seed` is a stateless
  seed (shape [2]); the same seed gives the same crops and flips.

  `part=(i, k)`: the images are the i-th of k equal parts of a batch, and get
  the crops and flips they would get in the whole batch.
  """
  shape = tf.shape(images_BHWC)
  b, h, w = shape[0], shape[1], shape[2]
  p = crop_padding
  index, count = part
  mine = slice(index * b, (index + 1) * b)
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if p:
    images_BHWC = tf.pad(images_BHWC, [[0, 0], [p, p], [p, p], [0, 0]])
  offsets = tf.random.stateless_uniform([2, count * b], crop_seed, 0, 2 * p + 1,
                                        tf.int32)[:, mine]
  rows = offsets[0][:, None] + tf.range(h)[None, :]
  cols = offsets[1][:, None] + tf.range(w)[None, :]
  if flip:
    flipped = tf.random.stateless_uniform([count * b], flip_seed, 0, 2, tf.int32)[mine] > 0
    cols = tf.where(flipped[:, None], tf.reverse(cols, [1]), cols)
  out = tf.gather(images_BHWC, rows, axis=1, batch_dims=1)
  return tf.gather(out, cols, axis=2, batch_dims=1)


def crop(image: tf.Tensor, offsets: tf.Tensor, size: int) -> tf.Tensor:
  """The size x size patch of an (H, W, C) image at (row, col) `offsets`."""
  return tf.slice(image, tf.concat([offsets, [0]], 0), [size, size, -1])


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """The central size x size patch of an (H, W, C) image."""
  shape = tf.shape(image)
  return crop(image, tf.stack([(shape[0] - size) // 2, (shape[1] - size) // 2]), size)


def ten_crops(image: tf.Tensor, size: int) -> tf.Tensor:
  """(10, size, size, C): the four corners, the centre, then their mirror images."""
  shape = tf.shape(image)
  bottom, right = shape[0] - size, shape[1] - size
  corners = [crop(image, tf.stack([r, c]), size)
             for r, c in ((0, 0), (0, right), (bottom, 0), (bottom, right))]
  five = tf.stack(corners + [center_crop(image, size)])
  return tf.concat([five, tf.reverse(five, [2])], 0)


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
    image = crop_and_flip_batch(
        tf.gather(images_t, index), tf.stack([seed, -1 - step]),
        crop_padding=ds_cfg.crop_padding, flip=ds_cfg.random_flip,
        part=(process_index, process_count))
    return {'image': _normalize(image, mean, std), 'label': tf.gather(labels_t, index)}

  first_epoch, skip = divmod(start_step, steps_per_epoch)
  ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch_batches).skip(skip)
  ds = ds.map(load, num_parallel_calls=2, deterministic=True)
  options = tf.data.Options()
  # One thread: the cores belong to the training step, and a 28x28 batch is
  # ready long before the step that consumes it.
  options.threading.private_threadpool_size = 1
  return ds.with_options(options).prefetch(4)


def padded_ten_crops(image_HWC: tf.Tensor, padding: int) -> tf.Tensor:
  """The paper's ten test patches for images trained on crops of a padding.

  Training crops (H, W) windows at random from the image zero-padded by
  `padding`; the test patches are that padded image's four corner windows,
  its centre window (the image itself), and their mirror images:
  (10, H, W, C).
  """
  h, w = image_HWC.shape[0], image_HWC.shape[1]
  if h != w:
    raise ValueError(f'ten-patch testing needs square images, got {h}x{w}')
  p = padding
  return ten_crops(tf.pad(image_HWC, [[p, p], [p, p], [0, 0]]), h)


def eval_batches(config, images: np.ndarray, labels: np.ndarray, *,
                 local_batch: int, num_batches: int = 0,
                 crops: str = 'center') -> Iterator[Batch]:
  """Every example once, the last batch padded; `mask` is 1 for real examples.

  crops='ten': images are (B, 10, H, W, C), the ten patches of
  `padded_ten_crops`; the eval step averages their softmax.

  With `num_batches`, batches of padding only (mask 0) follow up to that
  many, so that processes with different shares take part in the same
  number of cross-device evaluation steps.
  """
  ds_cfg = config.dataset
  mean = np.asarray(ds_cfg.mean, np.float32)
  std = np.asarray(ds_cfg.std, np.float32)
  ds = tf.data.Dataset.from_tensor_slices((images, labels))
  if crops == 'ten':
    ds = ds.map(lambda x, y: (padded_ten_crops(x, ds_cfg.crop_padding), y))
  ds = ds.batch(local_batch)
  ds = ds.map(lambda x, y: (_normalize(x, mean, std), y)).prefetch(2)
  image_shape = images.shape[1:] if crops != 'ten' else (10,) + images.shape[1:]
  done = 0
  for x, y in ds.as_numpy_iterator():
    done += 1
    yield pad_batch({'image': x, 'label': y, 'mask': np.ones(len(y), np.float32)},
                    local_batch)
  empty = {'image': np.zeros((0,) + image_shape, np.float32),
           'label': np.zeros((0,), labels.dtype), 'mask': np.zeros((0,), np.float32)}
  for _ in range(done, num_batches):
    yield pad_batch(empty, local_batch)


def pad_batch(batch: Batch, size: int) -> Batch:
  """Pads every array of `batch` with zeros along axis 0 up to `size`."""
  n = len(batch['label'])
  if n == size:
    return batch
  return {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


@dataclasses.dataclass
class Data:
  """What the trainer needs from a dataset, for this process's share of it.

  train(start_step) -> tf.data.Dataset of {'image', 'label'} batches of the
  local batch size, infinite, batch s a function of (seed, s) only.
  eval(crops='') -> iterator of {'image', 'label', 'mask'} batches covering
  the eval split once; crops='ten' gives images (B, 10, H, W, C), the paper's
  multi-crop testing, 'center' (B, H, W, C), '' config.dataset.eval_crops.
  """
  train: Callable[[int], tf.data.Dataset]
  eval: Callable[..., Iterator[Batch]]
  steps_per_epoch: int
  num_train: int
  num_eval: int


def create_data(config, *, local_batch: int, eval_local_batch: int) -> Data:
  """The train/eval pipelines of `config.dataset.name`."""
  if config.dataset.name == 'fashion_mnist':
    # Training: every process keeps the whole (small) training set and takes
    # its rows of each global batch. Evaluation: each process its own share.
    train_images, train_labels = load_arrays(config, config.dataset.train_split)
    eval_images, eval_labels = load_arrays(config, config.dataset.eval_split)
    index, count = jax.process_index(), jax.process_count()
    largest_share = math.ceil(len(eval_images) / count)
    part = process_part(len(eval_images), index, count)
    eval_images, eval_labels = eval_images[part], eval_labels[part]
    return Data(
        train=lambda start: train_dataset(config, train_images, train_labels,
                                          local_batch=local_batch, start_step=start,
                                          process_index=index, process_count=count),
        eval=lambda crops='': eval_batches(
            config, eval_images, eval_labels, local_batch=eval_local_batch,
            num_batches=math.ceil(largest_share / eval_local_batch),
            crops=crops or config.dataset.eval_crops),
        steps_per_epoch=len(train_images) // (local_batch * count),
        num_train=len(train_images), num_eval=len(eval_images))
  if config.dataset.name == 'imagenet2012':
    from alexnet_jax import imagenet  # pylint: disable=g-import-not-at-top
    return imagenet.create_data(config, local_batch=local_batch,
                                eval_local_batch=eval_local_batch)
  raise ValueError(f'Bad config: dataset.name={config.dataset.name!r} is not known')


def shard(batch: Batch, num_devices: int) -> Batch:
  """(B, ...) -> (num_devices, B / num_devices, ...) for `jax.pmap`."""
  return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}


def configure_tensorflow() -> None:
  """Keeps TensorFlow off the accelerators: JAX owns them."""
  tf.config.set_visible_devices([], 'GPU')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
