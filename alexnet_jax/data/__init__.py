"""The datasets: `create_data` builds the train/eval pipelines of a config.

  common            batches, padding, process shares, sharding, crops, `Data`
  fashion_mnist     Fashion-MNIST: IDX files, local tfds builder, pipelines
  imagenet          ILSVRC-2012 as in the paper: preparation, statistics, pipelines
  imagenet_squares  the one-off copy of ILSVRC-2012 as 256x256 squares

Imports go one way only: the dataset modules import `common` (and `imagenet`
imports `imagenet_squares`); no module of the package imports this one.

For a trained network (`alexnet_jax.inference`): `input_stats`, `file_input`
(an image file prepared by the very function evaluation maps over the
dataset) and `pixels` (an input back to the image shown).
"""

from __future__ import annotations

import numpy as np

from alexnet_jax.data import common
from alexnet_jax.data import fashion_mnist
from alexnet_jax.data import imagenet
from alexnet_jax.data.common import Data
from alexnet_jax.data.common import DataNotFoundError
from alexnet_jax.data.common import configure_tensorflow
from alexnet_jax.data.common import shard

__all__ = ['Data', 'DataNotFoundError', 'common', 'configure_tensorflow',
           'create_data', 'fashion_mnist', 'file_input', 'imagenet', 'input_stats',
           'pixels', 'shard']


def create_data(config, *, local_batch: int, eval_local_batch: int) -> Data:
  """The train/eval pipelines of `config.dataset.name`."""
  if config.dataset.name == 'fashion_mnist':
    return fashion_mnist.create_data(config, local_batch=local_batch,
                                     eval_local_batch=eval_local_batch)
  if config.dataset.name == 'imagenet2012':
    return imagenet.create_data(config, local_batch=local_batch,
                                eval_local_batch=eval_local_batch)
  raise ValueError(f'Bad config: dataset.name={config.dataset.name!r} is not known')


def input_stats(config) -> imagenet.Stats | None:
  """The mean that preprocessing subtracts (ImageNet), without preparing the dataset.

  None for Fashion-MNIST, whose dataset.mean and dataset.std are all it takes.
  Raises DataNotFoundError if the statistics file is missing.
  """
  if config.dataset.name == 'fashion_mnist':
    return None
  # The builder only locates the file when neither the config nor stats_dir does.
  located = config.dataset.mean_mode == 'constant' or config.dataset.stats_dir
  stats = imagenet.load_stats(config, None if located else imagenet.stats_builder(config))
  if stats.mean.ndim == 3 and stats.mean.shape[0] != config.dataset.resize_size:
    raise ValueError(f'Bad config: the mean image is {stats.mean.shape[0]} pixels '
                     f'wide, dataset.resize_size is {config.dataset.resize_size}')
  return stats


def file_input(config, data: bytes, crops: str,
               stats: imagenet.Stats | None = None) -> np.ndarray:
  """An image file's bytes as the network's input: (H, W, C), or (10, H, W, C) for 'ten'.

  The same preprocessing as evaluation of the dataset (`eval_input` of its
  module); `stats` from `input_stats`. Raises tf.errors.InvalidArgumentError
  (an OpError) on bytes that are not an image.
  """
  if config.dataset.name == 'fashion_mnist':
    image = fashion_mnist.file_image(data, config)
    return fashion_mnist.eval_input(image, config, crops).numpy()
  square = imagenet.file_square(data, config)
  return imagenet.eval_input(square, config, stats.mean, crops).numpy()


def pixels(config, inputs: np.ndarray, stats: imagenet.Stats | None = None) -> np.ndarray:
  """Centre-crop inputs (..., H, W, C) back to the uint8 images they were made from."""
  if config.dataset.name == 'fashion_mnist':
    return fashion_mnist.pixels(inputs, config)
  return imagenet.pixels(inputs, config, stats)
