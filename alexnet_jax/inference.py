"""A trained network, loaded from its run's workdir, and image files prepared for it.

  net = inference.load('runs/fashion_mnist')
  inputs = inference.read_images(net, ['shoe.png'], crops='center')
  probs = net.apply(inputs)['probs']

`load_config` rebuilds the run's config: `config_lib.base_config()` updated
with the workdir's config.json (a key this code does not know is an error
naming it, so that a config from another version is never half applied).
`load` builds the network of that config on the operations
`backend.select_ops` chooses here and restores the parameters of the newest
intact checkpoint (`checkpointing.Checkpointer.restore_latest`, into the
`train.create_train_state` template the trainer saved). The network runs
whole on one device, with train=False: dropout off.

Image files are prepared by `data.file_input`, which applies the function
the evaluation pipeline of the run's dataset maps over its images, so a file
holding a dataset image gets exactly the input evaluation gives it. With
crops='ten' (the paper's test) the probabilities are the mean of the softmax
over the ten patches.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf

from alexnet_jax import backend
from alexnet_jax import checkpointing
from alexnet_jax import config_lib
from alexnet_jax import data as data_lib
from alexnet_jax import model as model_lib
from alexnet_jax import optim
from alexnet_jax import train
from alexnet_jax.data import fashion_mnist
from alexnet_jax.data import imagenet

CROPS = ('center', 'ten')
WORKDIR_HINT = ('pass the --workdir of a training run (python -m alexnet_jax.main '
                '--workdir=DIR writes config.json and checkpoints/ there)')


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config of the run in `workdir`: base_config() updated with its config.json.

  Set up to run the whole network on one device (model_parallel=1) and
  validated. Raises FileNotFoundError without config.json, ValueError for a
  key that base_config() lacks (naming every such key) or a bad value.
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'--workdir={workdir} is not a folder: {WORKDIR_HINT}')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{workdir} holds no config.json: {WORKDIR_HINT}')
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} cannot be read as JSON ({str(e).splitlines()[0]}): '
                     f'{WORKDIR_HINT}') from e
  config = config_lib.base_config()
  values = config_lib.flatten(saved)
  unknown = sorted(set(values) - set(config_lib.flatten(json.loads(config.to_json_best_effort()))))
  if unknown:
    raise ValueError(f'{path} has config keys this code does not know: {", ".join(unknown)} '
                     '(written by another version of alexnet_jax?); remove them or use '
                     'the version that wrote it')
  try:
    config.update_from_flattened_dict(values)
  except (TypeError, ValueError, KeyError) as e:
    raise ValueError(f'{path} holds a value of the wrong type: {e}') from e
  config.model_parallel = 1  # the whole network on one device
  config.num_devices = 0
  config_lib.validate(config, 1)
  return config


def class_names(config) -> list[str]:
  """Names of the classes in class-index order (`class i` where none is known)."""
  names = []
  if config.dataset.name == 'fashion_mnist':
    names = list(fashion_mnist.CLASS_NAMES)
  elif config.dataset.name == 'imagenet2012':
    names = imagenet.class_names()
  n = config.dataset.num_classes
  return names if len(names) == n else [f'class {i}' for i in range(n)]


def hidden_layer(model: model_lib.AlexNet) -> str:
  """The name of the network's last hidden layer (fc7 in the paper)."""
  if not model.fc_features:
    raise ValueError('the network has no hidden fully connected layer (model.fc_features=())')
  return f'fc{len(model.fc_features) + 5}'


def forward(model: model_lib.AlexNet, params, images, *, features: bool = False) -> dict:
  """{'logits', 'probs'[, 'features']} of a batch, train=False.

  images (B, H, W, C) or (B, crops, H, W, C); with crops, 'probs' is the
  mean of the softmax over the crops and 'logits' its log (as
  `train.eval_step`), 'features' the mean over the crops. 'features' is the
  last hidden layer after its ReLU, (B, fc_features[-1]), captured from the
  network as it runs.
  """
  crops = images.shape[1] if images.ndim == 5 else 0
  x = images.reshape((-1,) + images.shape[-3:])
  variables = {'params': params}
  out = {}
  if features:
    name = hidden_layer(model)
    logits, state = model.apply(
        variables, x, train=False, mutable=['intermediates'],
        capture_intermediates=lambda m, method: m.name == name and method == '__call__')
    out['features'] = jax.nn.relu(state['intermediates'][name]['__call__'][0]).astype(jnp.float32)
  else:
    logits = model.apply(variables, x, train=False)
  probs = jax.nn.softmax(logits)
  if crops:
    probs = probs.reshape(-1, crops, probs.shape[-1]).mean(axis=1)
    logits = jnp.log(probs)
    if features:
      out['features'] = out['features'].reshape(-1, crops, out['features'].shape[-1]).mean(1)
  out['logits'], out['probs'] = logits, probs
  return out


