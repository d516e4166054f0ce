"""Shared fixtures. Four simulated CPU devices for every test."""

import os
import sys

# Must precede the first `import jax` anywhere in the test session.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from alexnet_jax import backend  # pylint: disable=g-import-not-at-top,wrong-import-position

# Tests of the CPU kernels (alexnet_jax/cpu) run wherever they can be built.
CPU_KERNELS_MISSING = backend.cpu_kernels_unavailable()
needs_cpu_kernels = pytest.mark.skipif(
    CPU_KERNELS_MISSING is not None,
    reason=f'the CPU kernels cannot be built here: {CPU_KERNELS_MISSING}')


def load_config(name: str):
  from alexnet_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_file(os.path.join(REPO, 'configs', f'{name}.py'))


def make_model(config):
  """The network of `config`, on the operations `config.conv_impl` selects here."""
  from alexnet_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  return model_lib.create_model(config, backend.select_ops(config.conv_impl, config.dtype))


def set_keys(config, overrides: dict):
  """`config` with each dotted key of `overrides` set, as `--config.a.b=v` would."""
  for key, value in overrides.items():
    *parents, name = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[name] = value
  return config


def tiny_fashion_config():
  """The demo config shrunk to a network that trains in seconds."""
  config = load_config('fashion_mnist')
  config.model.features = (8, 16, 16, 16, 8)
  config.model.conv1_stride = 2  # 14x14 maps after conv1: 4x less work
  config.model.fc_features = (32, 32)
  config.global_batch_size = 32
  config.eval_batch_size = 512
  config.dataset.eval_crops = 'center'
  config.num_epochs = 1
  config.log_every_steps = 10
  config.checkpoint_every_steps = 10
  config.progress_bar = False
  return config


@pytest.fixture
def tiny_config():
  return tiny_fashion_config()


@pytest.fixture(scope='session')
def fashion_arrays():
  """The real Fashion-MNIST splits (prepared once by the tfds builder)."""
  from alexnet_jax.data import fashion_mnist  # pylint: disable=g-import-not-at-top
  config = tiny_fashion_config()
  return {'train': fashion_mnist.load_arrays(config, 'train'),
          'test': fashion_mnist.load_arrays(config, 'test')}
