"""The datasets: `create_data` builds the train/eval pipelines of a config.

  common            batches, padding, process shares, sharding, crops, `Data`
  fashion_mnist     Fashion-MNIST: IDX files, local tfds builder, pipelines
  imagenet          ILSVRC-2012 as in the paper: preparation, statistics, pipelines
  imagenet_squares  the one-off copy of ILSVRC-2012 as 256x256 squares

Imports go one way only: the dataset modules import `common` (and `imagenet`
imports `imagenet_squares`); no module of the package imports this one.
"""

from alexnet_jax.data import common
from alexnet_jax.data import fashion_mnist
from alexnet_jax.data import imagenet
from alexnet_jax.data.common import Data
from alexnet_jax.data.common import DataNotFoundError
from alexnet_jax.data.common import configure_tensorflow
from alexnet_jax.data.common import shard

__all__ = ['Data', 'DataNotFoundError', 'common', 'configure_tensorflow',
           'create_data', 'fashion_mnist', 'imagenet', 'shard']


def create_data(config, *, local_batch: int, eval_local_batch: int) -> Data:
  """The train/eval pipelines of `config.dataset.name`."""
  if config.dataset.name == 'fashion_mnist':
    return fashion_mnist.create_data(config, local_batch=local_batch,
                                     eval_local_batch=eval_local_batch)
  if config.dataset.name == 'imagenet2012':
    return imagenet.create_data(config, local_batch=local_batch,
                                eval_local_batch=eval_local_batch)
  raise ValueError(f'Bad config: dataset.name={config.dataset.name!r} is not known')
