"""Mean image and RGB PCA of the ImageNet training set, which training needs.

  python -m alexnet_jax.tools.dataset_stats --config=configs/paper.py

Reads the training split once, each image rescaled and centre-cropped exactly
as training sees it (dataset.resize_size, 256), so it costs about one epoch of
decoding: hours for ILSVRC-2012. Writes `stats_<resize_size>.npz` into the
prepared tfds dataset's folder (or --config.dataset.stats_dir), holding
  mean_image (R, R, 3) and mean_rgb (3,): 0-255 units;
  covariance (3, 3), eigval (3,), eigvec (3, 3) (eigenvectors as columns,
    eigenvalues descending): RGB over all pixels, values scaled to [0, 1];
  num_images, num_unreadable, resize_size.
Pass the same --config.dataset.* overrides (data_dir, resize_size) as training.
"""

from __future__ import annotations

import io
import math
import os

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
import tensorflow as tf
import tqdm

from alexnet_jax import cli
from alexnet_jax import data
from alexnet_jax.data import imagenet

config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).',
                                lock_config=True)
flags.DEFINE_integer('max_examples', 0, 'Use only the first N training images '
                     '(0 = all): a quick estimate, e.g. for a smoke run.')
flags.DEFINE_integer('batch_size', 256, 'Images summed per step.')


def compute_stats(config, *, max_examples: int = 0, batch_size: int = 256,
                  progress: bool = True) -> dict[str, np.ndarray]:
  """Sums over the (first `max_examples` of the) training split, then the PCA."""
  builder = imagenet.prepare(config)
  split = config.dataset.train_split
  n = builder.info.splits[split].num_examples
  if max_examples and max_examples < n:
    n, split = max_examples, f'{split}[:{max_examples}]'

  def sums(batch):
    # float64: a full pass adds ~1e15 in the second moments; float32 would
    # lose the small eigenvalues.
    ok = tf.cast(batch['ok'], tf.float64)
    x = tf.cast(batch['image'], tf.float64) * ok[:, None, None, None]
    pixels = tf.reshape(x, [-1, 3])
    return {'image_sum': tf.reduce_sum(x, 0),
            'outer_sum': tf.matmul(pixels, pixels, transpose_a=True),
            'count': tf.reduce_sum(ok)}

  ds = imagenet.decoded_split(config, builder, split).batch(batch_size)
  ds = ds.map(sums, num_parallel_calls=2).prefetch(2)
  total = None
  bar = tqdm.tqdm(ds.as_numpy_iterator(), total=math.ceil(n / batch_size),
                  unit='batch', desc=f'stats of {split}', disable=not progress)
  for part in bar:
    total = part if total is None else {k: total[k] + part[k] for k in total}
  count = total['count']
  if count == 0:
    raise ValueError(f'No readable image in {split}')
  size = config.dataset.resize_size
  mean_rgb = total['image_sum'].sum((0, 1)) / (count * size * size)
  covariance = (total['outer_sum'] / (count * size * size)
                - np.outer(mean_rgb, mean_rgb)) / 255.0**2
  eigval, eigvec = np.linalg.eigh(covariance)
  order = np.argsort(eigval)[::-1]
  return {
      'mean_image': (total['image_sum'] / count).astype(np.float32),
      'mean_rgb': mean_rgb.astype(np.float32),
      'covariance': covariance,
      'eigval': eigval[order],
      'eigvec': eigvec[:, order],
      'num_images': np.int64(count),
      # Not the stand-ins seen: a failure at the very end has none.
      'num_unreadable': np.int64(n - count),
      'resize_size': np.int64(size),
  }


def write_stats(config, **kwargs) -> tuple[str, dict[str, np.ndarray]]:
  """Computes the statistics and writes them where training looks."""
  stats = compute_stats(config, **kwargs)
  path = imagenet.stats_path(config, imagenet.prepare(config))
  tf.io.gfile.makedirs(os.path.dirname(path))
  # Written under a temporary name first: an interrupted run leaves no
  # half-written file that training would read.
  buffer = io.BytesIO()  # GFile (local or gs://) is not seekable for zip
  np.savez(buffer, **stats)
  tmp = path + '.tmp'
  with tf.io.gfile.GFile(tmp, 'wb') as f:
    f.write(buffer.getvalue())
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return path, stats


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  data.configure_tensorflow()
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError('--config is required, e.g. --config=configs/paper.py')
  if config.dataset.name != 'imagenet2012':
    raise app.UsageError(f'dataset_stats serves imagenet2012, not {config.dataset.name}')
  # An error (missing data, unreadable archives) ends in one line (cli.run).
  path, stats = write_stats(config, max_examples=flags.FLAGS.max_examples,
                            batch_size=flags.FLAGS.batch_size)
  print(f'Wrote {path}: {int(stats["num_images"])} images '
        f'({int(stats["num_unreadable"])} unreadable, skipped); '
        f'mean RGB {np.round(stats["mean_rgb"], 2).tolist()}, '
        f'PCA eigenvalues {np.round(stats["eigval"], 5).tolist()}')


if __name__ == '__main__':
  cli.run(main)
