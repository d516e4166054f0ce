"""The shared config schema: every key a run can set, with the paper's values.

Config files in `configs/` start from `base_config()` and override a few
fields. Configs are locked, so `--config.optimiser.lr=...` (a key that does
not exist) is an error rather than a silently ignored setting.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

import ml_collections

KNOWN_DATASETS = ('fashion_mnist', 'imagenet2012')
KNOWN_DTYPES = ('float32', 'bfloat16')
KNOWN_CONV_IMPLS = ('auto', 'xla', 'onednn', 'winograd')  # see alexnet_jax/backend.py
FORCED_ONEDNN_IMPLS = ('onednn', 'winograd')  # an error, not XLA, without oneDNN


def base_config() -> ml_collections.ConfigDict:
  """The paper's recipe (ILSVRC-2012, two towers, 227x227)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'imagenet2012'
  c.dataset.data_dir = ''     # tfds data_dir; '' = tfds default (~/tensorflow_datasets)
  c.dataset.manual_dir = ''   # where the raw archives/files are; '' = dataset default
  c.dataset.image_size = 227  # 55x55 after conv1 needs 227, not the "224" of the text
  c.dataset.num_classes = 1000
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'validation'
  c.dataset.shuffle_buffer = 16_384
  c.dataset.crop_padding = 0  # small-image configs: pad then random-crop back
  c.dataset.random_flip = True
  c.dataset.mean = (0.485 * 255, 0.456 * 255, 0.406 * 255)
  c.dataset.std = (1.0, 1.0, 1.0)  # the paper only subtracts the mean
  # Order of the colour channels the network sees: 'rgb', or 'bgr' for
  # networks trained in Caffe (alexnet_jax/tools/import_weights.py).
  c.dataset.channel_order = 'rgb'
  c.dataset.num_parallel_calls = -1  # tf.data.AUTOTUNE
  # ImageNet preprocessing (sections 2 and 4.1 of the paper).
  c.dataset.resize_size = 256  # shorter side -> 256, then the central 256x256
  # True: read a one-off copy of the dataset stored as resize_size squares, as
  # the paper did (written on first use, alexnet_jax/data/imagenet_squares.py);
  # training then decodes only each 227 crop and never rescales. False:
  # decode and rescale the original JPEGs in every epoch.
  c.dataset.prescaled = True
  c.dataset.prescaled_quality = 90  # JPEG quality of that copy
  # 'image': the per-pixel mean image of the training set (the paper);
  # 'channel': its per-channel mean; both need `python -m
  # alexnet_jax.tools.dataset_stats`. 'constant': dataset.mean and
  # dataset.pca_eigval / pca_eigvec below, no statistics file.
  c.dataset.mean_mode = 'image'
  c.dataset.stats_dir = ''     # '' = the prepared tfds dataset's folder
  c.dataset.pca_std = 0.1      # std of the PCA lighting alphas; 0 turns it off
  # For mean_mode='constant': the ImageNet RGB PCA ([0, 1] pixel units) that
  # fb.resnet.torch ships; the columns of pca_eigvec are the eigenvectors.
  c.dataset.pca_eigval = (0.2175, 0.0188, 0.0045)
  c.dataset.pca_eigvec = ((-0.5675, 0.7192, 0.4009),
                          (-0.5808, -0.0045, -0.8140),
                          (-0.5836, -0.6948, 0.4203))
  c.dataset.eval_crops = 'ten'  # 'ten': corners + centre, mirrored (the paper); 'center'
  # Crops of the evaluations before the last one ('' = eval_crops): 'center'
  # makes the per-epoch curves 10x cheaper; the final figures keep eval_crops.
  c.dataset.interim_eval_crops = ''
  # '' = off; 'memory'; or a file prefix: caches this process's encoded
  # records after the first pass, saving re-reads from slow storage.
  c.dataset.cache = ''

  c.model = ml_collections.ConfigDict()
  c.model.towers = 2
  c.model.features = (96, 256, 384, 384, 256)
  c.model.kernel_sizes = (11, 5, 3, 3, 3)
  c.model.conv1_stride = 4
  c.model.conv1_padding = 0
  c.model.pool_window = 3
  c.model.pool_stride = 2
  c.model.pool_padding = 'VALID'
  c.model.fc_features = (4096, 4096)
  c.model.dropout_rate = 0.5
  c.model.init = 'paper'     # N(0, init_std) weights; 'he' for small nets
  c.model.init_std = 0.01
  c.model.lrn = ml_collections.ConfigDict()
  c.model.lrn.enabled = True
  c.model.lrn.size = 5
  c.model.lrn.k = 2.0
  c.model.lrn.alpha = 1e-4
  c.model.lrn.beta = 0.75
  # False: alpha as printed in the paper. True: alpha / size (Caffe, PyTorch).
  c.model.lrn.alpha_over_size = False
  # False: each tower normalises over its own maps (the paper's two GPUs).
  # True: the windows span all maps of the layer (Caffe's bvlc_alexnet).
  c.model.lrn.across_towers = False
  c.dtype = 'float32'  # compute dtype; params and optimiser state stay float32
  # Implementation of the network's operations (alexnet_jax/backend.py):
  # 'auto' runs the CPU kernels (alexnet_jax/cpu) on the CPU when they can be
  # built and the reference ops (alexnet_jax/ops.py) otherwise and on GPUs;
  # 'xla' or 'onednn' force one (the CPU kernels on the CPU backend only);
  # 'winograd' is 'onednn' with oneDNN's Winograd kernels for the float32 3x3
  # stride-1 layers (faster on the CPU; rounding differs).
  c.conv_impl = 'auto'
  # True: XLA's deterministic-ops flag on GPUs, set before JAX loads
  # (alexnet_jax/backend.py), so that a run repeats bit for bit there too;
  # slower on GPUs. The CPU is deterministic either way.
  c.deterministic = False

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'paper_momentum'
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.optimizer.nesterov = False
  c.optimizer.decay_biases = False

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = 'plateau'   # 'plateau' | 'constant' | 'steps' | 'one_cycle'
  c.schedule.base_lr = 0.01
  c.schedule.factor = 0.1       # plateau and steps: multiply lr by this
  c.schedule.max_reductions = 3  # plateau: the paper reduced lr three times
  # plateau: a cut after `patience` evaluations without a new best top-1 error
  # (lower than the best by more than `min_delta`). The paper's cuts were a
  # manual judgement; the seed spread of the ablation study (docs/ablations.md)
  # puts the noise of one evaluation at high lr at about 0.4 points: one
  # evaluation decides nothing, and a positive threshold only adds cuts.
  c.schedule.patience = 4
  c.schedule.min_delta = 0.0
  c.schedule.boundaries_epochs = (30, 60, 80)
  c.schedule.warmup_fraction = 0.15
  c.schedule.div_factor = 10.0
  c.schedule.final_div_factor = 100.0

  c.global_batch_size = 128
  c.eval_batch_size = 256
  c.num_epochs = 90
  c.num_devices = 0            # 0 = all local devices
  # 2: each tower on its own device, as the paper's two GPUs (alexnet_jax/
  # parallel.py); the devices form (data replica, tower) pairs.
  c.model_parallel = 1
  c.log_every_steps = 100
  c.eval_every_epochs = 1.0
  c.checkpoint_every_steps = 2000
  c.keep_checkpoints = 3
  c.progress_bar = True
  c.max_train_steps = 0        # > 0 stops early (tests, smoke runs)
  c.max_eval_batches = 0       # > 0 evaluates a prefix only (tests); results say so
  return c


