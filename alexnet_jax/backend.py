"""Where a run's operations come from: the reference ops or the CPU kernels.

`select_ops` is called once per run and its `Ops` are handed to the model
and the train step, which never ask which implementation they hold. This is
the only module of the package that imports `alexnet_jax.cpu`.

config.conv_impl:
  'auto'      the CPU kernels when JAX runs on the CPU and they can be built
              (a warning otherwise), the reference ops on GPUs and TPUs;
  'xla'       the reference ops (`alexnet_jax.ops`) everywhere;
  'onednn'    the CPU kernels, an error where they cannot run;
  'winograd'  'onednn' with oneDNN's Winograd kernels for float32 3x3
              stride-1 convolutions (other rounding).
"""

from __future__ import annotations

import functools
import os

from absl import logging
import jax
import jax.numpy as jnp

from alexnet_jax import config_lib
from alexnet_jax import ops as ops_lib
from alexnet_jax.cpu import onednn
from alexnet_jax.cpu import ops as cpu_ops
from alexnet_jax.cpu import xla_flags


def configure_process(restart_module: str | None = None) -> None:
  """The CPU settings of XLA (and, given the module run with `python -m`, of malloc).

  Call before JAX starts a backend. XLA's flags go into XLA_FLAGS unless the
  user set them; with `restart_module`, the process is re-executed once with
  glibc's malloc settings for large temporaries when JAX will run on the CPU
  (`cpu/xla_flags.py` says why).
  """
  xla_flags.set_cpu_defaults()
  if restart_module:
    xla_flags.restart_with_malloc_defaults(restart_module)


DETERMINISM_FLAG = '--xla_gpu_deterministic_ops=true'


def set_deterministic(enabled: bool) -> None:
  """`config.deterministic`: XLA's deterministic-ops flag, for GPUs.

  XLA reads XLA_FLAGS when JAX opens its first backend, so the entry points
  call this after parsing the config and before anything touches a device.
  The flag makes XLA:GPU pick reproducible reductions and refuse ops it has no
  deterministic kernel for; the max-pool backward of `ops.max_pool` is
  written without `select_and_scatter` (one of those), so the flag can be
  used with the paper's overlapping pooling. The CPU is deterministic anyway.
  """
  if not enabled:
    return
  flags = os.environ.get('XLA_FLAGS', '')
  name = DETERMINISM_FLAG.split('=')[0]
  if name in flags:
    return
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if not xla_bridge.backends_are_initialized():
    os.environ['XLA_FLAGS'] = f'{flags} {DETERMINISM_FLAG}'.strip()
  elif jax.default_backend() == 'gpu':
    raise ValueError(f'Bad config: deterministic=True needs XLA_FLAGS={DETERMINISM_FLAG} '
                     'before JAX starts its backend: run through python -m alexnet_jax.main, '
                     'or set XLA_FLAGS yourself')


@functools.cache
def _warn_no_cpu_kernels(reason: str) -> None:
  logging.warning("conv_impl='auto': using the reference (XLA) operations, slower on "
                  'the CPU than the CPU kernels, because %s', reason)


def cpu_kernels_unavailable() -> str | None:
  """Why the CPU kernels cannot be built or loaded here, or None if they can."""
  return onednn.unavailable_reason()


def select_ops(conv_impl: str, dtype='float32') -> ops_lib.Ops:
  """The `Ops` a run with this `config.conv_impl` and `config.dtype` uses here."""
  if conv_impl not in config_lib.KNOWN_CONV_IMPLS:
    raise ValueError(f'Bad config: conv_impl={conv_impl!r}; use one of '
                     f'{config_lib.KNOWN_CONV_IMPLS}')
  forced = conv_impl in config_lib.FORCED_ONEDNN_IMPLS
  if conv_impl == 'xla' or jax.default_backend() != 'cpu':
    return ops_lib.REFERENCE
  if jnp.dtype(dtype) not in (jnp.float32, jnp.bfloat16):
    if forced:
      raise ValueError(f'Bad config: conv_impl={conv_impl!r} runs float32 and bfloat16, '
                       f'not {dtype}')
    return ops_lib.REFERENCE
  reason = cpu_kernels_unavailable()
  if reason and forced:
    raise ValueError(f'Bad config: conv_impl={conv_impl!r}, but {reason}')
  if reason:
    _warn_no_cpu_kernels(reason)
    return ops_lib.REFERENCE
  return cpu_ops.OneDNNOps(winograd=conv_impl == 'winograd')


def describe(ops: ops_lib.Ops, primitives: bool = True) -> dict:
  """Which implementation `ops` is, and for the CPU kernels what oneDNN ran (`primitives`)."""
  if not isinstance(ops, cpu_ops.OneDNNOps):
    return {'ops': ops.name, 'convolutions': 'xla', 'onednn_missing': cpu_kernels_unavailable()}
  info = {'ops': ops.name, 'convolutions': 'onednn', 'onednn_version': onednn.version()}
  if primitives:
    info['onednn_primitives'] = onednn.describe().splitlines()
  return info
