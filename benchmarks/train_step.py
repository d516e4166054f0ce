"""Train-step speed: the project's JAX step against the same network in PyTorch.

  python -m benchmarks.train_step --config=configs/paper.py \\
      [--config.global_batch_size=128] [--config.dtype=bfloat16] [--out=FILE]
  python -m benchmarks.train_step --suite   # the README table

(from the repository's root, or with it on PYTHONPATH).

One process measures, interleaved so that other load on the machine hits both
alike:
  jax    `train.train_step`, pmapped on one device with the state donated
         (`train.make_steps`), as the trainer runs it, on the operations
         `backend.select_ops` picks for config.conv_impl, with the CPU
         defaults of `backend.configure_process` (`alexnet_jax/cpu/xla_flags.py`;
         set before JAX opens a backend; a flag given in XLA_FLAGS wins);
  torch  `benchmarks.torch_alexnet`: the same network, batch, dropout and
         momentum rule in eager PyTorch, channels_last, grouped convolutions,
         the fast LRN, one thread per core.
Both train on one fixed random batch held in memory (no input pipeline), after
--warmup steps; each of --reps repetitions times --steps steps of each, and
the median images/s is reported. Also: JAX compile time; FLOPs per image
(2 x 3 x the multiply-adds of `summary.layer_table`: forward, input gradient
and kernel gradient); achieved FLOP/s and model-FLOPs utilisation against the
faster of a JAX and a PyTorch n x n GEMM timed in the same run (fp32, and
bf16 for --config.dtype=bfloat16); memory (see `_memory`); for Fashion-MNIST
and ImageNet the train time per epoch that the step rate gives.

  python -m benchmarks.train_step --towers_at=64 [--lrn_controls] \\
      [--reps=15 --steps=2]

--towers_at=B times, instead, the JAX steps of configs/paper.py (two towers)
and configs/single_tower.py at global batch B, interleaved in one process
(`compare_towers`), and reports their achieved FLOP/s, its ratio, and the
ratio of each interleaved pair with a 95% interval for its median
(`median_interval`). --lrn_controls adds the paper network without its LRN
and the single tower with the paper's LRN, and compares the networks like for
like as well (`tower_configs`).

--suite runs every case of SUITE (with --reps=5) and then --towers_at for
batches 64 and 128 (15 repetitions, with the LRN controls), each in its own
process (a clean memory high-water mark each; about 10 minutes on 2 cores),
writes their JSON files beside --out and a table to stdout and
`train_step_suite.json`. Targets: jax
>= 1.0x torch images/s in every fp32 case; the two-tower model no slower per
FLOP than the single-tower one, judged on the interleaved figures.
"""

from __future__ import annotations

import os
import sys

from alexnet_jax import backend
from alexnet_jax import cli
from alexnet_jax import config_lib

backend.configure_process()  # XLA reads XLA_FLAGS once, before a backend starts

# pylint: disable=g-import-not-at-top,wrong-import-position
import json
import math
import platform
import resource
import statistics
import subprocess
import threading
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from alexnet_jax import model as model_lib
from alexnet_jax import optim
from alexnet_jax import parallel
# summary defines the --config flag (a config file, with --config.* overrides);
# this module reuses it rather than defining a second one.
from alexnet_jax import summary
from alexnet_jax import train
import benchmarks
# pylint: enable=g-import-not-at-top,wrong-import-position

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string('out', '', 'JSON results file; default '
                    'benchmarks_out/train_step_<config>_b<batch>_<dtype>.json.')
flags.DEFINE_integer('reps', 5, 'Interleaved repetitions; the median is reported.')
flags.DEFINE_integer('steps', 2, 'Train steps per repetition and framework '
                     '(--suite sets its own per case).')
flags.DEFINE_integer('warmup', 2, 'Untimed steps per framework before timing.')
flags.DEFINE_integer('gemm_size', 2048, 'n of the n x n x n GEMM that measures the peak.')
flags.DEFINE_enum('torch_towers', 'groups', ['groups', 'split'],
                  'PyTorch grouped layers: Conv2d(groups=2) or split + two convs.')