def load_file(path: str) -> ml_collections.ConfigDict:
  """`get_config()` of a config file such as configs/paper.py.

  As with `--config`, `path` may end in `:<argument>`, passed to get_config.
  A file that is not there raises FileNotFoundError, one that does not load
  (a syntax error, no get_config, an exception in it) ValueError; the message
  is one line, `cannot load config file <file>[ line <n>]: <what>`.
  """
  file, *args = path.split(':', 1)
  cannot = f'cannot load config file {file}'
  if not os.path.isfile(file):
    what = 'not a file' if os.path.exists(file) else 'no such file'
    raise FileNotFoundError(f'{cannot}: {what} (pass one of configs/*.py)')

  def line_in_file(error):  # the last line of `file` that the traceback passes
    tb, line = error.__traceback__, None
    while tb is not None:
      if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(file):
        line = tb.tb_lineno
      tb = tb.tb_next
    return f' line {line}' if line else ''

  name = 'config_' + os.path.splitext(os.path.basename(file))[0]
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, None))
  module.__file__ = file
  try:
    with open(file, encoding='utf-8') as f:
      code = compile(f.read(), file, 'exec')
    exec(code, module.__dict__)  # pylint: disable=exec-used
    get_config = getattr(module, 'get_config', None)
    if not callable(get_config):
      raise ValueError(f'{cannot}: it defines no get_config() (see configs/*.py)')
    return get_config(*args)
  except SyntaxError as e:
    where = '' if os.path.abspath(e.filename or file) == os.path.abspath(file) else f' ({e.filename})'
    raise ValueError(f'{cannot}{where} line {e.lineno}: {e.msg}') from e
  except OSError as e:
    raise ValueError(f'{cannot}{line_in_file(e)}: {e.strerror or e}') from e
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, ValueError) and str(e).startswith(cannot):
      raise
    first = str(e).strip().splitlines()
    raise ValueError(f'{cannot}{line_in_file(e)}: {type(e).__name__}'
                     f'{": " + first[0] if first else ""}') from e


