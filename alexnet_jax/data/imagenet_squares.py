"""A one-off copy of ILSVRC-2012 stored as the paper stored it: 256x256 squares.

The paper down-sampled every image once (shorter side to 256, central 256x256
patch) and trained on those. Rescaling on the fly costs a full decode and a
bilinear resize of every image in every epoch; after this copy, a training
image is one `decode_and_crop_jpeg` of a 227x227 window of a small JPEG, with
no resize, at the paper's own 30 x 30 crop positions.

`Imagenet2012Squares` is a tfds builder whose source is the prepared
`imagenet2012`: same splits, labels and file names; each image is
`common.center_square_resize` of the original, rounded to uint8 and stored
as a JPEG of quality `quality`. Images that do not decode are left out and
counted. `imagenet.prepare` builds it on first use when
`dataset.prescaled=True` (the default).
"""

from __future__ import annotations

import sys

from absl import logging
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax.data import common

NAME = 'imagenet2012_squares'
# About 20 KB per 256x256 image at quality 90: ~27 GB for the 1.33 M images.
SIZE_NOTE = 'about 27 GB for 256x256 squares at quality 90'


def square_jpeg(jpeg: tf.Tensor, size: int, quality: int) -> tf.Tensor:
  """The JPEG of the central (size, size) square of the shorter-side-`size` rescale."""
  square = common.center_square_resize(jpeg, size)
  pixels = tf.cast(tf.clip_by_value(tf.round(square), 0.0, 255.0), tf.uint8)
  return tf.io.encode_jpeg(pixels, quality=quality)


class Imagenet2012Squares(tfds.core.GeneratorBasedBuilder):
  """ILSVRC-2012 as (size x size) JPEG squares, made from the prepared `imagenet2012`."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Central squares of the shorter-side rescale.'}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name='256_q90')]

  def __init__(self, *, source: tfds.core.DatasetBuilder, size: int = 256,
               quality: int = 90, **kwargs):
    self._source = source
    self._size, self._quality = size, quality
    name = f'{size}_q{quality}'
    config = name if name == '256_q90' else tfds.core.BuilderConfig(name=name)
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f'ILSVRC-2012 rescaled once to {self._size}x{self._size} '
                     f'central squares, JPEG quality {self._quality}.'),
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(self._size, self._size, 3),
                                         encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(
                names=self._source.info.features['label'].names),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://image-net.org/',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything comes from the prepared source
    return {split: self._generate_examples(split) for split in self._source.info.splits}

  def _generate_examples(self, split):
    ds = self._source.as_dataset(split=split, shuffle_files=False,
                                 decoders={'image': tfds.decode.SkipDecoding()})
    ds = ds.enumerate().map(lambda i, ex: {'position': i, **ex})
    ds = common.map_or_flag(
        ds, lambda ex: {'image': square_jpeg(ex['image'], self._size, self._quality),
                        'label': ex['label'], 'file_name': ex['file_name']},
        parallel=tf.data.AUTOTUNE)
    written = 0
    for ex in ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
      if ex['ok']:
        written += 1
        yield ex['file_name'], {'image': ex['image'], 'label': ex['label'],
                                'file_name': ex['file_name']}
    # Counted against the source: a failure at the very end leaves no stand-in.
    missing = self._source.info.splits[split].num_examples - written
    if missing:
      logging.warning('%s %s: %d unreadable images left out of the copy',
                      NAME, split, missing)


def prepare(source: tfds.core.DatasetBuilder, *, size: int, quality: int,
            data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The squares of the prepared `source`, written on first use."""
  builder = Imagenet2012Squares(source=source, size=size, quality=quality,
                                data_dir=data_dir)
  if not builder.is_prepared():
    print(f'Writing the one-off copy of imagenet2012 as {size}x{size} squares to '
          f'{builder.data_dir} ({SIZE_NOTE}; about one epoch of decoding, an hour '
          'or two on 8 cores). Later runs read it directly.', file=sys.stderr)
    builder.download_and_prepare()
  return builder
