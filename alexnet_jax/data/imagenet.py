"""ILSVRC-2012 fed as in the paper (sections 2 and 4.1).

Every image is rescaled so that its shorter side is `resize_size` (256) and
the central square is kept; the mean over the training set is subtracted (per
pixel, or per channel). Training takes random `image_size` (227) crops,
horizontal flips and the PCA colour augmentation; testing takes the centre
crop or the ten patches (four corners, centre, and their mirror images).
A training crop is decoded and rescaled from its own window of the original
image (`random_crop_resize`), which equals cropping the rescaled square up to
sub-pixel rounding and skips a fifth of the work. The decoding of the central
square (`common.center_square_resize`) and the map that survives unreadable
images (`common.map_or_flag`) are shared with `imagenet_squares`, which this
module imports (never the reverse).

The last step of both is `to_network`: the channels are put in
`dataset.channel_order` and divided by `dataset.std` (the paper's recipe,
RGB and std 1, leaves the images as they are). Colour orders: images and `dataset.pca_*` are RGB, and
so is the statistics file unless it says otherwise (a `channel_order`
entry, as an imported BGR mean image has); `dataset.mean`
(mean_mode='constant') and `dataset.std` are in the order the network sees,
so a network trained in Caffe on BGR images takes Caffe's BGR mean as it is.
`Stats.mean` is always RGB.

Image files (`alexnet_jax.inference`) take the path of evaluation:
`file_square` (the same central-square rescale for a JPEG), then
`eval_input`, the function the evaluation pipeline maps over its images;
`pixels` turns a centre-crop input back into RGB pixels for display.

The raw data is the real `imagenet2012` tfds builder, fed the two archives from
image-net.org. The mean image and the RGB PCA come from
`python -m alexnet_jax.tools.dataset_stats` (once per dataset).

Training batch s is a function of (seed, s) only: epoch e reads the shards of
this process in an order seeded by (seed, e), shuffles examples with a buffer
seeded by (seed, e), and every augmentation of the example at stream position
p is seeded by (seed, process, p). Resuming at step s skips whole epochs for
free and the records (not the decoding) of the current epoch's first batches.

Images that do not decode do not stop training: they are replaced by another
image of the same batch, counted, and the count is printed at each epoch's
end. In evaluation they get mask 0 and a warning says how many there were.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tarfile
from typing import Iterator

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax.data import common
from alexnet_jax.data import imagenet_squares

TRAIN_TAR = 'ILSVRC2012_img_train.tar'
VAL_TAR = 'ILSVRC2012_img_val.tar'
STATS_COMMAND = 'python -m alexnet_jax.tools.dataset_stats --config=configs/paper.py'
_RAW_IMAGES = {'image': tfds.decode.SkipDecoding()}
_AUTOTUNE = tf.data.AUTOTUNE


# ---------------------------------------------------------------- class names

NAMES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'imagenet_names.txt')


def synsets() -> list[str]:
  """The 1000 WordNet ids in class-index order: tfds's `imagenet2012` labels (sorted)."""
  path = os.fspath(tfds.core.tfds_path('datasets/imagenet2012/labels.txt'))
  with tf.io.gfile.GFile(path) as f:
    return f.read().split()


def class_names() -> list[str]:
  """Human-readable names of the 1000 classes in class-index order.

  From `imagenet_names.txt` beside this module (lines `synset<TAB>words`,
  the words of the ILSVRC-2012 synsets); a synset it does not name keeps its id.
  """
  words = {}
  with open(NAMES_FILE, encoding='utf-8') as f:
    for line in f:
      synset, _, name = line.rstrip('\n').partition('\t')
      words[synset] = name or synset
  return [words.get(s, s) for s in synsets()]


# ---------------------------------------------------------------- the builder


class ArchiveError(ValueError):
  """An ImageNet archive is empty, unreadable or damaged; the message names it."""


