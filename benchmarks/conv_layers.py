"""Each convolution of a network, timed alone: JAX (XLA's and oneDNN's kernels) and PyTorch.

  python -m benchmarks.conv_layers --config=configs/single_tower.py \\
      [--config.global_batch_size=64] [--out=FILE]

(from the repository's root, or with it on PYTHONPATH).

For every convolution of the config's network, at the config's batch size,
one process times interleaved:
  xla     the convolution of the reference operations (`ops.conv_nhwc`, what
          conv_impl='xla' runs: XLA CPU's Eigen kernels; a grouped layer is
          one convolution with feature groups), jitted: the forward pass, the
          input gradient and the kernel gradient, each its own program;
  onednn  the same on the CPU kernels (`alexnet_jax.cpu.onednn.conv_nhwc`,
          what conv_impl='onednn' and the CPU default run; a grouped layer is
          one call with feature groups); left out, with a note, when oneDNN
          cannot be built;
  winograd  the same with conv_impl='winograd' (oneDNN's Winograd kernels
          for the float32 3x3 stride-1 layers, the direct ones elsewhere);
          left out with onednn;
  torch  `torch.nn.functional.conv2d` (groups = towers for grouped layers,
         channels_last) and `aten.convolution_backward` for the input and the
         kernel gradient alone, as autograd calls it.
Each of --reps repetitions times every part of both once; medians are
reported. conv1's input gradient is timed but left out of the totals: a
network never computes the gradient of its input images. It prints a table
and writes JSON. The train-step benchmark (`benchmarks.train_step`) times
whole steps; this one shows how much of the difference is in the
convolution kernels themselves (XLA's Eigen kernels against oneDNN's, called
from JAX or from PyTorch).
"""

from __future__ import annotations

import os

from alexnet_jax import backend
from alexnet_jax import cli

backend.configure_process()  # XLA reads XLA_FLAGS once, before a backend starts

# pylint: disable=g-import-not-at-top,wrong-import-position
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from alexnet_jax import ops as ops_lib
from alexnet_jax import summary  # pylint: disable=unused-import  # defines --config
# This benchmark times the CPU kernels themselves, not the operations a run selects.
from alexnet_jax.cpu import onednn
import benchmarks
# pylint: enable=g-import-not-at-top,wrong-import-position


def define_flags():
  """Command-line flags; defined on running, so importing this module defines none."""
  flags.DEFINE_string('out', '', 'JSON results file; default '
                      'benchmarks_out/conv_layers_<config>_b<batch>.json.')
  flags.DEFINE_integer('reps', 5, 'Interleaved repetitions; the median is reported.')


PARTS = ('forward', 'input_grad', 'kernel_grad')


