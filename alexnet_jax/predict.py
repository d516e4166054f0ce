"""Command line: the top-5 classes of image files under a trained network.

  python -m alexnet_jax.predict --workdir=DIR [--crops=center|ten] [--json] IMAGE...

DIR is a training run's workdir (config.json and checkpoints/); the newest
intact checkpoint is used. Each file is prepared as evaluation prepares the
run's dataset (alexnet_jax/inference.py): for ImageNet the central square
rescaled to dataset.resize_size and the centre crop, or the paper's ten
patches with their softmax averaged; for Fashion-MNIST a 28x28 grey image.
Prints, per image, the five most probable classes with their probabilities;
--json prints one JSON object per line instead:
  {"file": "shoe.png", "top5": [[class_index, "name", probability], ...]}
A file that cannot be read or is not an image stops the command with one
line naming it.
"""

from __future__ import annotations

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

# pylint: disable=g-import-not-at-top,wrong-import-position
import json

from absl import app
from absl import flags
from absl import logging

from alexnet_jax import backend
from alexnet_jax import cli
from alexnet_jax import data
from alexnet_jax import inference
# pylint: enable=g-import-not-at-top,wrong-import-position


def define_flags():
  """Command-line flags; defined on running, so importing this module defines none."""
  flags.DEFINE_string('workdir', None, 'Workdir of a training run (config.json, checkpoints/).')
  flags.DEFINE_enum('crops', None, list(inference.CROPS),
                    "'center' or 'ten' (the paper's ten patches); default: the run's "
                    'dataset.eval_crops.')
  flags.DEFINE_bool('json', False, 'One JSON object per image and line.')
  flags.DEFINE_integer('batch_size', 32, 'Images per forward pass.')


def predictions(network: inference.Network, paths: list[str], crops: str,
                batch_size: int = 32) -> list[dict]:
  """[{'file': path, 'top5': [[class index, name, probability], ...]}, ...]."""
  inputs = inference.read_images(network, paths, crops)
  probs = network.apply(inputs, batch_size=batch_size)['probs']
  return [{'file': path, 'top5': inference.top_k(p, network.class_names)}
          for path, p in zip(paths, probs)]


def format_text(result: dict) -> str:
  lines = [result['file']]
  lines += [f'  {prob:7.2%}  {name} ({index})' for index, name, prob in result['top5']]
  return '\n'.join(lines)


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Pass one or more image files, e.g. '
                         'python -m alexnet_jax.predict --workdir=DIR photo.jpg')
  if not flags.FLAGS.workdir:
    raise app.UsageError('--workdir is required: the folder of a training run')
  if flags.FLAGS.batch_size < 1:
    raise ValueError(f'--batch_size={flags.FLAGS.batch_size} must be positive')
  data.configure_tensorflow()
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and tfds are chatty at INFO
  network = inference.load(flags.FLAGS.workdir)
  crops = flags.FLAGS.crops or network.config.dataset.eval_crops
  for result in predictions(network, paths, crops, flags.FLAGS.batch_size):
    print(json.dumps(result) if flags.FLAGS.json else format_text(result))


if __name__ == '__main__':
  backend.configure_process()  # XLA reads XLA_FLAGS once, before a backend starts
  define_flags()
  cli.run(main)