# Counts and intervals: (key, smallest allowed value). Zero is meaningless for
# the first group; 0 means "off" or "all" for the second.
POSITIVE_KEYS = ('global_batch_size', 'eval_batch_size', 'num_epochs', 'log_every_steps',
                 'checkpoint_every_steps', 'keep_checkpoints', 'dataset.image_size',
                 'dataset.resize_size', 'dataset.shuffle_buffer', 'schedule.patience')
NON_NEGATIVE_KEYS = ('max_train_steps', 'max_eval_batches', 'num_devices',
                     'dataset.crop_padding', 'schedule.max_reductions', 'seed')


def _get(config, key: str):
  for part in key.split('.'):
    config = config[part]
  return config


def _check_counts(config, fail) -> None:
  """Every count and interval is a whole number in its range."""
  defaults = base_config()
  for key in POSITIVE_KEYS + NON_NEGATIVE_KEYS:
    value, lowest = _get(config, key), 1 if key in POSITIVE_KEYS else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
      kind = 'a positive whole number' if lowest else 'a whole number >= 0'
      fail(f'{key}={value!r} must be {kind}: pass e.g. --config.{key}={_get(defaults, key)}')
  if not config.eval_every_epochs > 0:
    fail(f'eval_every_epochs={config.eval_every_epochs!r} must be > 0: pass e.g. '
         '--config.eval_every_epochs=1 (a fraction evaluates within epochs)')


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ValueError with a fix-it message for any inconsistent setting."""
  def fail(msg):
    raise ValueError(f'Bad config: {msg}')

  _check_counts(config, fail)

  if config.dataset.name not in KNOWN_DATASETS:
    fail(f'dataset.name={config.dataset.name!r}; known: {KNOWN_DATASETS}')
  if config.dtype not in KNOWN_DTYPES:
    fail(f'dtype={config.dtype!r}; use one of {KNOWN_DTYPES}')
  if config.conv_impl not in KNOWN_CONV_IMPLS:
    fail(f'conv_impl={config.conv_impl!r}; use one of {KNOWN_CONV_IMPLS}')
  if config.conv_impl == 'winograd' and config.dtype != 'float32':
    fail(f"conv_impl='winograd' runs oneDNN's float32 Winograd kernels; dtype is "
         f"{config.dtype!r}: use conv_impl='auto' for it")
  m = config.model
  if m.towers not in (1, 2):
    fail(f'model.towers={m.towers}; use 1 (single tower) or 2 (the paper)')
  if len(m.features) != 5 or len(m.kernel_sizes) != 5:
    fail('model.features and model.kernel_sizes need 5 entries (conv1..conv5)')
  for i, f in enumerate(m.features):
    if f % m.towers:
      fail(f'model.features[{i}]={f} is not divisible by model.towers={m.towers}')
  for i, f in enumerate(m.fc_features):
    if f % m.towers:
      fail(f'model.fc_features[{i}]={f} is not divisible by model.towers={m.towers}')
  if not 0.0 <= m.dropout_rate < 1.0:
    fail(f'model.dropout_rate={m.dropout_rate} must be in [0, 1)')
  if m.pool_padding not in ('VALID', 'SAME', 'CEIL'):  # ops.pool_pads says what each means
    fail(f"model.pool_padding={m.pool_padding!r}; use 'VALID', 'SAME' or 'CEIL'")
  if m.init not in ('paper', 'he'):
    fail(f"model.init={m.init!r}; use 'paper' or 'he'")
  if config.model_parallel not in (1, 2):
    fail(f'model_parallel={config.model_parallel}; use 1 or 2 (one tower per device)')
  if config.model_parallel == 2:
    if m.towers != 2:
      fail(f'model_parallel=2 needs model.towers=2, got {m.towers}')
    if num_devices % 2:
      fail(f'model_parallel=2 needs an even number of devices, got {num_devices}')
    if config.dataset.num_classes % 2:
      fail(f'model_parallel=2 splits fc8 between the towers; dataset.num_classes='
           f'{config.dataset.num_classes} is odd')
  for key in ('global_batch_size', 'eval_batch_size'):
    b = config[key]
    if b % num_devices:
      fail(f'{key}={b} is not divisible by the {num_devices} devices in use; '
           f'pick a multiple of {num_devices} (e.g. --config.{key}='
           f'{max(num_devices, b - b % num_devices)}) or set --config.num_devices')
  d = config.dataset
  if d.mean_mode not in ('image', 'channel', 'constant'):
    fail(f"dataset.mean_mode={d.mean_mode!r}; use 'image', 'channel' or 'constant'")
  if d.eval_crops not in ('ten', 'center'):
    fail(f"dataset.eval_crops={d.eval_crops!r}; use 'ten' or 'center'")
  if d.interim_eval_crops not in ('', 'ten', 'center'):
    fail(f"dataset.interim_eval_crops={d.interim_eval_crops!r}; use '', 'ten' or 'center'")
  if not 1 <= d.prescaled_quality <= 100:
    fail(f'dataset.prescaled_quality={d.prescaled_quality} must be in [1, 100]')
  if d.channel_order not in ('rgb', 'bgr'):
    fail(f"dataset.channel_order={d.channel_order!r}; use 'rgb' or 'bgr'")
  if m.lrn.across_towers and config.model_parallel == 2:
    fail('model.lrn.across_towers=True normalises across the towers, which '
         'model_parallel=2 puts on different devices: use model_parallel=1')
  if d.pca_std < 0:
    fail(f'dataset.pca_std={d.pca_std} must be >= 0')
  if len(d.pca_eigval) != 3 or [len(r) for r in d.pca_eigvec] != [3, 3, 3]:
    fail('dataset.pca_eigval needs 3 values and dataset.pca_eigvec 3x3')
  if d.name == 'imagenet2012' and d.resize_size < d.image_size:
    fail(f'dataset.resize_size={d.resize_size} is smaller than the '
         f'dataset.image_size={d.image_size} crops taken from it')
  if config.schedule.base_lr <= 0:
    fail(f'schedule.base_lr={config.schedule.base_lr} must be positive')


# Keys a resumed run may change: none of them changes what is computed, only
# when and how much is logged, evaluated, saved or run, and where files are.
# `num_epochs` may change unless the schedule's shape depends on it.
RESUMABLE_KEYS = frozenset((
    'log_every_steps', 'eval_every_epochs', 'checkpoint_every_steps', 'keep_checkpoints',
    'progress_bar', 'deterministic', 'max_train_steps', 'max_eval_batches',
    'eval_batch_size', 'num_devices',
    'model_parallel', 'dataset.data_dir', 'dataset.manual_dir', 'dataset.stats_dir',
    'dataset.cache', 'dataset.num_parallel_calls', 'dataset.eval_crops',
    'dataset.interim_eval_crops'))
EPOCH_SHAPED_SCHEDULES = ('one_cycle',)


def flatten(tree, prefix: str = '') -> dict:
  """Nested dicts (a config as JSON, provenance) as {'a.b.c': leaf}; lists are leaves."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    name = f'{prefix}.{key}' if prefix else str(key)
    if isinstance(value, dict) and value:
      out.update(flatten(value, name))
    else:
      out[name] = value
  return out