def default_manual_dir(builder: tfds.core.DatasetBuilder) -> str:
  """tfds's own default: `<data_dir>/downloads/manual`."""
  return os.path.join(os.fspath(builder.data_dir_root), 'downloads', 'manual')


def prepare(config) -> tfds.core.DatasetBuilder:
  """The builder that training reads, prepared if needed.

  `dataset.prescaled`: the one-off copy of `imagenet2012` as resize_size
  squares (`imagenet_squares`), made from the prepared original on first use;
  otherwise `imagenet2012` itself.
  """
  source = prepare_original(config)
  if not config.dataset.prescaled:
    return source
  return imagenet_squares.prepare(source, size=config.dataset.resize_size,
                                  quality=config.dataset.prescaled_quality,
                                  data_dir=config.dataset.data_dir or None)


def prepare_original(config) -> tfds.core.DatasetBuilder:
  """The `imagenet2012` builder, prepared from the manual archives if needed."""
  builder = tfds.builder('imagenet2012', data_dir=config.dataset.data_dir or None)
  if builder.is_prepared():
    return builder
  manual_dir = config.dataset.manual_dir or default_manual_dir(builder)
  missing = [f for f in (TRAIN_TAR, VAL_TAR)
             if not tf.io.gfile.exists(os.path.join(manual_dir, f))]
  if missing:
    raise common.DataNotFoundError(
        f'ImageNet (ILSVRC-2012) is not prepared in {builder.data_dir_root} and '
        f'{" and ".join(missing)} {"is" if len(missing) == 1 else "are"} missing.\n'
        f'Download {TRAIN_TAR} (138 GB) and {VAL_TAR} (6.3 GB) from '
        'https://image-net.org/download-images (registration required) and put '
        f'both in\n  {manual_dir}\n(or point --config.dataset.manual_dir at their '
        'folder). The next run prepares the dataset once: about 150 GB more on '
        'disk and several hours, even on a fast disk.')
  check_archives(manual_dir)
  try:
    # try_download_gcs=False: ImageNet is never hosted prepared; don't probe GCS.
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, try_download_gcs=False))
  except (tarfile.TarError, EOFError) as e:  # tfds' own message names no file
    paths = _archives_in_traceback(e) or [
        os.path.join(manual_dir, f) for f in (TRAIN_TAR, VAL_TAR)]
    raise ArchiveError(
        f'{" or ".join(paths)} is damaged or incomplete (preparing imagenet2012 failed '
        f'with {type(e).__name__}: {e}; {TRAIN_TAR} is 138 GB, {VAL_TAR} 6.3 GB): '
        'copy it again') from e
  return builder


def check_archives(manual_dir: str) -> None:
  """Raises ArchiveError unless the ILSVRC-2012 archives in `manual_dir` are readable tars.

  Cheap (a size and the first header of each), so that an empty or cut
  archive is named before tfds fails on it, deep inside preparation, with a
  message that does not say which file it read.
  """
  problems = []
  for name in (TRAIN_TAR, VAL_TAR):
    path = os.path.join(manual_dir, name)
    if not tf.io.gfile.exists(path):
      continue
    try:
      if tf.io.gfile.stat(path).length == 0:
        problems.append(f'{path} is empty (0 bytes)')
        continue
      with tf.io.gfile.GFile(path, 'rb') as f:
        if not tarfile.is_tarfile(f):
          problems.append(f'{path} is not a tar archive')
    except (OSError, tf.errors.OpError) as e:
      reason = getattr(e, 'strerror', None) or getattr(e, 'message', None) or str(e)
      problems.append(f'{path} cannot be read ({reason})')
  if problems:
    again = 'copy the archive again' if len(problems) == 1 else 'copy the archives again'
    raise ArchiveError(f'{"; ".join(problems)}: {again} (from '
                       'https://image-net.org/download-images)')


