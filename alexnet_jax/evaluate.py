"""Command line: the top-1 / top-5 error of a trained network, or of an ensemble, on a split.

  python -m alexnet_jax.evaluate --workdir=DIR [--workdir=DIR2 ...] [--split=SPLIT]
      [--crops=center|ten] [--max_examples=N]

Each DIR is a training run's workdir (its newest intact checkpoint is used).
With several, the prediction is the mean of their softmax outputs, as the
paper's 5-CNN and 7-CNN entries averaged their networks. Every example of
the split counts once: the data pipeline of the first run's config pads the
last batch and masks the padding, as the trainer's evaluation does (an
unreadable ImageNet image is masked and reported). The split defaults to
the first run's dataset.eval_split (any tfds split, e.g. 'validation' or
'train[:10000]'), the crops to its dataset.eval_crops.

Members must share the label space (dataset.name, num_classes) and every
dataset.* setting that changes the network's input (INPUT_KEYS, and the
mean image or channel mean itself); they may differ in architecture. A
mismatch stops the command with one line naming the key.

Prints the result and writes it, as JSON, to the first workdir:
eval_<split>_<crops>[_max<N>][_ensemble-<hash of the members>].json.
"""

from __future__ import annotations

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

# pylint: disable=g-import-not-at-top,wrong-import-position
import hashlib
import re
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from alexnet_jax import backend
from alexnet_jax import checkpointing
from alexnet_jax import cli
from alexnet_jax import data
from alexnet_jax import inference
from alexnet_jax import train
# pylint: enable=g-import-not-at-top,wrong-import-position

# The dataset.* keys that change what a network is fed in evaluation (besides
# name and num_classes, the label space). Not here: augmentation, locations
# and reading options.
INPUT_KEYS = ('image_size', 'resize_size', 'crop_padding', 'mean_mode', 'mean', 'std',
              'channel_order', 'prescaled', 'prescaled_quality')


def define_flags():
  """Command-line flags; defined on running, so importing this module defines none."""
  flags.DEFINE_multi_string('workdir', None, 'Workdir of a training run; repeat for an '
                            'ensemble (the mean of the members\' softmax outputs).')
  flags.DEFINE_string('split', '', "Split to evaluate, e.g. 'test', 'validation', "
                      "'train[:5000]'; default: the first run's dataset.eval_split.")
  flags.DEFINE_enum('crops', None, list(inference.CROPS),
                    "'center' or 'ten' (the paper's ten patches); default: the first run's "
                    'dataset.eval_crops.')
  flags.DEFINE_integer('max_examples', 0, 'Evaluate the first N examples only (0 = all).')
  flags.DEFINE_integer('batch_size', 0, 'Examples per batch; 0 = dataset.eval_batch_size '
                       '(divided by 10 for ten crops).')


def check_members(configs: Sequence, workdirs: Sequence[str]) -> None:
  """Raises ValueError unless every config has the first one's labels and input."""
  first = configs[0].dataset
  for config, workdir in zip(configs[1:], workdirs[1:]):
    for key in ('name', 'num_classes') + INPUT_KEYS:
      mine, theirs = config.dataset[key], first[key]
      if _plain(mine) != _plain(theirs):
        what = 'label space' if key in ('name', 'num_classes') else 'preprocessing'
        raise ValueError(
            f'--workdir={workdir} cannot join the ensemble: its dataset.{key} is '
            f'{_plain(mine)!r}, {workdirs[0]} has {_plain(theirs)!r} (members must share '
            f'the {what}); evaluate them apart')


def check_means(configs: Sequence, workdirs: Sequence[str]) -> None:
  """Raises ValueError unless the members subtract the same mean from their input.

  With mean_mode 'image' or 'channel' the mean is the statistics file of each
  run's dataset folder (dataset.stats_dir or data_dir).
  """
  if configs[0].dataset.mean_mode == 'constant':
    return  # dataset.mean, compared by check_members
  means = [None if s is None else s.mean for s in map(data.input_stats, configs)]
  for mean, workdir in zip(means[1:], workdirs[1:]):
    if mean is not None and not np.array_equal(mean, means[0]):
      raise ValueError(
          f'--workdir={workdir} cannot join the ensemble: its statistics file (dataset.'
          f'stats_dir / data_dir) holds another mean than that of {workdirs[0]} (members '
          'must share the preprocessing); evaluate them apart')


def _plain(value):
  """Config values as JSON gives them back: tuples and lists alike."""
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def ensemble_log_probs(logits: Sequence) -> jax.Array:
  """log of the mean of the members' softmax outputs, from their logits (B, classes).

  Computed as a log-sum-exp of log-softmaxes: exact where a probability
  underflows float32.
  """
  log_probs = jnp.stack([jax.nn.log_softmax(jnp.asarray(l)) for l in logits])
  return jax.nn.logsumexp(log_probs, axis=0) - jnp.log(len(logits))


