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
"""

from __future__ import annotations

import os
import sys

CPU_DEFAULTS = (
    ('xla_cpu_experimental_ynn_fusion_type', 'individual_dot'),
)


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
  if os.environ.get('ALEXNET_XLA_DEFAULTS', '1') == '0':
    return False
  if 'jax' in sys.modules:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():
      return False
  os.environ['XLA_FLAGS'] = with_cpu_defaults(os.environ.get('XLA_FLAGS', ''))
  return True