flags.DEFINE_enum('torch_lrn', 'fast', ['fast', 'module'],
                  'PyTorch LRN: ops.py\'s algorithm or nn.LocalResponseNorm.')
flags.DEFINE_bool('torch_channels_last', True, 'PyTorch NHWC memory format.')
flags.DEFINE_bool('suite', False, 'Run every case of SUITE, one process each.')
flags.DEFINE_integer('towers_at', 0, 'Instead of JAX against PyTorch: the two-tower '
                     '(configs/paper.py) and single-tower JAX steps, interleaved in one '
                     'process, at this global batch size.')
flags.DEFINE_bool('lrn_controls', False, 'With --towers_at: also time each network with '
                  'the other\'s LRN setting and compare them like for like.')

# (config file, global batch, dtype, steps per repetition, conv_impl): the
# README's table.
SUITE = (
    ('paper', 64, 'float32', 1, 'auto'),
    ('paper', 128, 'float32', 1, 'auto'),
    ('single_tower', 64, 'float32', 1, 'auto'),
    ('single_tower', 128, 'float32', 1, 'auto'),
    ('fashion_mnist', 128, 'float32', 20, 'auto'),
    ('paper', 64, 'bfloat16', 1, 'auto'),
    ('single_tower', 64, 'bfloat16', 1, 'auto'),
    ('paper', 64, 'float32', 1, 'winograd'),
    ('single_tower', 64, 'float32', 1, 'winograd'),
)
# The per-FLOP target's two networks, timed by `compare_towers`.
TOWER_CONFIGS = ('paper', 'single_tower')
TOWERS_REPS = 15    # repetitions of `compare_towers` in the suite (95% interval: 4th-12th pair)
TOWERS_STEPS = 2    # steps per repetition and network
TOWERS_WARMUP = 6   # steps; XLA's temporaries still take new memory in the first few
TRAIN_EXAMPLES = {'fashion_mnist': 60_000, 'imagenet2012': 1_281_167}
MIB = 2.0 ** 20


def train_flops_per_image(config) -> int:
  """2 FLOPs per multiply-add, x3 for forward + input and kernel gradients.

  Counts the conv and FC layers only (`summary.layer_table`), the convention
  of MFU figures; the input gradient of conv1 is counted though not computed.
  """
  return 6 * sum(r['macs'] for r in summary.layer_table(config))


class _PeakRSS:
  """Highest resident set size (sampled every ms) while the block runs."""

  def __init__(self):
    self.peak = self.start = 0
    self._stop = threading.Event()

  @staticmethod
  def rss() -> int:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')

  def _sample(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self.rss())
      time.sleep(0.001)

  def __enter__(self):
    self.start = self.peak = self.rss()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self.rss())


def _median_rate(fn, n: int, reps: int = 3) -> float:
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return n / statistics.median(times)


def measure_gemm_peak(n: int, dtype: str = 'float32') -> dict[str, float]:
  """FLOP/s of an n x n x n matrix product in JAX and in PyTorch, interleaved."""
  import torch  # pylint: disable=g-import-not-at-top
  a = np.random.RandomState(0).randn(n, n).astype(np.float32)
  aj = jnp.asarray(a, dtype)
  matmul = jax.jit(lambda x: x @ x)
  at = torch.from_numpy(a).to(getattr(torch, dtype))
  run_jax = lambda: matmul(aj).block_until_ready()
  run_torch = lambda: torch.mm(at, at)
  run_jax(), run_torch()
  flops = 2.0 * n ** 3
  rates = {'jax': [], 'torch': []}
  for _ in range(3):
    rates['jax'].append(_median_rate(run_jax, flops, 1))
    rates['torch'].append(_median_rate(run_torch, flops, 1))
  out = {f'{k}_flops_per_sec': statistics.median(v) for k, v in rates.items()}
  out['peak_flops_per_sec'] = max(out.values())
  out['n'] = n
  return out