@jax.jit
def _counts(logits: list, labels, mask) -> dict:
  """`train.masked_counts` of the ensemble's mean softmax."""
  return train.masked_counts(ensemble_log_probs(logits), labels, mask)


def evaluate(networks: Sequence[inference.Network], *, split: str, crops: str,
             max_examples: int = 0, batch_size: int = 0, progress: bool = True) -> dict:
  """Top-1 / top-5 error and loss of the members' mean softmax on `split`.

  The data are the first member's evaluation pipeline (`inference.eval_batches`:
  padded and masked); only real examples count.
  """
  config = networks[0].config
  if not batch_size:
    batch_size = max(1, config.eval_batch_size // (10 if crops == 'ten' else 1))
  batches, total = inference.eval_batches(config, split, crops, batch_size, max_examples)
  sums = None
  with tqdm.tqdm(total=total, unit='image', desc=f'{split} ({crops})', disable=not progress,
                 leave=False) as bar:
    for batch in batches:
      logits = [net(batch['image'])['logits'] for net in networks]
      counts = _counts(logits, batch['label'], batch['mask'])
      sums = counts if sums is None else jax.tree.map(jnp.add, sums, counts)
      bar.update(int(min(len(batch['mask']), total - bar.n)))
  sums = jax.device_get(sums) if sums is not None else {'count': 0}
  n = float(sums['count'])
  if not n:
    raise ValueError(f'split {split!r} has no readable example to evaluate: pass another '
                     '--split')
  return {
      'split': split,
      'crops': crops,
      'num_examples': int(n),
      'top1_error': 1.0 - float(sums['top1_correct']) / n,
      'top5_error': 1.0 - float(sums['top5_correct']) / n,
      'loss': float(sums['loss_sum']) / n,
      'max_examples': max_examples,
      'members': [{'workdir': os.path.abspath(net.workdir), 'step': net.step}
                  for net in networks],
  }


def result_filename(result: dict) -> str:
  """eval_<split>_<crops>[_max<N>][_ensemble-<hash>].json for `result` of `evaluate`."""
  name = f'eval_{re.sub(r"[^A-Za-z0-9_.%-]+", "-", result["split"]).strip("-")}_{result["crops"]}'
  if result['max_examples']:
    name += f'_max{result["max_examples"]}'
  members = result['members']
  if len(members) > 1:
    key = '\n'.join(sorted(f'{m["workdir"]}@{m["step"]}' for m in members))
    name += f'_ensemble-{hashlib.sha256(key.encode()).hexdigest()[:10]}'
  return name + '.json'


def format_result(result: dict) -> str:
  members = result['members']
  lines = [f'{"Ensemble of " + str(len(members)) if len(members) > 1 else "Network"} on '
           f'{result["split"]}, {result["crops"]} crop{"s" if result["crops"] == "ten" else ""}: '
           f'top-1 error {result["top1_error"]:.4f}, top-5 error {result["top5_error"]:.4f}, '
           f'loss {result["loss"]:.4f} ({result["num_examples"]} examples)']
  lines += [f'  {m["workdir"]} (step {m["step"]})' for m in members]
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  workdirs = flags.FLAGS.workdir
  if not workdirs:
    raise app.UsageError('--workdir is required (repeat it for an ensemble)')
  for name in ('max_examples', 'batch_size'):
    if flags.FLAGS[name].value < 0:
      raise ValueError(f'--{name}={flags.FLAGS[name].value} must be >= 0')
  data.configure_tensorflow()
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and tfds are chatty at INFO
  configs = [inference.load_config(w) for w in workdirs]
  check_members(configs, workdirs)  # before any checkpoint is read
  check_means(configs, workdirs)
  networks = [inference.load(w, c) for w, c in zip(workdirs, configs)]
  first = configs[0].dataset
  result = evaluate(networks, split=flags.FLAGS.split or first.eval_split,
                    crops=flags.FLAGS.crops or first.eval_crops,
                    max_examples=flags.FLAGS.max_examples, batch_size=flags.FLAGS.batch_size)
  print(format_result(result))
  path = os.path.join(workdirs[0], result_filename(result))
  try:
    checkpointing.write_json(path, result)
  except OSError as e:
    raise FileNotFoundError(f'cannot write {path} ({e.strerror or e}): make '
                            f'{workdirs[0]} writable') from e
  print(f'Wrote {path}')


if __name__ == '__main__':
  backend.configure_process()  # XLA reads XLA_FLAGS once, before a backend starts
  define_flags()
  cli.run(main)
