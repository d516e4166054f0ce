"""XLA CPU settings that make the AlexNet train step fast; applied by default.

  backend.configure_process()  # before JAX starts a backend

XLA reads `XLA_FLAGS` once, when JAX opens its first backend, so this must run
before then. Each flag is added only if `XLA_FLAGS` does not name
it already, so a user's own setting always wins, e.g.
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution`
brings jaxlib's default back (ALEXNET_XLA_DEFAULTS=0 skips all defaults).

What the flag does (jaxlib 0.10.2, measured by `benchmarks.train_step`
on the 2-core AMD EPYC (Zen 4) of the README's "Performance" section): jaxlib hands
both convolutions and matrix products to YNNPACK by default; AlexNet's
convolutions (forward, input and kernel gradients) run 2-4x faster with XLA's
own Eigen convolutions, while YNNPACK's matrix products are the fastest
available (faster than Eigen's and than oneDNN's through
--xla_cpu_use_onednn). So YNNPACK keeps the products only:
  --xla_cpu_experimental_ynn_fusion_type=individual_dot
It is an option of the CPU compiler only: on a GPU or TPU the device programs
are compiled as before, so GPU runs keep their own defaults.

Memory: XLA CPU allocates a step's temporaries (0.9-1.6 GB for the paper model)
afresh at every step, and glibc's malloc serves allocations that large with a
new mmap and unmaps them when they are freed, so every step page-faulted them
in again: 400,000 faults of 4 KiB and 1.5-2.7 s of kernel time per paper step
at batch 128. With huge pages alone the faults were 2 MiB each, but every
other step still spent 1.2-2.1 s in the kernel taking them. So
`restart_with_malloc_defaults` restarts the command (same pid, arguments and
environment) with these `GLIBC_TUNABLES` (MALLOC_TUNABLES): huge pages
(`hugetlb=1`), one arena for all threads (`arena_max=1`), large blocks from
that arena's heap rather than from mmap (`mmap_max=0`), and a heap that is
never shrunk (`trim_threshold`): the step's memory is faulted in once and then
reused, and later steps take no page faults at all. The price is memory: the
heap keeps what it once held (paper model, batch 128: 8.4 GB peak RSS over 80
steps against 3.2 GB with huge pages only; see README.md). glibc reads its tunables
only when a process starts. It is done by the entry points (`alexnet_jax.main`,
the benchmarks, through `backend.configure_process`), never on import, and only when JAX will run on the CPU: not
when JAX_PLATFORMS names another platform first or an accelerator plugin
(CUDA, ROCm, TPU) is installed, since the one arena would serialise a GPU
host's input threads.
"""

from __future__ import annotations

import os
import sys

CPU_DEFAULTS = (
    ('xla_cpu_experimental_ynn_fusion_type', 'individual_dot'),
)


def _defaults_enabled() -> bool:
  return os.environ.get('ALEXNET_XLA_DEFAULTS', '1') != '0'


def _missing(defaults, settings: list[str], prefix: str = '') -> list[str]:
  """`prefix + name=value` for every default whose name no setting names."""
  present = {s.split('=', 1)[0].lstrip('-') for s in settings}
  return [f'{prefix}{name}={value}' for name, value in defaults if name not in present]


def with_cpu_defaults(xla_flags: str) -> str:
  """`xla_flags` plus every default flag it does not set itself."""
  extra = _missing(CPU_DEFAULTS, xla_flags.split(), prefix='--')
  return ' '.join([xla_flags.strip()] + extra).strip()


def set_cpu_defaults() -> bool:
  """Adds the CPU defaults to `os.environ['XLA_FLAGS']`.

  Returns False (and changes nothing) when JAX has already opened a backend,
  since XLA would no longer read the variable, or when ALEXNET_XLA_DEFAULTS=0.
  """
  if not _defaults_enabled():
    return False
  if 'jax' in sys.modules:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():
      return False
  os.environ['XLA_FLAGS'] = with_cpu_defaults(os.environ.get('XLA_FLAGS', ''))
  return True


# (tunable, value): see "Memory" above. A tunable the user set is left alone.
MALLOC_TUNABLES = (
    ('glibc.malloc.hugetlb', '1'),
    ('glibc.malloc.arena_max', '1'),
    ('glibc.malloc.mmap_max', '0'),
    ('glibc.malloc.trim_threshold', str(1 << 40)),
)
ACCELERATOR_PLUGINS = ('jax_plugins', 'jax_cuda12_plugin', 'jax_cuda13_plugin',
                       'jax_rocm7_plugin', 'libtpu')


def with_malloc_defaults(tunables: str) -> str | None:
  """`GLIBC_TUNABLES` plus every MALLOC_TUNABLES entry it does not name.

  None when it names them all (to any value), so nothing would change.
  """
  parts = [p for p in tunables.split(':') if p]
  extra = _missing(MALLOC_TUNABLES, parts)
  return ':'.join(parts + extra) if extra else None


def runs_on_cpu() -> bool:
  """Whether JAX will pick the CPU, judged without importing it."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  return not any(importlib.util.find_spec(m) for m in ACCELERATOR_PLUGINS)


def restart_with_malloc_defaults(module: str) -> None:
  """Re-executes `python -m module <args>` with MALLOC_TUNABLES added.

  Returns (and changes nothing) off Linux/glibc, when ALEXNET_XLA_DEFAULTS=0,
  when JAX will not run on the CPU, or when `GLIBC_TUNABLES` already names
  every tunable (so after the restart).
  """
  import platform  # pylint: disable=g-import-not-at-top
  if not _defaults_enabled() or not sys.platform.startswith('linux'):
    return
  if platform.libc_ver()[0] != 'glibc' or not runs_on_cpu():
    return
  tunables = with_malloc_defaults(os.environ.get('GLIBC_TUNABLES', ''))
  if tunables is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, '-m', module] + sys.argv[1:],
            dict(os.environ, GLIBC_TUNABLES=tunables))