def _jax_runner(config, batch_size: int):
  """The trainer's pmapped step on one device; returns (step fn, info)."""
  devices = jax.local_devices()[:1]
  layout = parallel.Layout(len(devices), towers=1)  # the whole network on the device
  model = model_lib.create_model(config, _select_ops(config))
  tx = optim.create_optimizer(config.optimizer)
  schedule = optim.create_schedule(config.schedule, config.schedule.base_lr, 1000,
                                   100_000)
  p_step, _ = train.make_steps(model, layout, tx, schedule, config.seed, devices)
  state = parallel.state_to_devices(train.create_train_state(config, model, tx), layout,
                                    devices)
  size, channels = config.dataset.image_size, len(config.dataset.mean)
  rs = np.random.RandomState(0)
  batch = {
      'image': rs.randn(batch_size, size, size, channels).astype(np.float32),
      'label': rs.randint(0, config.dataset.num_classes, (batch_size,)).astype(np.int32)}
  batch = jax.device_put(parallel.shard_batch(batch, layout), devices[0])
  t0 = time.perf_counter()
  compiled = p_step.lower(state, batch).compile()
  compile_sec = time.perf_counter() - t0
  info = {'compile_sec': compile_sec}
  try:
    mem = compiled.memory_analysis()
    info['xla_temp_mib'] = mem.temp_size_in_bytes / MIB
    info['xla_argument_mib'] = mem.argument_size_in_bytes / MIB
    info['xla_output_mib'] = mem.output_size_in_bytes / MIB
    info['xla_alias_mib'] = mem.alias_size_in_bytes / MIB
  except Exception:  # pylint: disable=broad-except
    pass  # not every backend reports it
  box = {'state': state}

  def step():
    box['state'], metrics = compiled(box['state'], batch)
    return metrics

  def run(n: int):
    metrics = None
    for _ in range(n):
      metrics = step()
    jax.block_until_ready(metrics)  # the only host sync: after the last step
    return metrics

  return run, info


def _select_ops(config):
  """The operations the trainer would run `config` on here (`backend.select_ops`)."""
  return backend.select_ops(config.conv_impl, config.dtype)


def _torch_runner(config, batch_size: int, towers: str, lrn: str, channels_last: bool):
  # PyTorch loads only when its step is built (after JAX's), and is needed by
  # the JAX-against-PyTorch figures only.
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_alexnet  # pylint: disable=g-import-not-at-top
  threads = torch_alexnet.setup_cpu_threads()
  torch.manual_seed(0)
  net, opt = torch_alexnet.create(config, tower_mode=towers,
                                  channels_last=channels_last, lrn_impl=lrn)
  step = torch_alexnet.make_train_step(net, opt)
  size, channels = config.dataset.image_size, len(config.dataset.mean)
  images = torch.randn(batch_size, channels, size, size)
  if channels_last:
    images = images.contiguous(memory_format=torch.channels_last)
  labels = torch.randint(0, config.dataset.num_classes, (batch_size,))
  bf16 = config.dtype == 'bfloat16'

  def run(n: int):
    # bfloat16: autocast, PyTorch's mixed precision (float32 parameters).
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
      out = None
      for _ in range(n):
        out = step(images, labels)
    return out

  return run, {'threads': threads, 'towers': towers, 'lrn': lrn,
               'channels_last': channels_last, 'autocast_bf16': bf16,
               'version': torch.__version__}


def _memory(run, label: str) -> dict[str, float]:
  """RSS rise during one step, above the RSS before it (MiB).

  Both frameworks hold parameters, gradients or optimiser state before the
  step as well; the rise is what the step itself allocates (activations,
  workspaces), as the OS sees it.
  """
  with _PeakRSS() as peak:
    run(1)
  return {f'{label}_step_rss_rise_mib': (peak.peak - peak.start) / MIB,
          f'{label}_rss_before_step_mib': peak.start / MIB}


