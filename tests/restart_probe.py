"""Prints what `xla_flags.restart_with_malloc_defaults` restarted it with (tests only)."""

import os
import sys

from alexnet_jax.cpu import xla_flags

if __name__ == '__main__':
  print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True)
  xla_flags.restart_with_malloc_defaults('tests.restart_probe')