def _archives_in_traceback(error: BaseException) -> list[str]:
  """The ILSVRC-2012 archives that the frames of `error`'s traceback were reading.

  A path among the frames' variables, or the `name` of a file object among
  them (tfds' tar members name the archive they are read from).
  """
  found = []
  tb = error.__traceback__
  while tb is not None:
    for value in tb.tb_frame.f_locals.values():
      try:
        named = getattr(value, 'name', None)
      except Exception:  # pylint: disable=broad-except
        named = None
      for candidate in (value, named):
        if isinstance(candidate, (str, os.PathLike)):
          path = os.fspath(candidate)
          if (isinstance(path, str) and os.path.basename(path) in (TRAIN_TAR, VAL_TAR)
              and path not in found):
            found.append(path)
    tb = tb.tb_next
  return found


# ---------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class Stats:
  """What preprocessing subtracts and the PCA it adds along.

  mean: (R, R, 3) per-pixel mean image or (3,) per-channel mean, 0-255 units,
    RGB.
  eigval: (3,) eigenvalues of the RGB covariance, pixel values in [0, 1].
  eigvec: (3, 3) matching unit eigenvectors as columns.
  """
  mean: np.ndarray
  eigval: np.ndarray
  eigvec: np.ndarray


def stats_path(config, builder: tfds.core.DatasetBuilder) -> str:
  """Where dataset_stats writes the statistics of this dataset and resize."""
  folder = config.dataset.stats_dir or os.fspath(builder.data_dir)
  return os.path.join(folder, f'stats_{config.dataset.resize_size}.npz')


def stats_builder(config) -> tfds.core.DatasetBuilder:
  """The builder whose folder holds the statistics (see `stats_path`), unprepared.

  What `prepare` returns, without preparing anything: for using a trained
  network on images where the dataset itself may not be.
  """
  source = tfds.builder('imagenet2012', data_dir=config.dataset.data_dir or None)
  if not config.dataset.prescaled:
    return source
  return imagenet_squares.Imagenet2012Squares(
      source=source, size=config.dataset.resize_size,
      quality=config.dataset.prescaled_quality, data_dir=config.dataset.data_dir or None)


def load_stats(config, builder: tfds.core.DatasetBuilder) -> Stats:
  """The configured mean and PCA; raises DataNotFoundError if not computed."""
  ds_cfg = config.dataset
  if ds_cfg.mean_mode == 'constant':
    # dataset.mean is in the network's channel order.
    mean = np.asarray(ds_cfg.mean, np.float32)
    return Stats(mean[::-1].copy() if ds_cfg.channel_order == 'bgr' else mean,
                 np.asarray(ds_cfg.pca_eigval, np.float32),
                 np.asarray(ds_cfg.pca_eigvec, np.float32))
  path = stats_path(config, builder)
  if not tf.io.gfile.exists(path):
    raise common.DataNotFoundError(
        f'{path} does not exist: it holds the mean image and the RGB PCA of the '
        'training set, which preprocessing needs. Compute them once (about as '
        'long as one epoch of input) with\n'
        f'  {STATS_COMMAND}\n'
        'plus the same --config.dataset.* overrides as this run, or train with '
        '--config.dataset.mean_mode=constant (dataset.mean and dataset.pca_*).')
  with tf.io.gfile.GFile(path, 'rb') as f:
    data = dict(np.load(f))
  mean = data['mean_image'] if ds_cfg.mean_mode == 'image' else data['mean_rgb']
  # dataset_stats writes RGB; a file may say otherwise (an imported BGR mean).
  if str(data.get('channel_order', 'rgb')) == 'bgr':
    mean = mean[..., ::-1]
  return Stats(mean.astype(np.float32), data['eigval'].astype(np.float32),
               data['eigvec'].astype(np.float32))


# ---------------------------------------------------------------- image ops