@dataclasses.dataclass
class Network:
  """A trained network: its config, parameters (step `step`) and class names."""
  workdir: str
  config: ml_collections.ConfigDict
  model: model_lib.AlexNet
  params: Any
  step: int
  class_names: list[str]

  def __post_init__(self):
    self._forward = jax.jit(functools.partial(forward, self.model),
                            static_argnames=('features',))

  def __call__(self, images, *, features: bool = False) -> dict:
    """`forward` of one batch (jitted: keep batch shapes few), as jax arrays."""
    return self._forward(self.params, images, features=features)

  def apply(self, images: np.ndarray, *, features: bool = False,
            batch_size: int = 64) -> dict[str, np.ndarray]:
    """`forward` of any number of images, in padded batches of `batch_size`, as numpy."""
    parts = []
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      n = len(chunk)
      if n < batch_size:  # one shape: one compilation
        chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:],
                                                chunk.dtype)])
      out = jax.device_get(self(chunk, features=features))
      parts.append({k: v[:n] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}

  @functools.cached_property
  def stats(self) -> imagenet.Stats | None:
    """The mean preprocessing subtracts (ImageNet; None for Fashion-MNIST)."""
    return data_lib.input_stats(self.config)


def _has_checkpoint(directory: str) -> bool:
  try:
    return any(name.isdigit() for name in os.listdir(directory))
  except OSError:
    return False


def load(workdir: str, config: ml_collections.ConfigDict | None = None) -> Network:
  """The network of `workdir` with the parameters of its newest intact checkpoint.

  `config`: the one `load_config(workdir)` returns, if already read. A
  checkpoint that fails its checksum is moved aside and the one before it
  used, as when training resumes. Raises FileNotFoundError without a
  checkpoint, checkpointing's errors for an incompatible or damaged one.
  """
  config = config if config is not None else load_config(workdir)
  directory = os.path.join(workdir, 'checkpoints')
  missing = FileNotFoundError(f'{workdir} holds no checkpoint (in {directory}): '
                              f'{WORKDIR_HINT}')
  if not _has_checkpoint(directory):
    raise missing
  model = model_lib.create_model(config, backend.select_ops(config.conv_impl, config.dtype))
  # The trainer's state, as shapes only, then zeros: no initialisation to compile.
  shapes = jax.eval_shape(lambda: train.create_train_state(
      config, model, optim.create_optimizer(config.optimizer)))
  template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  ckpt = checkpointing.Checkpointer(directory)
  try:
    restored = ckpt.restore_latest(template)
  finally:
    ckpt.close()
  if restored is None:
    raise missing
  state, _ = restored
  return Network(workdir=workdir, config=config, model=model,
                 params=jax.device_put(state.params), step=int(state.step),
                 class_names=class_names(config))


def eval_batches(config, split: str, crops: str, batch_size: int,
                 limit: int = 0) -> tuple[Iterator[dict], int]:
  """(the evaluation pipeline's batches of `split`, the number of examples they hold).

  The batches of `data.create_data(config).eval(crops)` with `split` as the
  eval split: padded and masked so that every example counts once, plus
  'index', each slot's position in the split. With `limit`, only the first
  `limit` examples (read alone where the split allows): any others are
  masked as padding is, and the iterator ends after them.
  """
  config = copy.deepcopy(config)
  if limit and '[' not in split:
    split = f'{split}[:{limit}]'  # tfds reads only those
  config.dataset.eval_split = split
  # The training stream is never read: pointed at the same split, so that no
  # other split is loaded, and given a batch of 1, which any split fills.
  config.dataset.train_split = split
  pipelines = data_lib.create_data(config, local_batch=1, eval_local_batch=batch_size)
  total = min(pipelines.num_eval, limit) if limit else pipelines.num_eval

  def batches():
    seen = 0
    for batch in pipelines.eval(crops):
      # The examples come in order, padding after them.
      index = seen + np.arange(len(batch['mask']))
      if index[0] >= total:
        return  # past the limit
      yield {**batch, 'index': index, 'mask': batch['mask'] * (index < total)}
      seen += len(batch['mask'])

  return batches(), total


def _op_error_reason(error: tf.errors.OpError) -> str:
  """TensorFlow's message without its op and device decorations, one line."""
  lines = (error.message or '').strip().splitlines() or [type(error).__name__]
  text = re.sub(r'\{\{[^}]*\}\}\s*', '', lines[0])
  return text.split(' [Op:')[0].strip() or type(error).__name__


def read_image(path: str, config, crops: str,
               stats: imagenet.Stats | None = None) -> np.ndarray:
  """One image file as the network's input ((10,) H, W, C), as evaluation prepares images.

  Raises FileNotFoundError for a file that cannot be read and ValueError for
  one that is not an image, in one line naming it.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{path}: no such file; pass image files (JPEG, PNG, GIF '
                            'or BMP)') from e
  except OSError as e:
    raise FileNotFoundError(f'{path} cannot be read ({e.strerror or e}); pass image '
                            'files (JPEG, PNG, GIF or BMP)') from e
  try:
    return data_lib.file_input(config, data, crops, stats)
  except tf.errors.OpError as e:
    raise ValueError(f'{path} is not a readable image ({_op_error_reason(e)}); pass a '
                     'JPEG, PNG, GIF or BMP file') from e


def read_images(network: Network, paths: Sequence[str], crops: str) -> np.ndarray:
  """The network's inputs of image files: (N, [10,] H, W, C) float32 (`read_image`)."""
  if crops not in CROPS:
    raise ValueError(f'--crops={crops!r}; use one of {", ".join(CROPS)}')
  stats = network.stats
  return np.stack([read_image(p, network.config, crops, stats) for p in paths])


def top_k(probs: np.ndarray, names: Sequence[str], k: int = 5) -> list[list]:
  """[[class index, name, probability], ...] of the `k` most probable classes, best first."""
  order = np.argsort(-probs, kind='stable')[:k]
  return [[int(i), names[i], float(probs[i])] for i in order]