def resume_changes(saved: dict, new: dict) -> tuple[list, list]:
  """(changes that alter the computation, changes that do not), each [(key, saved, new)].

  `saved` and `new` are configs as JSON dicts (config.json of the workdir, and
  the config of this run).
  """
  a, b = flatten(saved), flatten(new)
  changes = [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
  free = set(RESUMABLE_KEYS)
  if b.get('schedule.name') not in EPOCH_SHAPED_SCHEDULES:
    free.add('num_epochs')
  return ([c for c in changes if c[0] not in free], [c for c in changes if c[0] in free])


def format_changes(changes: list) -> str:
  return '\n'.join(f'  {k}: {old!r} (saved) -> {new!r} (now)' for k, old, new in changes)


@contextlib.contextmanager
def unknown_keys_exit():
  """Exits with one line of explanation on a mistyped `--config.<key>`.

  ml_collections raises a KeyError for it deep inside flag parsing (or when a
  config flag with a default file is defined); absl itself reports only bad
  values. The line names the key and the nearest known one; the status is 2.
  A config file that ml_collections cannot compile (a default file, or one
  that `parse_flags` did not see) also ends in one line, naming it.
  """
  try:
    yield
  except (KeyError, AttributeError) as e:
    # ml_collections' message: "'key'\nDid you mean ...", quoted once or twice.
    detail = str(e.args[0] if e.args else e)
    for _ in range(2):
      detail = detail.strip('"\'').replace('\\n', '\n').replace("\\'", "'")
    key, _, hint = detail.partition('\n')
    print(f'FATAL Flags parsing error: the config has no key {key.strip(chr(39))!r}'
          f'{". " + hint if hint else ""} (the keys are listed in '
          f'alexnet_jax/config_lib.py).', file=sys.stderr)
    sys.exit(2)
  except SyntaxError as e:
    print(f'FATAL Flags parsing error: cannot load config file {e.filename} line '
          f'{e.lineno}: {e.msg}', file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, for `app.run(main, flags_parser=parse_flags)`.

  Each config file named on the command line (`--config=FILE`, also inside a
  --flagfile) is loaded with `load_file` first: one that is missing or does
  not load ends the process with one line that names it, status 2, where
  ml_collections would print a traceback (or, for a missing file, fail only
  where the config is first used).
  """
  # pylint: disable=g-import-not-at-top
  from absl import app
  from absl import flags
  from ml_collections.config_flags import config_flags  # the module: its parser class
  names = {name for name in flags.FLAGS
           if isinstance(flags.FLAGS[name].parser, config_flags.ConfigFileFlagParser)}
  try:
    args = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False) if names else []
  except flags.Error:
    args = []  # a missing --flagfile: absl reports it below
  args = iter(args)
  for arg in args:
    if arg == '--':
      break
    name, equals, value = arg.lstrip('-').partition('=')
    if not arg.startswith('-') or name not in names:
      continue
    if not equals:
      value = next(args, None)
    if value:
      try:
        load_file(value)
      except (FileNotFoundError, ValueError) as e:
        print(f'FATAL Flags parsing error: {e}', file=sys.stderr)
        sys.exit(2)
  with unknown_keys_exit():
    return app.parse_flags_with_usage(argv)