def _loadavg() -> list[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def _processor() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def run_benchmark(config, *, reps: int, steps: int, warmup: int, gemm_size: int,
                  torch_towers: str = 'groups', torch_lrn: str = 'fast',
                  torch_channels_last: bool = True) -> dict:
  """Interleaved JAX / PyTorch train-step rates and derived figures."""
  config_lib.validate(config, 1)  # bad keys and values fail as in training
  batch = config.global_batch_size
  load_before = _loadavg()
  jax_run, jax_info = _jax_runner(config, batch)
  torch_run, torch_info = _torch_runner(config, batch, torch_towers, torch_lrn,
                                        torch_channels_last)
  t0 = time.perf_counter()
  jax_run(1)
  jax_info['first_step_sec'] = time.perf_counter() - t0
  jax_run(max(warmup - 1, 0))
  t0 = time.perf_counter()
  torch_run(1)
  torch_info['first_step_sec'] = time.perf_counter() - t0
  torch_run(max(warmup - 1, 0))
  memory = {**_memory(jax_run, 'jax'), **_memory(torch_run, 'torch')}
  memory.update({k: v for k, v in jax_info.items() if k.startswith('xla_')})

  samples = {'jax': [], 'torch': []}
  for _ in range(reps):
    for name, run in (('jax', jax_run), ('torch', torch_run)):
      time.sleep(0.2)  # lets the other framework's idle worker threads stop spinning
      samples[name].append(_median_rate(lambda run=run: run(steps), steps * batch, 1))
  rates = {k: statistics.median(v) for k, v in samples.items()}
  # Each repetition times JAX and then PyTorch within seconds, so the ratio of a
  # pair cancels most of the machine's drift; their spread shows what is left.
  pairs = [j / t for j, t in zip(samples['jax'], samples['torch'])]

  peak = {'float32': measure_gemm_peak(gemm_size, 'float32')}
  if config.dtype != 'float32':
    peak[config.dtype] = measure_gemm_peak(gemm_size, config.dtype)
  flops = train_flops_per_image(config)
  achieved = {k: r * flops for k, r in rates.items()}
  ref_peak = peak[config.dtype]['peak_flops_per_sec']
  memory['process_max_rss_mib'] = (
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB)
  result = {
      'config': config.dataset.name, 'towers': config.model.towers,
      'image_size': config.dataset.image_size, 'batch': batch, 'dtype': config.dtype,
      'images_per_sec': rates,
      'jax_vs_torch': rates['jax'] / rates['torch'],
      'jax_vs_torch_pairs': {'median': statistics.median(pairs), 'min': min(pairs),
                             'max': max(pairs), 'each': pairs},
      'compile_sec': jax_info['compile_sec'],
      'first_step_sec': {'jax': jax_info['first_step_sec'],
                         'torch': torch_info['first_step_sec']},
      'train_flops_per_image': flops,
      'achieved_flops_per_sec': achieved,
      'gemm_peak': peak,
      'mfu': {k: a / ref_peak for k, a in achieved.items()},
      'mfu_reference': f'{config.dtype} GEMM peak {ref_peak / 1e9:.0f} GFLOP/s',
      'memory_mib': memory,
      'memory_notes': (
          '*_step_rss_rise: resident-set rise during one step (sampled every ms) '
          'over the RSS before it; xla_*: XLA buffer assignment of the compiled '
          'step (temp = activations and workspace); process_max_rss: ru_maxrss '
          'of the whole process (both frameworks and the GEMMs).'),
      'targets': {'jax >= 1.0x torch images/s': rates['jax'] >= rates['torch']},
      'samples_images_per_sec': samples,
      'setup': {'reps': reps, 'steps_per_rep': steps, 'warmup': warmup,
                'torch': torch_info, 'xla_flags': os.environ.get('XLA_FLAGS', ''),
                'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
                'jax_devices': 1, 'conv_impl': config.conv_impl,
                **backend.describe(_select_ops(config))},
      'versions': {'jax': jax.__version__, 'python': platform.python_version(),
                   'torch': torch_info['version']},
      'machine': {'cpus': os.cpu_count(), 'processor': _processor(),
                  'loadavg_before': load_before, 'loadavg_after': _loadavg()},
  }
  examples = TRAIN_EXAMPLES.get(config.dataset.name)
  if examples:
    steps_per_epoch = examples // batch
    result['epoch_sec'] = {k: steps_per_epoch * batch / r for k, r in rates.items()}
    result['steps_per_epoch'] = steps_per_epoch
  return result


def median_interval(values, confidence: float = 0.95) -> dict:
  """A distribution-free confidence interval for the median of `values`.

  The order statistics x_(k) <= x_(n + 1 - k), k the largest with
  P(Binomial(n, 1/2) < k) <= (1 - confidence) / 2: the median lies between
  them with probability `coverage` >= confidence whatever the distribution,
  for independent samples. Below 6 values no k reaches 95%; the interval is
  then [min, max], with its own (lower) coverage.
  """
  x = sorted(values)
  n = len(x)
  if not n:
    raise ValueError('median_interval needs at least one value')
  below = lambda k: sum(math.comb(n, i) for i in range(k)) / 2 ** n  # P(B < k)
  k = 1
  while k + 1 <= (n + 1) // 2 and below(k + 1) <= (1 - confidence) / 2:
    k += 1
  return {'low': x[k - 1], 'high': x[n - k], 'coverage': 1 - 2 * below(k)}


def _ratio_of(samples: dict, rates: dict, a: str, b: str) -> dict:
  """FLOP/s of `a` over `b`: the ratio of medians and that of each pair."""
  pairs = [x / y for x, y in zip(samples[a], samples[b])]
  return {'ratio': rates[a] / rates[b],
          'ratio_pairs': {'median': statistics.median(pairs), 'min': min(pairs),
                          'max': max(pairs), 'each': pairs,
                          'median_interval': median_interval(pairs)}}


def compare_towers(configs: dict, *, reps: int, steps: int, warmup: int,
                   pairs: list | None = None) -> dict:
  """Achieved FLOP/s of networks' JAX steps, interleaved in one process.

  `configs` maps names to configs. `pairs` lists the (numerator, denominator)
  names whose FLOP/s ratios are reported, the target's first (the two-tower
  network over the single tower); with two configs it defaults to them in
  order. The suite's per-FLOP ratio from separate processes moves with this
  machine's drift between them (+-2-5%); here every repetition times each
  network in turn (in the order of `configs`, reversed every other
  repetition) so that all see the same machine, and the ratio of each
  repetition's pair is reported beside the ratio of the medians.
  """
  names = list(configs)
  if len(names) < 2:
    raise ValueError(f'compare_towers takes at least two configs, got {names}')
  if pairs is None:
    if len(names) != 2:
      raise ValueError(f'compare_towers needs `pairs` for more than two configs: {names}')
    pairs = [tuple(names)]
  pairs = [tuple(p) for p in pairs]
  unknown = sorted({n for p in pairs for n in p} - set(names))
  if not pairs or unknown or any(len(p) != 2 for p in pairs):
    raise ValueError(f'compare_towers: pairs {pairs} must name two of {names} each')
  runs, info, flops = {}, {}, {}
  for name, config in configs.items():
    config_lib.validate(config, 1)
    runs[name], info[name] = _jax_runner(config, config.global_batch_size)
    runs[name](max(warmup, 1))
    flops[name] = train_flops_per_image(config)
  samples = {name: [] for name in names}  # FLOP/s
  for rep in range(reps):
    for name in (names if rep % 2 == 0 else names[::-1]):
      time.sleep(0.2)
      batch = configs[name].global_batch_size
      samples[name].append(
          _median_rate(lambda n=name: runs[n](steps), steps * batch, 1) * flops[name])
  rates = {k: statistics.median(v) for k, v in samples.items()}
  comparisons = {f'{a} / {b}': _ratio_of(samples, rates, a, b) for a, b in pairs}
  a, b = pairs[0]
  return {
      'names': names,
      'pairs': [list(p) for p in pairs],
      'batch': {k: c.global_batch_size for k, c in configs.items()},
      'train_flops_per_image': flops,
      'flops_per_sec': rates,
      'images_per_sec': {k: r / flops[k] for k, r in rates.items()},
      **comparisons[f'{a} / {b}'],
      'comparisons': comparisons,
      'samples_flops_per_sec': samples,
      'compile_sec': {k: v['compile_sec'] for k, v in info.items()},
      'target': {f'{a} no slower per FLOP than {b}': rates[a] >= rates[b]},
      'setup': {'reps': reps, 'steps_per_rep': steps, 'warmup': warmup,
                'xla_flags': os.environ.get('XLA_FLAGS', ''),
                'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
                'convolutions': {n: backend.describe(_select_ops(c))['convolutions']
                                 for n, c in configs.items()}},
      'versions': {'jax': jax.__version__},
      'machine': {'cpus': os.cpu_count(), 'processor': _processor(),
                  'loadavg_after': _loadavg()},
  }


def tower_configs(batch: int, lrn_controls: bool = False) -> tuple[dict, list]:
  """The per-FLOP target's configs at global batch `batch`, and its pairs.

  With `lrn_controls`, also each network with the LRN setting of the other
  (`paper_without_lrn`, `single_tower_with_lrn`: the paper's LRN after conv1
  and conv2, within its one tower), so that each network is also compared with
  the other like for like, the LRN's cost told apart from the grouping's. The
  order keeps every compared pair adjacent or one apart in each repetition.
  """
  def load(name, lrn=None):
    config = config_lib.load_file(os.path.join(_REPO, 'configs', name + '.py'))
    config.global_batch_size = batch
    if lrn is not None:
      config.model.lrn.enabled = lrn
    return config

  two, one = TOWER_CONFIGS
  if not lrn_controls:
    return {two: load(two), one: load(one)}, [(two, one)]
  configs = {f'{two}_without_lrn': load(two, False), two: load(two), one: load(one),
             f'{one}_with_lrn': load(one, True)}
  pairs = [(two, one),                            # the target
           (f'{two}_without_lrn', one),           # like for like: no LRN in either
           (two, f'{one}_with_lrn'),              # like for like: the LRN in both
           (two, f'{two}_without_lrn')]           # the LRN's cost to the paper network
  return configs, pairs


def compare_towers_and_write(batch: int, out: str, lrn_controls: bool = False,
                             **options) -> dict:
  """`compare_towers` for `tower_configs(batch)`, printed and written to `out`."""
  configs, pairs = tower_configs(batch, lrn_controls)
  result = compare_towers(configs, pairs=pairs, **options)
  fl = result['flops_per_sec']
  print(f'batch {batch}: ' + ', '.join(f'{n} {fl[n] / 1e9:.0f} GFLOP/s' for n in result['names']))
  for i, (name, c) in enumerate(result['comparisons'].items()):
    p = c['ratio_pairs']
    print(f'  {name}: ratio {c["ratio"]:.3f}{" (target >= 1.0)" if i == 0 else ""}; '
          f'per interleaved pair {p["min"]:.3f}-{p["max"]:.3f}, median {p["median"]:.3f} '
          f'({_interval(p)})')
  benchmarks.write_json(result, out)
  return result


def benchmark_and_write(config, name: str, out: str, **options) -> dict:
  """`run_benchmark`, a summary on stdout, and the JSON file `out`."""
  result = run_benchmark(config, **options)
  result['name'] = name
  ips = result['images_per_sec']
  print(f'{name} batch {result["batch"]} {result["dtype"]}: JAX {ips["jax"]:.1f} img/s, '
        f'PyTorch {ips["torch"]:.1f} img/s, ratio {result["jax_vs_torch"]:.2f} '
        f'(target >= 1.0); per interleaved pair {_pair_range(result)}')
  print(f'compile {result["compile_sec"]:.1f}s; {result["train_flops_per_image"] / 1e9:.2f} '
        f'GFLOP/image; JAX {result["achieved_flops_per_sec"]["jax"] / 1e9:.0f} GFLOP/s, '
        f'MFU {100 * result["mfu"]["jax"]:.0f}% of the {result["mfu_reference"]}; '
        f'PyTorch MFU {100 * result["mfu"]["torch"]:.0f}%')
  if 'epoch_sec' in result:
    e = result['epoch_sec']
    print(f'train epoch ({result["steps_per_epoch"]} steps): JAX {e["jax"]:.0f}s, '
          f'PyTorch {e["torch"]:.0f}s')
  print(f'load average before/after: {result["machine"]["loadavg_before"]} / '
        f'{result["machine"]["loadavg_after"]}')
  benchmarks.write_json(result, out)
  return result


def _case_file(name: str, batch: int, dtype: str, conv_impl: str) -> str:
  """The JSON file name of one case; conv_impl 'winograd' gets its own."""
  impl = '_winograd' if conv_impl == 'winograd' else ''
  return f'train_step_{name}_b{batch}_{dtype}{impl}.json'


def _default_out(config, name: str) -> str:
  return os.path.join('benchmarks_out', _case_file(name, config.global_batch_size,
                                                   config.dtype, config.conv_impl))


def _interval(pairs: dict) -> str:
  i = pairs['median_interval']
  return f'{100 * i["coverage"]:.0f}% interval {i["low"]:.3f}-{i["high"]:.3f}'


def _pair_range(r: dict) -> str:
  p = r['jax_vs_torch_pairs']
  return f'{p["min"]:.2f}-{p["max"]:.2f}'


def format_row(r: dict) -> str:
  ips = r['images_per_sec']
  winograd = ' (winograd)' if r['setup'].get('conv_impl') == 'winograd' else ''
  return (f'| {r["name"]}{winograd} | {r["image_size"]} | {r["batch"]} | {r["dtype"]} | '
          f'{ips["jax"]:.1f} | {ips["torch"]:.1f} | {r["jax_vs_torch"]:.2f} | '
          f'{_pair_range(r)} | '
          f'{r["achieved_flops_per_sec"]["jax"] / 1e9:.0f} | {100 * r["mfu"]["jax"]:.0f}% | '
          f'{r["compile_sec"]:.0f} | {r["memory_mib"].get("xla_temp_mib", 0):.0f} |')


TABLE_HEADER = ('| config | size | batch | dtype | JAX img/s | PyTorch img/s | JAX/PyTorch '
                '| pairs | JAX GFLOP/s | JAX MFU | compile s | XLA temp MiB |\n'
                '|---|---|---|---|---|---|---|---|---|---|---|---|')


def run_suite(out: str, extra_args: list[str]) -> dict:
  """Every SUITE case in its own process; returns the combined results."""
  out_dir = os.path.dirname(os.path.abspath(out)) if out else os.path.abspath('benchmarks_out')
  os.makedirs(out_dir, exist_ok=True)

  def run(path, args):  # this module in a process of its own; its JSON
    cmd = [sys.executable, '-m', 'benchmarks.train_step', *args, f'--out={path}']
    print('$', ' '.join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True, cwd=_REPO)
    with open(path) as f:
      return json.load(f)

  results = [
      run(os.path.join(out_dir, _case_file(name, batch, dtype, impl)),
          [f'--config={os.path.join(_REPO, "configs", name + ".py")}',
           f'--config.global_batch_size={batch}', f'--config.dtype={dtype}',
           f'--config.conv_impl={impl}', f'--steps={steps}'] + extra_args)
      for name, batch, dtype, steps, impl in SUITE]
  towers = {
      f'b{batch}': run(os.path.join(out_dir, f'train_step_towers_b{batch}.json'),
                       [f'--towers_at={batch}', '--lrn_controls', f'--reps={TOWERS_REPS}',
                        f'--steps={TOWERS_STEPS}', f'--warmup={TOWERS_WARMUP}'])
      for batch in sorted({b for n, b, *_ in SUITE if n in TOWER_CONFIGS})}
  table = [TABLE_HEADER] + [format_row(r) for r in results]
  by_case = {(r['name'], r['batch'], r['dtype']): r for r in results
             if r['setup'].get('conv_impl') != 'winograd'}
  per_flop = {}
  for batch in sorted({b for _, b, *_ in SUITE}):
    two, one = by_case.get(('paper', batch, 'float32')), by_case.get(('single_tower', batch, 'float32'))
    if two and one:
      per_flop[f'b{batch}'] = (two['achieved_flops_per_sec']['jax']
                               / one['achieved_flops_per_sec']['jax'])
  interleaved = {k: t['ratio'] for k, t in towers.items()}
  summary = {
      'table_markdown': '\n'.join(table),
      'two_tower_vs_single_tower_flops_per_sec': per_flop,
      'two_tower_vs_single_tower_flops_per_sec_interleaved': interleaved,
      'targets': {
          'jax >= 1.0x torch, every fp32 case': all(
              r['jax_vs_torch'] >= 1.0 for r in results if r['dtype'] == 'float32'),
          'two towers no slower per FLOP than one (interleaved)': all(
              v >= 1.0 for v in interleaved.values()),
      },
      'results': results,
      'towers': towers,
  }
  path = os.path.join(out_dir, 'train_step_suite.json')
  with open(path, 'w') as f:
    json.dump(summary, f, indent=2)
  print(summary['table_markdown'])
  print('two-tower / single-tower FLOP/s, separate processes:',
        {k: round(v, 3) for k, v in per_flop.items()})
  for k, t in towers.items():
    print(f'FLOP/s ratios, interleaved in one process, {k} (the first is the target):')
    for name, c in t['comparisons'].items():
      p = c['ratio_pairs']
      print(f'  {name}: {c["ratio"]:.3f} (pairs {p["min"]:.3f}-{p["max"]:.3f}, '
            f'median {p["median"]:.3f}, {_interval(p)})')
  print('targets:', summary['targets'])
  print(f'Wrote {path}')
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.suite:
    extra = [f'--reps={f.reps}', f'--warmup={f.warmup}',
             f'--gemm_size={f.gemm_size}', f'--torch_towers={f.torch_towers}',
             f'--torch_lrn={f.torch_lrn}',
             f'--torch_channels_last={f.torch_channels_last}']
    run_suite(f.out, extra)
    return
  if f.towers_at:
    out = f.out or os.path.join('benchmarks_out', f'train_step_towers_b{f.towers_at}.json')
    compare_towers_and_write(f.towers_at, out, f.lrn_controls, reps=f.reps, steps=f.steps,
                             warmup=f.warmup)
    return
  config = f.config
  if config is None:
    raise app.UsageError('--config=configs/<name>.py is required (or --suite)')
  name = os.path.splitext(os.path.basename(
      config_flags.get_config_filename(f['config'])))[0]
  benchmark_and_write(config, name, f.out or _default_out(config, name),
                      reps=f.reps, steps=f.steps, warmup=f.warmup,
                      gemm_size=f.gemm_size, torch_towers=f.torch_towers,
                      torch_lrn=f.torch_lrn, torch_channels_last=f.torch_channels_last)


if __name__ == '__main__':
  # malloc settings on the CPU: see alexnet_jax/cpu/xla_flags.py, "Memory"
  backend.configure_process(restart_module='benchmarks.train_step')
  cli.run(main)
