"""One run at a time per workdir: an OS file lock held for the whole run.

The lock is `flock` on `WORKDIR/.lock`, so it dies with the process that holds
it: a run killed with `kill -9` never leaves a stale lock. The file also says
who holds it (pid, host, start time, command), which is what a second run is
told when it finds the workdir busy.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys

LOCK_FILE = '.lock'


class WorkdirBusyError(ValueError):
  """Another run holds the workdir."""


def _holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0) or b'{}')
  except (OSError, ValueError):
    info = {}
  if not info:
    return 'another process'
  return (f"process {info.get('pid')} on {info.get('host')}, started "
          f"{info.get('started')}: {info.get('command')}")


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir for the block, or raises WorkdirBusyError."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = None

  def acquire(self) -> None:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _holder(fd)
      os.close(fd)
      raise WorkdirBusyError(
          f'{self.workdir} is in use by another run ({holder}); wait for it to end, '
          'or pass another --workdir') from None
    info = {'pid': os.getpid(), 'host': socket.gethostname(),
            'started': datetime.datetime.now().isoformat(timespec='seconds'),
            'command': ' '.join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