def conv_layers(config) -> list[dict]:
  """The network's convolutions: input size, channels, kernel, stride, pads, groups.

  As `model.AlexNet` builds them: conv1 with the config's stride and
  padding, the others stride 1 with "same" padding; conv2, conv4 and conv5
  grouped by tower; max pooling after conv1 and conv2.
  """
  m = config.model
  size = config.dataset.image_size
  channels = len(config.dataset.mean)
  layers = []
  for i, (features, k) in enumerate(zip(m.features, m.kernel_sizes)):
    stride = m.conv1_stride if i == 0 else 1
    pad = m.conv1_padding if i == 0 else k // 2
    if isinstance(pad, str):
      pads = jax.lax.padtype_to_pads((size, size), (k, k), (stride, stride), pad)
    else:
      pads = [(pad, pad), (pad, pad)]
    pads = [tuple(int(p) for p in pair) for pair in pads]
    out = (size + sum(pads[0]) - k) // stride + 1
    groups = m.towers if i in (1, 3, 4) else 1
    layers.append({'layer': f'conv{i + 1}', 'in_size': size, 'in_channels': channels,
                   'out_size': out, 'out_channels': features, 'kernel': k,
                   'stride': stride, 'pads': pads, 'groups': groups,
                   'macs_per_image': out * out * features * k * k * channels // groups})
    size, channels = out, features
    if i in (0, 1):  # the max pool after conv1 and conv2
      if m.pool_padding == 'SAME':
        size = -(-size // m.pool_stride)
      else:
        size = (size - m.pool_window) // m.pool_stride + 1
  return layers


def make_inputs(layer: dict, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Input (NHWC), kernel (HWIO, towers side by side) and output gradient."""
  rs = np.random.RandomState(seed)
  k, n, m = layer['kernel'], layer['in_size'], layer['out_size']
  cin = layer['in_channels'] // layer['groups']
  return {
      'x': rs.randn(batch, n, n, layer['in_channels']).astype(np.float32),
      'w': (rs.randn(k, k, cin, layer['out_channels']) * 0.01).astype(np.float32),
      'gy': rs.randn(batch, m, m, layer['out_channels']).astype(np.float32),
  }


IMPLS = ('xla', 'onednn', 'winograd')  # the JAX columns


def conv_fn(impl: str):
  """conv(x, kernel, stride, pads, groups) of one JAX column, without a bias.

  'xla': the reference operations' convolution; 'onednn' and 'winograd': the
  CPU kernels' (direct, or Winograd where oneDNN has it).
  """
  if impl == 'xla':
    return ops_lib.conv_nhwc
  if impl in ('onednn', 'winograd'):
    return lambda x, w, stride, pads, groups: onednn.conv_nhwc(
        x, w, stride, pads, groups, winograd=impl == 'winograd')
  raise ValueError(f'impl={impl!r}; use one of {IMPLS}')


def jax_parts(layer: dict, inputs: dict, impl: str):
  """Forward / input-gradient / kernel-gradient functions.

  Each returns one array (NHWC, or HWIO for the kernel gradient) that holds
  the towers side by side, as `model.AlexNet` keeps them: a grouped layer is
  one convolution with feature groups in every column.
  """
  conv = conv_fn(impl)
  x, w, gy = (jnp.asarray(inputs[n]) for n in ('x', 'w', 'gy'))

  def apply(x, w):
    return conv(x, w, layer['stride'], layer['pads'], layer['groups'])

  programs = {
      'forward': jax.jit(lambda x, w, gy: apply(x, w)),
      'input_grad': jax.jit(
          lambda x, w, gy: jax.vjp(lambda x: apply(x, w), x)[1](gy)[0]),
      'kernel_grad': jax.jit(
          lambda x, w, gy: jax.vjp(lambda w: apply(x, w), w)[1](gy)[0]),
  }
  return {name: (lambda f=f: jax.block_until_ready(f(x, w, gy)))
          for name, f in programs.items()}


def torch_parts(layer: dict, inputs: dict):
  """The same three parts in PyTorch, channels_last; results viewed as NHWC / HWIO."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  g = layer['groups']
  (pt, pb), (pl, pr) = layer['pads']
  last = torch.channels_last
  x = torch.from_numpy(inputs['x']).permute(0, 3, 1, 2)
  if (pt, pl) != (pb, pr):  # uneven "same" pads: pad the input once, outside the timing
    x, padding = F.pad(x, (pl, pr, pt, pb)), [0, 0]
  else:
    padding = [pt, pl]
  x = x.contiguous(memory_format=last)
  w = torch.from_numpy(inputs['w']).permute(3, 2, 0, 1).contiguous(memory_format=last)
  gy = torch.from_numpy(inputs['gy']).permute(0, 3, 1, 2).contiguous(memory_format=last)
  stride = [layer['stride']] * 2

  def backward(mask):
    return torch.ops.aten.convolution_backward(
        gy, x, w, None, stride, padding, [1, 1], False, [0, 0], g, mask)

  def input_grad():
    dx = backward([True, False, False])[0]
    return dx[:, :, pt:dx.shape[2] - pb, pl:dx.shape[3] - pr] if padding == [0, 0] else dx

  to_nhwc = lambda t: t.permute(0, 2, 3, 1)
  return {  # no tensor requires grad: no autograd graph is recorded
      'forward': lambda: to_nhwc(F.conv2d(x, w, stride=stride, padding=padding, groups=g)),
      'input_grad': lambda: to_nhwc(input_grad()),
      'kernel_grad': lambda: backward([False, True, False])[1].permute(2, 3, 1, 0),
  }


def _time(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def run_benchmark(config, reps: int) -> dict:
  """Median seconds of every part of every convolution, every implementation."""
  # PyTorch is needed by this function only (the JAX columns run without it).
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_alexnet  # pylint: disable=g-import-not-at-top
  threads = torch_alexnet.setup_cpu_threads()
  batch = config.global_batch_size
  missing = backend.cpu_kernels_unavailable()
  if missing:
    print(f'oneDNN column left out: {missing}')
  impls = ('xla',) if missing else IMPLS
  rows = []
  for layer in conv_layers(config):
    inputs = make_inputs(layer, batch)
    runs = {impl: jax_parts(layer, inputs, impl) for impl in impls}
    runs['torch'] = torch_parts(layer, inputs)
    for parts in runs.values():
      for fn in parts.values():
        fn()  # compile / warm up
    samples = {fw: {p: [] for p in PARTS} for fw in runs}
    for _ in range(reps):
      for part in PARTS:
        for fw, parts in runs.items():
          samples[fw][part].append(_time(parts[part]))
    sec = {fw: {p: statistics.median(v) for p, v in s.items()} for fw, s in samples.items()}
    counted = [p for p in PARTS if not (layer['layer'] == 'conv1' and p == 'input_grad')]
    for fw in sec:
      sec[fw]['total'] = sum(sec[fw][p] for p in counted)
    row = dict(layer, seconds=sec, samples_seconds=samples,
               flops_per_part=2 * layer['macs_per_image'] * batch, counted_parts=counted,
               vs_torch_time={i: sec[i]['total'] / sec['torch']['total'] for i in impls})
    print(format_row(row), flush=True)
    rows.append(row)
  totals = {fw: sum(r['seconds'][fw]['total'] for r in rows) for fw in runs}
  return {
      'config': config.dataset.name, 'batch': batch, 'layers': rows,
      'total_seconds': totals,
      'vs_torch_time': {i: totals[i] / totals['torch'] for i in impls},
      'onednn_missing': missing,
      'setup': {'reps': reps, 'torch_threads': threads, 'torch_channels_last': True,
                'xla_flags': os.environ.get('XLA_FLAGS', ''),
                'glibc_tunables': os.environ.get('GLIBC_TUNABLES', '')},
      'versions': {'jax': jax.__version__, 'torch': torch.__version__,
                   'onednn': None if missing else onednn.version()},
      'onednn_kernels': None if missing else onednn.describe(),
  }


TABLE_HEADER = ('| layer | GFLOP per part | JAX, XLA kernels: fwd / dx / dW ms '
                '| JAX, oneDNN kernels: fwd / dx / dW ms '
                '| JAX, oneDNN with Winograd: fwd / dx / dW ms | PyTorch fwd / dx / dW ms '
                '| XLA / PyTorch time | JAX oneDNN / PyTorch time | Winograd / PyTorch time |\n'
                '|---|---|---|---|---|---|---|---|---|')


def format_row(r: dict) -> str:
  def parts(fw):
    if fw not in r['seconds']:
      return 'n/a'
    return ' / '.join(f'{1e3 * r["seconds"][fw][p]:.1f}' + ('*' if p not in r['counted_parts'] else '')
                      for p in PARTS)
  ratio = lambda i: f'{r["vs_torch_time"][i]:.2f}' if i in r['vs_torch_time'] else 'n/a'  # noqa: E731
  return (f'| {r["layer"]} | {r["flops_per_part"] / 1e9:.1f} | {parts("xla")} | '
          f'{parts("onednn")} | {parts("winograd")} | {parts("torch")} | {ratio("xla")} | '
          f'{ratio("onednn")} | {ratio("winograd")} |')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  config = f.config
  if config is None:
    raise app.UsageError('--config=configs/<name>.py is required')
  name = os.path.splitext(os.path.basename(config_flags.get_config_filename(f['config'])))[0]
  out = f.out or os.path.join('benchmarks_out',
                              f'conv_layers_{name}_b{config.global_batch_size}.json')
  print(TABLE_HEADER)
  result = run_benchmark(config, f.reps)
  result['name'] = name
  t = result['total_seconds']
  print('all convolutions (* not counted): ' + ', '.join(
      f'{label} {1e3 * t[k]:.0f} ms' for k, label in
      (('xla', 'JAX with XLA kernels'), ('onednn', 'JAX with oneDNN kernels'),
       ('winograd', 'JAX with oneDNN Winograd kernels'), ('torch', 'PyTorch')) if k in t))
  print('time against PyTorch: ' + ', '.join(
      f'{k} {v:.2f}' for k, v in result['vs_torch_time'].items()))
  benchmarks.write_json(result, out)


if __name__ == '__main__':
  backend.configure_process(restart_module='benchmarks.conv_layers')  # malloc settings
  define_flags()
  cli.run(main)
