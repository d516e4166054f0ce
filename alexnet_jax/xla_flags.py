"""XLA CPU settings that make the AlexNet train step fast; applied by default.

  from alexnet_jax import xla_flags; xla_flags.set_cpu_defaults()  # before `import jax`

XLA reads `XLA_FLAGS` once, when JAX opens its first backend, so this must run
before JAX is imported. Each flag is added only if `XLA_FLAGS` does not name
it already, so a user's own setting always wins, e.g.
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution`
brings jaxlib's default back (ALEXNET_XLA_DEFAULTS=0 skips all defaults).

What the flag does (jaxlib 0.10.2, measured by `alexnet_jax.benchmarks.train_step`
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
new mmap, so every step page-faulted them in 4 KiB pages again: 400,000 faults
and 1.5-2.7 s of kernel time per paper step at batch 128. `restart_with_huge_pages`
restarts the command (same pid, arguments and environment) with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, under which malloc asks for transparent
huge pages; glibc reads its tunables only when a process starts. It is done by
the entry points (`alexnet_jax.main`, the benchmarks), never on import.
"""

from __future__ import annotations

import os
import sys

CPU_DEFAULTS = (
    ('xla_cpu_experimental_ynn_fusion_type', 'individual_dot'),
)


def _defaults_enabled() -> bool:
  return os.environ.get('ALEXNET_XLA_DEFAULTS', '1') != '0'


def with_cpu_defaults(xla_flags: str) -> str:
  """`xla_flags` plus every default flag it does not set itself."""
  present = {part.split('=', 1)[0].lstrip('-') for part in xla_flags.split()}
  extra = [f'--{name}={value}' for name, value in CPU_DEFAULTS if name not in present]
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


HUGE_PAGES_TUNABLE = ('glibc.malloc.hugetlb', '1')


def with_huge_pages(tunables: str) -> str | None:
  """`GLIBC_TUNABLES` with malloc's huge pages on; None if it already sets them.

  A `glibc.malloc.hugetlb` the user set, to any value, is left alone.
  """
  name, value = HUGE_PAGES_TUNABLE
  parts = [p for p in tunables.split(':') if p]
  if any(p.split('=', 1)[0] == name for p in parts):
    return None
  return ':'.join(parts + [f'{name}={value}'])


def restart_with_huge_pages(module: str) -> None:
  """Re-executes `python -m module <args>` with malloc's huge pages on.

  Returns (and changes nothing) off Linux/glibc, when ALEXNET_XLA_DEFAULTS=0,
  or when `GLIBC_TUNABLES` already names the tunable (so after the restart).
  """
  import platform  # pylint: disable=g-import-not-at-top
  if not _defaults_enabled() or not sys.platform.startswith('linux'):
    return
  if platform.libc_ver()[0] != 'glibc':
    return
  tunables = with_huge_pages(os.environ.get('GLIBC_TUNABLES', ''))
  if tunables is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, '-m', module] + sys.argv[1:],
            dict(os.environ, GLIBC_TUNABLES=tunables))
