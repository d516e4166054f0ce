"""Per-layer table of a config's network: output shape, parameters, multiply-adds.

  python -m alexnet_jax.summary --config=configs/paper.py
  python -m alexnet_jax.summary --config=configs/paper.py --config.model_parallel=2

Multiply-adds count the convolutions and fully connected layers (one per
weight use), the convention of the paper's era and of torchvision's tables.

After the table come the bytes each device holds and sends per training step
for 2, 4 and 8 devices (`--devices` to choose others): data parallel
(`model_parallel=1`, every device holds the whole model and all-reduces the
whole gradient) or the paper's split (`model_parallel=2`, devices form tower
pairs that exchange activations at the inputs of conv3, fc6, fc7 and fc8 and
the logits, and all-reduce half the gradient across the pairs). Volumes are
counted as a ring all-reduce sends them: 2 (R - 1) / R times the gradient
bytes per device over R replicas; an all-gather between two towers sends a
device's half of the activation forward and the partner's half of its
gradient backward.
"""

from __future__ import annotations

import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import jax
import jax.numpy as jnp

from alexnet_jax import cli
from alexnet_jax import model as model_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
_DEVICES = flags.DEFINE_list('devices', ['2', '4', '8'],
                             'Device counts to show per-device memory and traffic for.')


def layer_table(config) -> list[dict]:
  """One row per conv/fc layer: name, output shape (per image), params, MACs.

  A convolution's output is its map before the pooling that follows it.
  """
  model = model_lib.create_model(config)
  size = config.dataset.image_size
  x = jnp.zeros((1, size, size, len(config.dataset.mean)), jnp.float32)

  def init_and_run(rng):
    variables = model.init({'params': rng}, x, train=False)
    _, inter = model.apply(variables, x, train=False, capture_intermediates=True,
                           mutable=['intermediates'])
    return variables['params'], inter['intermediates']

  params, inter = jax.eval_shape(init_and_run, jax.random.key(0))
  rows = []
  in_hw = (size, size)
  for name, layer in params.items():
    kernel = layer['kernel'].shape
    out = inter[name]['__call__'][0].shape[1:]  # after pooling, for conv1, conv2, conv5
    if len(kernel) == 4:
      conv = model.kernel_sizes
      i = int(name[len('conv'):]) - 1
      stride = model.conv1_stride if i == 0 else 1
      pad = model.conv1_padding if i == 0 else conv[i] // 2
      out_shape = tuple((n + 2 * pad - conv[i]) // stride + 1 for n in in_hw) + (kernel[-1],)
      in_hw = out[:2]
    else:
      out_shape = tuple(out)
    n_params = sum(int(np.prod(p.shape)) for p in layer.values())
    # Each output value costs one multiply-add per kernel weight feeding it:
    # kh * kw * in_channels_per_group for convs, in_features for FC layers.
    fan_in = int(np.prod(kernel[:-1]))
    macs = int(np.prod(out_shape)) * fan_in
    rows.append({'layer': name, 'output_shape': out_shape, 'params': n_params,
                 'macs': macs, 'in_features': kernel[-2]})
  return rows


def format_table(rows: list[dict]) -> str:
  lines = [f'{"layer":<8}{"output (HxWxC)":>18}{"params":>14}{"MACs":>16}']
  for r in rows:
    shape = 'x'.join(str(d) for d in r['output_shape'])
    lines.append(f'{r["layer"]:<8}{shape:>18}{r["params"]:>14,}{r["macs"]:>16,}')
  total_p = sum(r['params'] for r in rows)
  total_m = sum(r['macs'] for r in rows)
  lines.append(f'total params: {total_p}  MACs: {total_m}')
  return '\n'.join(lines)


def exchanged_features(config, rows: list[dict]) -> list[tuple[str, int]]:
  """Per-image activations the towers all-gather: (where, values per image).

  The inputs of conv3, of every dense layer, and the logits (fc8 is split by
  output units like every layer; see alexnet_jax/parallel.py).
  """
  by_name = {r['layer']: r for r in rows}
  h, w, _ = by_name['conv3']['output_shape']
  # conv3 is stride 1 with "same" padding: its input has its output's size.
  conv3_in = h * w * by_name['conv3']['in_features']
  points = [('conv3 input', conv3_in)]
  points += [(f'{r["layer"]} input', r['in_features']) for r in rows
             if r['layer'].startswith('fc')]
  points.append(('logits', config.dataset.num_classes))
  return points


def traffic(config, rows: list[dict], num_devices: int) -> dict:
  """Bytes per device: parameters held, and sent per training step."""
  towers = 2 if config.model_parallel == 2 else 1
  if num_devices % towers:
    raise ValueError(f'{num_devices} devices do not form tower pairs')
  replicas = num_devices // towers
  if config.global_batch_size % replicas:
    raise ValueError(f'global batch {config.global_batch_size} does not divide '
                     f'into {replicas} replicas')
  per_replica = config.global_batch_size // replicas
  act_bytes = {'float32': 4, 'bfloat16': 2, 'float16': 2}[config.dtype]
  param_bytes = sum(r['params'] for r in rows) * 4 // towers  # float32 params
  exchange = 0
  if towers == 2:
    per_image = sum(n for _, n in exchanged_features(config, rows))
    # Forward: send my half; backward: send the partner's half of the gradient.
    exchange = 2 * per_replica * (per_image // 2) * act_bytes
  allreduce = 2 * (replicas - 1) * param_bytes // replicas
  return {'devices': num_devices, 'towers': towers, 'replicas': replicas,
          'param_bytes': param_bytes, 'tower_exchange_bytes': exchange,
          'gradient_allreduce_bytes': allreduce}


def format_traffic(config, rows: list[dict], device_counts: list[int]) -> str:
  mb = lambda b: f'{b / 1e6:,.1f} MB'
  lines = [f'\nper device, global batch {config.global_batch_size}, '
           f'{config.dtype} activations, float32 parameters '
           f'(optimiser state adds the same again for momentum):']
  if config.model_parallel == 2:
    points = ', '.join(f'{name} {n:,}' for name, n in exchanged_features(config, rows))
    lines.append(f'tower exchange points (values per image): {points}')
  lines.append(f'{"devices":>8}{"layout":>22}{"param bytes":>16}'
               f'{"towers send":>16}{"all-reduce send":>18}')
  for n in device_counts:
    t = traffic(config, rows, n)
    layout = (f'{t["replicas"]} pair(s) x 2 towers' if t['towers'] == 2
              else f'{t["replicas"]} replicas')
    lines.append(f'{n:>8}{layout:>22}{mb(t["param_bytes"]):>16}'
                 f'{mb(t["tower_exchange_bytes"]):>16}'
                 f'{mb(t["gradient_allreduce_bytes"]):>18}')
  return '\n'.join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _CONFIG.value is None:
    raise app.UsageError('--config=configs/<name>.py is required')
  config = _CONFIG.value
  rows = layer_table(config)
  print(format_table(rows))
  print(format_traffic(config, rows, [int(n) for n in _DEVICES.value]))


if __name__ == '__main__':
  cli.run(main)
