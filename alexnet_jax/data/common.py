"""What every dataset of `alexnet_jax.data` shares; imports nothing of the project.

Batches are dicts of numpy arrays (`Batch`). Evaluation walks the whole split
once, pads the last batch (`pad_batch`) and marks padded examples with mask 0,
so every example is counted exactly once; each process evaluates its own
contiguous share (`process_part`). `Data` is what a dataset hands the trainer.

Also here: the crops of training and testing (`crop_and_flip_batch`,
`ten_crops`, `padded_ten_crops`, ...), the decoding of a JPEG's central square
that both `imagenet` and the one-off copy of `imagenet_squares` use
(`center_square_resize`), the same for an image file of any format
(`file_square`), the channel order of the network's input
(`to_channel_order`), and `map_or_flag`, a parallel map that survives
unreadable images.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Iterator

import numpy as np
import tensorflow as tf

Batch = dict[str, np.ndarray]


class DataNotFoundError(FileNotFoundError):
  """The dataset is not on this machine; the message says how to get it."""


# ---------------------------------------------------------------- batches


def process_part(n: int, index: int, count: int) -> slice:
  """Process `index`'s contiguous share of `n` examples split over `count`.

  Shares differ by at most one example and together cover all `n`.
  """
  per, extra = divmod(n, count)
  start = index * per + min(index, extra)
  return slice(start, start + per + (index < extra))


def pad_batch(batch: Batch, size: int) -> Batch:
  """Pads every array of `batch` with zeros along axis 0 up to `size`."""
  n = len(batch['label'])
  if n == size:
    return batch
  return {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def shard(batch: Batch, num_devices: int) -> Batch:
  """(B, ...) -> (num_devices, B / num_devices, ...) for `jax.pmap`."""
  return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}


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


def configure_tensorflow() -> None:
  """Keeps TensorFlow off the accelerators: JAX owns them."""
  tf.config.set_visible_devices([], 'GPU')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


# ---------------------------------------------------------------- crops


def _normalize(image, mean, std):
  return (tf.cast(image, tf.float32) - mean) / std


def to_channel_order(image: tf.Tensor, channel_order: str) -> tf.Tensor:
  """An RGB image (..., 3) in the channel order the network sees: 'rgb' or 'bgr'.

  Networks trained in Caffe read OpenCV's BGR images. One channel (grey) is
  left as it is.
  """
  if channel_order == 'rgb' or image.shape[-1] == 1:
    return image
  if channel_order == 'bgr':
    return tf.reverse(image, [-1])
  raise ValueError(f"channel_order={channel_order!r}; use 'rgb' or 'bgr'")


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


# ---------------------------------------------------------------- JPEG squares


def _decode_square(jpeg: tf.Tensor, top, left, side, min_side: int) -> tf.Tensor:
  """Decodes the square window (top, left, side) of a JPEG as uint8.

  libjpeg can shrink by 2, 4 or 8 while decoding, a proper low-pass that also
  saves work: the largest shrink that keeps the window >= `min_side` is used,
  so a bilinear rescale to `min_side` afterwards shrinks by less than 2 and
  needs no anti-aliasing.
  """
  shrink = tf.reduce_sum(tf.cast(side >= min_side * tf.constant([2, 4, 8]), tf.int32))

  def decode(ratio):
    window = tf.stack([top // ratio, left // ratio, side // ratio, side // ratio])
    return lambda: tf.image.decode_and_crop_jpeg(jpeg, window, channels=3, ratio=ratio)

  return tf.switch_case(shrink, [decode(r) for r in (1, 2, 4, 8)])


def _rescale(image: tf.Tensor, size: int) -> tf.Tensor:
  # Bilinear from float32 input: TF's uint8 path is about twice as slow.
  return tf.image.resize(tf.cast(image, tf.float32), [size, size],
                         method='bilinear', antialias=False)


def center_square_resize(jpeg: tf.Tensor, size: int) -> tf.Tensor:
  """Decodes the JPEG's central square, rescaled to (size, size, 3) float32.

  The paper rescales the shorter side to 256 and keeps the central 256x256
  patch; cropping the central square first selects the same pixels (up to
  sub-pixel rounding at its borders) and lets libjpeg skip the margins.
  """
  shape = tf.image.extract_jpeg_shape(jpeg)
  side = tf.minimum(shape[0], shape[1])
  square = _decode_square(jpeg, (shape[0] - side) // 2, (shape[1] - side) // 2,
                          side, size)
  return _rescale(square, size)


def center_square_resize_pixels(image_HWC: tf.Tensor, size: int) -> tf.Tensor:
  """`center_square_resize` of decoded pixels: (size, size, C) float32.

  Without libjpeg's shrink while decoding, a rescale by 2 or more is
  anti-aliased instead.
  """
  shape = tf.shape(image_HWC)
  side = tf.minimum(shape[0], shape[1])
  square = tf.image.crop_to_bounding_box(image_HWC, (shape[0] - side) // 2,
                                         (shape[1] - side) // 2, side, side)
  return tf.cond(side >= 2 * size,
                 lambda: tf.image.resize(tf.cast(square, tf.float32), [size, size],
                                         method='bilinear', antialias=True),
                 lambda: _rescale(square, size))


def file_square(data: tf.Tensor, size: int, channels: int) -> tf.Tensor:
  """The central square of an image file's bytes rescaled to (size, size, channels) float32.

  A colour JPEG goes through `center_square_resize`, the decoding the ImageNet
  pipelines apply to their JPEGs; any other file (PNG, GIF, BMP, or a
  JPEG read as grey) is decoded whole and cropped alike. An image that is
  already (size, size) keeps its pixels exactly. Eager only (files are read
  one by one); raises tf.errors.InvalidArgumentError on bytes that are not an
  image.
  """
  if channels == 3 and bool(tf.io.is_jpeg(data)):
    return center_square_resize(data, size)
  image = tf.io.decode_image(data, channels=channels, expand_animations=False)
  if image.shape[0] == size and image.shape[1] == size:
    return tf.cast(image, tf.float32)
  return center_square_resize_pixels(image, size)


# ---------------------------------------------------------------- tf.data


def map_or_flag(ds: tf.data.Dataset, fn, *, parallel: int,
                first_position: int = 0) -> tf.data.Dataset:
  """`ds.map(fn)` in parallel, where elements on which `fn` fails become zeros.

  Elements are dicts with consecutive int64 'position's from
  `first_position`; outputs gain 'position' and 'ok' (False for stand-ins).
  A failing op (a corrupt JPEG) would end the iterator, so failed elements
  are dropped and zero stand-ins put back in their places: batches keep their
  positions. A failure at the very end of a finite stream leaves no stand-in.
  """
  def apply(ex):
    return {**fn(ex), 'position': ex['position'], 'ok': tf.constant(True)}

  mapped = ds.map(apply, num_parallel_calls=parallel, deterministic=True).ignore_errors()
  spec = mapped.element_spec

  def restore_gaps(expected, ex):
    missing = ex['position'] - expected

    def with_stand_ins():
      out = {}
      for key, s in spec.items():
        filler = (tf.range(expected, ex['position']) if key == 'position' else
                  tf.zeros(tf.concat([[tf.cast(missing, tf.int32)], s.shape], 0), s.dtype))
        out[key] = tf.concat([filler, ex[key][None]], 0)
      return out

    out = tf.cond(missing > 0, with_stand_ins, lambda: {k: v[None] for k, v in ex.items()})
    return ex['position'] + 1, out

  return mapped.scan(tf.constant(first_position, tf.int64), restore_gaps).unbatch()