def train_window(shape: tf.Tensor, seed: tf.Tensor, resize: int, size: int):
  """Where a random size x size crop of the rescaled central square lies.

  Returns (top, left, window) in the original image's pixels, the window being
  the part of the central square that a `size` crop of its `resize` x
  `resize` rescale covers, at a uniform position; and the crop's (row, col)
  in the rescaled square (where the mean image is taken).
  """
  side = tf.minimum(shape[0], shape[1])
  window = tf.maximum(1, tf.cast(tf.round(
      tf.cast(side, tf.float32) * (size / resize)), tf.int32))
  offsets = crop_offsets(seed, side, window)
  top = (shape[0] - side) // 2 + offsets[0]
  left = (shape[1] - side) // 2 + offsets[1]
  scaled = tf.cast(tf.round(tf.cast(offsets, tf.float32) * resize
                            / tf.cast(side, tf.float32)), tf.int32)
  return top, left, window, tf.clip_by_value(scaled, 0, resize - size)


def random_crop_resize(jpeg: tf.Tensor, seed: tf.Tensor, resize: int,
                       size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """A random `size` crop of the JPEG's central square rescaled to `resize`.

  Cropping the rescaled square equals rescaling the matching window of the
  original, up to sub-pixel rounding; decoding and rescaling only that window
  saves about a fifth of the work. Positions are drawn in original pixels,
  which covers the same crops as the paper's 30 x 30 positions, more finely.
  Returns the (size, size, 3) float32 crop and its offsets in the rescaled
  square.
  """
  top, left, window, offsets = train_window(
      tf.image.extract_jpeg_shape(jpeg), seed, resize, size)
  square = common._decode_square(jpeg, top, left, window, size)
  return common._rescale(square, size), offsets


def random_crop(jpeg: tf.Tensor, seed: tf.Tensor, resize: int,
                size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """A random `size` crop of a prescaled `resize` x `resize` JPEG.

  Only the crop's window is decoded, and no rescale is needed: this is the
  paper's own augmentation, one of (resize - size + 1)^2 positions of the
  stored square. Returns the (size, size, 3) uint8 crop and its offsets.
  """
  offsets = crop_offsets(seed, resize, size)
  window = tf.concat([offsets, [size, size]], 0)
  image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
  return tf.ensure_shape(image, [size, size, 3]), offsets


def decode_square(jpeg: tf.Tensor, size: int, prescaled: bool) -> tf.Tensor:
  """The (size, size, 3) float32 square that evaluation and statistics see."""
  if prescaled:
    image = tf.io.decode_jpeg(jpeg, channels=3)
    return tf.cast(tf.ensure_shape(image, [size, size, 3]), tf.float32)
  return common.center_square_resize(jpeg, size)


def crop_offsets(seed: tf.Tensor, full: int, size: int) -> tf.Tensor:
  """Uniform (row, col) of a size x size crop inside a full x full image."""
  return tf.random.stateless_uniform([2], seed, 0, full - size + 1, tf.int32)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Mirrors an (H, W, C) image left-right with probability 1/2."""
  flip = tf.random.stateless_uniform([], seed, 0, 2, tf.int32) > 0
  return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)


def add_per_channel(image: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
  """image (H, W, C) + values (C,), as a broadcast over rows of W * C values.

  TF broadcasts an innermost dimension of 3 element by element, about ten
  times slower than this row-wise form, which it vectorises.
  """
  shape = tf.shape(image)
  rows = tf.reshape(image, [shape[0], shape[1] * shape[2]])
  return tf.reshape(rows + tf.tile(values, [shape[1]]), shape)


def subtract_mean(image: tf.Tensor, mean: tf.Tensor,
                  offsets: tf.Tensor | None = None) -> tf.Tensor:
  """image - mean as float32; a mean image is taken at the image's `offsets`.

  Cropping after subtracting the full-size mean image equals subtracting the
  mean image cropped at the same place, which touches fewer pixels.
  """
  image = tf.cast(image, tf.float32)
  if mean.shape.rank == 1:
    return add_per_channel(image, -mean)
  if offsets is None:
    offsets = tf.zeros([2], tf.int32)
  shape = tf.shape(image)
  return image - tf.slice(mean, tf.concat([offsets, [0]], 0), [shape[0], shape[1], -1])


def multiply_per_channel(image: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
  """image (H, W, C) * values (C,), row-wise as `add_per_channel`."""
  shape = tf.shape(image)
  rows = tf.reshape(image, [shape[0], shape[1] * shape[2]])
  return tf.reshape(rows * tf.tile(values, [shape[1]]), shape)


def to_network(image: tf.Tensor, *, std=None, channel_order: str = 'rgb') -> tf.Tensor:
  """A mean-subtracted RGB image (H, W, 3) as the network takes it.

  Channels in `channel_order`, then divided by `std` (in that order, 0-255
  units). RGB with std None or all ones adds no op: the paper's input.
  """
  x = common.to_channel_order(image, channel_order)
  if std is not None and np.any(np.asarray(std, np.float32) != 1.0):
    x = multiply_per_channel(x, tf.constant(1.0 / np.asarray(std, np.float32)))
  return x


def pca_alphas(seed: tf.Tensor, std: float) -> tf.Tensor:
  """The paper's alpha_i ~ N(0, std), one draw per image and presentation."""
  return std * tf.random.stateless_normal([3], seed)


def pca_offset(alphas: tf.Tensor, eigval: tf.Tensor, eigvec: tf.Tensor) -> tf.Tensor:
  """sum_i alpha_i lambda_i p_i in 0-255 units (PCA stats are in [0, 1] units)."""
  return 255.0 * tf.linalg.matvec(eigvec, alphas * eigval)


def pca_lighting(image: tf.Tensor, seed: tf.Tensor, eigval: tf.Tensor,
                 eigvec: tf.Tensor, std: float) -> tf.Tensor:
  """Adds one random RGB offset along the principal components to every pixel."""
  return add_per_channel(image, pca_offset(pca_alphas(seed, std), eigval, eigvec))


def train_image(jpeg: tf.Tensor, seed: tf.Tensor, *, mean: tf.Tensor,
                eigval: tf.Tensor, eigvec: tf.Tensor, resize: int, size: int,
                flip: bool, pca_std: float, prescaled: bool = False, std=None,
                channel_order: str = 'rgb') -> tf.Tensor:
  """Random crop, mean subtraction, flip and PCA lighting of one JPEG, then `to_network`.

  prescaled: the JPEG is already the resize x resize square (`random_crop`);
  otherwise any original (`random_crop_resize`).
  """
  crop_seed, flip_seed, pca_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  if prescaled:
    image, offsets = random_crop(jpeg, crop_seed, resize, size)
  else:
    image, offsets = random_crop_resize(jpeg, crop_seed, resize, size)
  x = subtract_mean(image, mean, offsets)
  if flip:
    x = random_flip(x, flip_seed)
  if pca_std:
    x = pca_lighting(x, pca_seed, eigval, eigvec, pca_std)
  return to_network(x, std=std, channel_order=channel_order)


def eval_image(image: tf.Tensor, *, mean: tf.Tensor, size: int, crops: str,
               std=None, channel_order: str = 'rgb') -> tf.Tensor:
  """The centre crop (size, size, 3) or ten crops (10, size, size, 3) of a square.

  The mean is subtracted first, then `to_network` applied.
  """
  x = to_network(subtract_mean(image, mean), std=std, channel_order=channel_order)
  return common.ten_crops(x, size) if crops == 'ten' else common.center_crop(x, size)


def eval_input(square: tf.Tensor, config, mean, crops: str) -> tf.Tensor:
  """A decoded (R, R, 3) square as evaluation feeds it to the network (`eval_image`).

  `mean` is `Stats.mean`; crops is 'center' or 'ten'.
  """
  ds_cfg = config.dataset
  return eval_image(square, mean=tf.convert_to_tensor(mean, tf.float32),
                    size=ds_cfg.image_size, crops=crops,
                    std=ds_cfg.std, channel_order=ds_cfg.channel_order)


def file_square(data: bytes, config) -> tf.Tensor:
  """An image file's bytes as the (R, R, 3) float32 square evaluation starts from.

  A JPEG is decoded exactly as `decode_square` decodes an original
  (`common.center_square_resize`); other formats alike (`common.file_square`).
  Eager only; raises tf.errors.InvalidArgumentError on bytes that are not an
  image.
  """
  return common.file_square(tf.constant(data), config.dataset.resize_size, channels=3)


def pixels(inputs: np.ndarray, config, stats: Stats) -> np.ndarray:
  """Centre-crop network inputs (..., S, S, 3) back to RGB uint8 pixels.

  The inverse of `eval_input` with crops='center': times std, back to RGB,
  plus the mean (a mean image's central crop).
  """
  ds_cfg = config.dataset
  x = inputs * np.asarray(ds_cfg.std, np.float32)
  if ds_cfg.channel_order == 'bgr':
    x = x[..., ::-1]
  mean = stats.mean
  if mean.ndim == 3:
    size, full = inputs.shape[-2], mean.shape[0]
    top = (full - size) // 2
    mean = mean[top:top + size, top:top + size]
  return np.clip(np.round(x + mean), 0, 255).astype(np.uint8)


def fill_unreadable(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Replaces the 'image' and 'label' of ok=False examples by readable ones.

  The batch keeps its size and its place in the stream (so resuming stays
  exact); 'ok' becomes 'unreadable', the number replaced.
  """
  batch = dict(batch)
  ok = batch.pop('ok')
  good = tf.cast(tf.where(ok)[:, 0], tf.int32)
  n, num_good = tf.shape(ok)[0], tf.shape(good)[0]
  index = tf.range(n)
  source = tf.where(ok | (num_good == 0), index,
                    tf.gather(good, index % tf.maximum(num_good, 1)))
  for key in ('image', 'label'):
    # Copying the batch only when needed: nearly every batch is all readable.
    batch[key] = tf.cond(num_good < n, lambda v=batch[key]: tf.gather(v, source),
                         lambda v=batch[key]: v)
  batch['unreadable'] = n - num_good
  return batch


# ---------------------------------------------------------------- pipelines


def _cache(ds: tf.data.Dataset, cache: str) -> tf.data.Dataset:
  return ds.cache('' if cache == 'memory' else cache) if cache else ds


def _examples(config, builder, split) -> tf.data.Dataset:
  """{'position', 'jpeg', 'label'} of `split` in the stored order."""
  ds = builder.as_dataset(split=split, decoders=_RAW_IMAGES, shuffle_files=False)
  ds = _cache(ds.map(lambda ex: (ex['image'], ex['label'])), config.dataset.cache)
  return ds.enumerate().map(lambda i, ex: {
      'position': i, 'jpeg': ex[0], 'label': tf.cast(ex[1], tf.int32)})


def decoded_split(config, builder, split) -> tf.data.Dataset:
  """{'image' (R, R, 3) float32, 'label', 'position', 'ok'} of `split`, in order."""
  size, prescaled = config.dataset.resize_size, config.dataset.prescaled
  return common.map_or_flag(
      _examples(config, builder, split),
      lambda ex: {'image': decode_square(ex['jpeg'], size, prescaled), 'label': ex['label']},
      parallel=config.dataset.num_parallel_calls)


def _train_records(config, builder, split, *, per_epoch: int,
                   start_position: int) -> tf.data.Dataset:
  """{'position', 'serialized'} of epochs e = start..., each seeded by (seed, e)."""
  ds_cfg = config.dataset
  shards = builder.info.splits[split].file_instructions
  files = tf.constant([os.fspath(s.filename) for s in shards])
  skips = tf.constant([s.skip for s in shards], tf.int64)
  takes = tf.constant([s.take for s in shards], tf.int64)
  seed = tf.constant(config.seed, tf.int64)

  def read(order):
    return tf.data.Dataset.from_tensor_slices(order).interleave(
        lambda i: tf.data.TFRecordDataset(files[i]).skip(skips[i]).take(takes[i]),
        cycle_length=min(16, len(shards)), block_length=1,
        num_parallel_calls=_AUTOTUNE, deterministic=True)

  # A cache holds one fixed order, so cached epochs differ by the buffer only.
  cached = _cache(read(tf.range(len(shards))), ds_cfg.cache) if ds_cfg.cache else None

  def epoch(e):
    order_seed, shuffle_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.stack([seed, e]), 2))
    records = cached if cached is not None else read(
        tf.random.experimental.stateless_shuffle(tf.range(len(shards)), order_seed))
    records = records.shuffle(ds_cfg.shuffle_buffer, seed=tf.random.stateless_uniform(
        [], shuffle_seed, None, None, tf.int64)).take(per_epoch)
    return tf.data.Dataset.zip({
        'position': tf.data.Dataset.range(e * per_epoch, (e + 1) * per_epoch),
        'serialized': records})

  start_epoch = start_position // per_epoch
  ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch)
  return ds.skip(start_position - start_epoch * per_epoch)


def train_batches(examples: tf.data.Dataset, config, stats: Stats, *,
                  local_batch: int, per_epoch: int, first_position: int = 0,
                  parse=None) -> tf.data.Dataset:
  """Decoded, augmented {'image', 'label'} batches of {'position', 'jpeg', 'label'}.

  `examples` come in stream order with consecutive positions from
  `first_position` (a multiple of `local_batch`); epochs start at multiples
  of `per_epoch`. `parse`, if given, first turns each element into that form.
  """
  ds_cfg = config.dataset
  base_seed = tf.constant([config.seed, jax.process_index()], tf.int64)
  mean = tf.constant(stats.mean)
  eigval, eigvec = tf.constant(stats.eigval), tf.constant(stats.eigvec)

  def decode_and_augment(ex):
    ex = parse(ex) if parse else ex
    seed = tf.random.experimental.stateless_fold_in(base_seed, ex['position'])
    image = train_image(
        ex['jpeg'], seed, mean=mean, eigval=eigval, eigvec=eigvec,
        resize=ds_cfg.resize_size, size=ds_cfg.image_size,
        flip=ds_cfg.random_flip, pca_std=ds_cfg.pca_std, prescaled=ds_cfg.prescaled,
        std=ds_cfg.std, channel_order=ds_cfg.channel_order)
    return {'image': image, 'label': ex['label']}

  def report(count, batch):
    """Adds up unreadable images; prints the number at each epoch's end."""
    count += tf.cast(batch.pop('unreadable'), tf.int64)
    last = batch.pop('position')[-1]
    end = (last + 1) % per_epoch == 0

    def warn():
      tf.print(f'imagenet2012 {ds_cfg.train_split}: skipped', count,
               'unreadable images in epoch', last // per_epoch,
               '(each replaced by another image of its batch)', output_stream=sys.stderr)
      return tf.constant(0, tf.int64)

    count = tf.cond(end & (count > 0), warn,
                    lambda: tf.where(end, tf.constant(0, tf.int64), count))
    return count, batch

  ds = common.map_or_flag(examples, decode_and_augment,
                          parallel=ds_cfg.num_parallel_calls,
                          first_position=first_position)
  ds = ds.batch(local_batch, drop_remainder=True).map(fill_unreadable)
  return ds.scan(tf.constant(0, tf.int64), report).prefetch(_AUTOTUNE)


def train_dataset(config, builder, stats: Stats, *, split, local_batch: int,
                  steps_per_epoch: int, start_step: int = 0) -> tf.data.Dataset:
  """Infinite {'image', 'label'} batches of this process; batch s depends on (seed, s)."""
  features = builder.info.features

  def parse(ex):
    example = features.deserialize_example(ex['serialized'], decoders=_RAW_IMAGES)
    return {'position': ex['position'], 'jpeg': example['image'],
            'label': tf.cast(example['label'], tf.int32)}

  per_epoch = steps_per_epoch * local_batch
  start = start_step * local_batch
  records = _train_records(config, builder, split, per_epoch=per_epoch,
                           start_position=start)
  return train_batches(records, config, stats, local_batch=local_batch,
                       per_epoch=per_epoch, first_position=start, parse=parse)


def eval_batches(config, builder, stats: Stats, *, split, local_batch: int,
                 num_examples: int, num_batches: int,
                 crops: str = '') -> Iterator[common.Batch]:
  """Every example of `split` once; mask 0 marks padding and unreadable images.

  crops: 'ten' or 'center'; '' = config.dataset.eval_crops.

  Yields exactly `num_batches` batches (padding with empty ones), so that all
  processes take part in the same number of cross-device eval steps.
  """
  ds_cfg = config.dataset
  crops = crops or ds_cfg.eval_crops
  mean = tf.constant(stats.mean)

  def decode_and_crop(ex):
    square = decode_square(ex['jpeg'], ds_cfg.resize_size, ds_cfg.prescaled)
    return {'image': eval_input(square, config, mean, crops), 'label': ex['label']}

  ds = common.map_or_flag(_examples(config, builder, split), decode_and_crop,
                          parallel=ds_cfg.num_parallel_calls)
  ds = ds.batch(local_batch).prefetch(2)
  size = ds_cfg.image_size
  empty = {'image': np.zeros((0,) + ((10,) if crops == 'ten' else ()) + (size, size, 3),
                             np.float32),
           'label': np.zeros((0,), np.int32), 'mask': np.zeros((0,), np.float32)}
  done, readable = 0, 0
  for batch in ds.as_numpy_iterator():
    readable += int(batch['ok'].sum())
    done += 1
    yield common.pad_batch(
        {'image': batch['image'], 'label': batch['label'],
         'mask': batch['ok'].astype(np.float32)}, local_batch)
  for _ in range(done, num_batches):
    yield common.pad_batch(empty, local_batch)
  if readable < num_examples:
    logging.warning('imagenet2012 %s: %d unreadable images left out of the '
                    'evaluation (mask 0); eval_examples counts the other %d.',
                    ds_cfg.eval_split, num_examples - readable, readable)


def create_data(config, *, local_batch: int, eval_local_batch: int) -> common.Data:
  """The paper's ImageNet pipelines for this process (see the module docstring)."""
  ds_cfg = config.dataset
  builder = prepare(config)
  stats = load_stats(config, builder)
  if stats.mean.ndim == 3 and stats.mean.shape[0] != ds_cfg.resize_size:
    raise ValueError(f'Bad config: the mean image is {stats.mean.shape[0]} pixels '
                     f'wide, dataset.resize_size is {ds_cfg.resize_size}')
  train_split = tfds.split_for_jax_process(ds_cfg.train_split, drop_remainder=True)
  num_train = builder.info.splits[train_split].num_examples
  steps_per_epoch = num_train // local_batch
  if steps_per_epoch == 0:
    raise ValueError(f'{num_train} training examples per process cannot fill one '
                     f'batch of {local_batch}')
  eval_splits = tfds.even_splits(ds_cfg.eval_split, jax.process_count())
  eval_counts = [builder.info.splits[s].num_examples for s in eval_splits]
  eval_split = eval_splits[jax.process_index()]
  num_eval_batches = math.ceil(max(eval_counts) / eval_local_batch)
  return common.Data(
      train=lambda start: train_dataset(
          config, builder, stats, split=train_split, local_batch=local_batch,
          steps_per_epoch=steps_per_epoch, start_step=start),
      eval=lambda crops='': eval_batches(config, builder, stats, split=eval_split,
                                         local_batch=eval_local_batch,
                                         num_examples=eval_counts[jax.process_index()],
                                         num_batches=num_eval_batches, crops=crops),
      steps_per_epoch=steps_per_epoch, num_train=num_train,
      num_eval=eval_counts[jax.process_index()])
