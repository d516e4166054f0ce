"""How every command line of the project runs: a user error is one line, not a traceback.

  if __name__ == '__main__':
    cli.run(main)

`run` parses the flags with `config_lib.parse_flags` (a mistyped
`--config.<key>` or a config file that cannot be loaded: one `FATAL Flags
parsing error: ...` line, status 2) and turns an exception that escapes `main`
into `Error: <message>` on stderr, status 1. The project's own failures
(`KNOWN_ERRORS`: bad config values, missing data, a diverged run, a busy or
incompatible workdir, ...) carry a message that says what to do, printed as
it is; anything else is reported as `Error: <Type>: <first line>` with a hint
to set ALEXNET_DEBUG=1, which shows the full traceback instead.

This module imports neither JAX nor TensorFlow.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
from typing import Any, Callable

from absl import app

from alexnet_jax import config_lib

DEBUG_ENV = 'ALEXNET_DEBUG'
# The project raises these with a message that ends with what to do
# (subclasses: data.DataNotFoundError, train.NonFiniteLossError, the
# checkpoint and workdir errors, WorkdirError below, ...).
KNOWN_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


class WorkdirError(ValueError):
  """--workdir cannot hold the run; the message says why and what to pass."""


def debugging() -> bool:
  """Whether ALEXNET_DEBUG asks for tracebacks."""
  return os.environ.get(DEBUG_ENV, '').strip().lower() not in ('', '0', 'false', 'no')


def error_message(error: BaseException) -> str:
  """The `Error: ...` report of an exception that ended a command."""
  if isinstance(error, KNOWN_ERRORS) and str(error).strip():
    return f'Error: {error}'
  lines = str(error).strip().splitlines()
  first = f': {lines[0]}' if lines else ''
  return f'Error: {type(error).__name__}{first} (set {DEBUG_ENV}=1 for the traceback)'


def call_main(main: Callable[[list[str]], Any], argv: list[str]) -> Any:
  """`main(argv)`; an exception from it exits with status 1 after its `Error:` line."""
  try:
    return main(argv)
  except app.UsageError:
    raise  # absl prints it with the usage text (status 1)
  except Exception as e:  # pylint: disable=broad-except
    if debugging():
      raise
    sys.stdout.flush()
    # The leading newline ends a progress bar's line.
    print(f'\n{error_message(e)}', file=sys.stderr)
    sys.exit(1)


def run(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` with the project's flag parsing and one-line errors (see above)."""
  app.run(functools.partial(call_main, main), flags_parser=config_lib.parse_flags)


def check_workdir(path: str) -> None:
  """Creates the run folder `path` if needed; raises WorkdirError unless it is a writable folder.

  Writability is checked by creating and removing a file in it, which is what
  the run does (permissions alone say nothing of a read-only filesystem, or
  of root).
  """
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f'--workdir={path} is a file, not a folder: pass a folder')
  try:
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix='.write_probe.', dir=path)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    reason = e.strerror or str(e)
    raise WorkdirError(
        f'cannot write to --workdir={path} ({reason}): pass a writable folder') from e
