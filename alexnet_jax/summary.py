"""Per-layer table of a config's network: output shape, parameters, multiply-adds.

  python -m alexnet_jax.summary --config=configs/paper.py

Multiply-adds count the convolutions and fully connected layers (one per
weight use), the convention of the paper's era and of torchvision's tables.
"""

from __future__ import annotations

import numpy as np
from absl import app
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)


def layer_table(config) -> list[dict]:
  """One row per conv/fc layer: name, output shape (per image), params, MACs."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from alexnet_jax import models  # pylint: disable=g-import-not-at-top

  model = models.create_model(config.model, config.dataset.num_classes, config.dtype)
  size = config.dataset.image_size
  x = jnp.zeros((1, size, size, len(config.dataset.mean)), jnp.float32)

  def init_and_run(rng):
    variables = model.init({'params': rng}, x, train=False)
    _, inter = model.apply(variables, x, train=False, capture_intermediates=True,
                           mutable=['intermediates'])
    return variables['params'], inter['intermediates']

  params, inter = jax.eval_shape(init_and_run, jax.random.key(0))
  rows = []
  for name, layer in params.items():
    out_shape = tuple(inter[name]['__call__'][0].shape[1:])
    kernel = layer['kernel'].shape
    n_params = sum(int(np.prod(p.shape)) for p in layer.values())
    # Each output value costs one multiply-add per kernel weight feeding it:
    # kh * kw * in_channels_per_group for convs, in_features for FC layers.
    fan_in = int(np.prod(kernel[:-1]))
    macs = int(np.prod(out_shape)) * fan_in
    rows.append({'layer': name, 'output_shape': out_shape, 'params': n_params,
                 'macs': macs})
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


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if _CONFIG.value is None:
    raise app.UsageError('--config=configs/<name>.py is required')
  print(format_table(layer_table(_CONFIG.value)))


if __name__ == '__main__':
  app.run(main)
