"""Starts one multi-process run on this machine: N processes of alexnet_jax.main.

  python -m launch.local --num_processes=2 --devices_per_process=2 -- \
      --config=configs/fashion_mnist.py --workdir=runs/fashion_mnist_2x2

Everything after `--` goes to every process. Each process gets the
coordinator address (a free local port), the process count and its id through
ALEXNET_COORDINATOR / ALEXNET_NUM_PROCESSES / ALEXNET_PROCESS_ID (see
alexnet_jax/distributed.py), and its own devices:

  --platform=cpu  `devices_per_process` simulated CPU devices (XLA_FLAGS);
                  the processes talk through gloo, as separate hosts would.
  --platform=gpu  its own `devices_per_process` GPUs (CUDA_VISIBLE_DEVICES),
                  taken in order from --gpus (default: all, 0, 1, ...).

Output lines carry the process id, `[0] ...`. SIGINT and SIGTERM are passed
to every process, which then save a checkpoint at the same step and stop;
the same command resumes. If a process fails, the others are stopped (SIGTERM,
then SIGKILL after --kill_after seconds) and the launcher exits with the
failed process's code.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import BinaryIO, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def free_port() -> int:
  """A TCP port that nothing on this machine listens on right now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(base: dict[str, str], *, process_id: int, num_processes: int,
                coordinator: str, platform: str, devices_per_process: int,
                gpus: Sequence[str] = ()) -> dict[str, str]:
  """The environment of process `process_id`: run settings and its devices."""
  env = dict(base)
  env.update({'ALEXNET_COORDINATOR': coordinator,
              'ALEXNET_NUM_PROCESSES': str(num_processes),
              'ALEXNET_PROCESS_ID': str(process_id)})
  env['PYTHONPATH'] = os.pathsep.join(
      [REPO] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
  if platform == 'cpu':
    flags = [f for f in env.get('XLA_FLAGS', '').split()
             if not f.startswith(_DEVICE_COUNT_FLAG)]
    env['XLA_FLAGS'] = ' '.join(flags + [f'{_DEVICE_COUNT_FLAG}={devices_per_process}'])
    env['JAX_PLATFORMS'] = 'cpu'
  else:
    mine = gpus[process_id * devices_per_process:(process_id + 1) * devices_per_process]
    env['CUDA_VISIBLE_DEVICES'] = ','.join(mine)
  return env


def _death_signal_setter():
  """A function for the child that asks for SIGTERM when the launcher dies.

  Linux only (prctl PR_SET_PDEATHSIG); elsewhere None. Looked up here, in
  the parent, so that the forked child only makes the call.
  """
  try:
    prctl = ctypes.CDLL(None).prctl
  except (AttributeError, OSError):
    return None
  return lambda: prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG


def _pump(stream: BinaryIO, prefix: bytes, out: BinaryIO, lock: threading.Lock) -> None:
  """Copies `stream` to `out`, `prefix` before every line.

  Whole lines only (ended by \\n or by the \\r of a progress bar), so lines
  of different processes never mix.
  """
  pending = b''
  while True:
    chunk = os.read(stream.fileno(), 65536)
    pending += chunk
    cut = max(pending.rfind(b'\n'), pending.rfind(b'\r')) + 1 if chunk else len(pending)
    complete, pending = pending[:cut], pending[cut:]
    if complete:
      if not complete.endswith((b'\n', b'\r')):
        complete += b'\n'  # the last line before end of stream
      with lock:
        for line in re.findall(rb'[^\r\n]*[\r\n]', complete):
          out.write(prefix + line)
        out.flush()
    if not chunk:
      return


def run(commands: Sequence[Sequence[str]], envs: Sequence[dict[str, str]], *,
        kill_after: float = 30.0, out: BinaryIO | None = None,
        cwd: str | None = None) -> int:
  """Runs the commands together; returns 0, or the first failure's exit code.

  A process killed by signal s counts as exit code 128 + s, as in a shell.
  """
  out = out or sys.stdout.buffer
  lock = threading.Lock()

  def note(text: str) -> None:
    with lock:
      out.write(f'[launch] {text}\n'.encode())
      out.flush()

  # Own sessions: a Ctrl-C in the terminal reaches the children once, from
  # here, instead of twice (a second SIGINT stops a process without saving).
  die_with_parent = _death_signal_setter()
  procs = [subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=die_with_parent)
           for cmd, env in zip(commands, envs)]
  pumps = [threading.Thread(target=_pump, args=(p.stdout, f'[{i}] '.encode(), out, lock),
                            daemon=True)
           for i, p in enumerate(procs)]
  for t in pumps:
    t.start()
  note('pids ' + ' '.join(f'{i}:{p.pid}' for i, p in enumerate(procs)))

  def send(signum: int) -> None:
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)

  def forward(signum, frame):
    del frame
    note(f'{signal.Signals(signum).name}: passing it to every process')
    send(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  exit_code, failed_at = 0, None
  try:
    while None in [p.poll() for p in procs]:
      if failed_at is None:
        failures = [(i, p.returncode) for i, p in enumerate(procs)
                    if p.returncode not in (None, 0)]
        if failures:
          rank, code = failures[0]
          exit_code = code if code > 0 else 128 - code
          note(f'process {rank} exited with code {code}; stopping the others')
          send(signal.SIGTERM)
          failed_at = time.monotonic()
      elif time.monotonic() - failed_at > kill_after:
        note(f'processes still running {kill_after:g}s after SIGTERM: killing them')
        send(signal.SIGKILL)
        failed_at = float('inf')
      time.sleep(0.1)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for t in pumps:
    t.join()
  if not exit_code:
    codes = [p.returncode for p in procs if p.returncode]
    if codes:
      exit_code = codes[0] if codes[0] > 0 else 128 - codes[0]
  return exit_code


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """(launcher options, arguments for every process)."""
  argv = list(argv)
  passed = []
  if '--' in argv:
    at = argv.index('--')
    argv, passed = argv[:at], argv[at + 1:]
  parser = argparse.ArgumentParser(
      prog='python -m launch.local', description=__doc__.split('\n')[0],
      epilog='Arguments after -- are passed to every process.')
  parser.add_argument('--num_processes', type=int, default=2)
  parser.add_argument('--devices_per_process', type=int, default=1)
  parser.add_argument('--platform', choices=('cpu', 'gpu'), default='cpu')
  parser.add_argument('--gpus', default='',
                      help='comma-separated GPU ids to hand out (default: '
                           'CUDA_VISIBLE_DEVICES, else 0, 1, ...)')
  parser.add_argument('--port', type=int, default=0,
                      help="coordinator port on 127.0.0.1 (default: a free one)")
  parser.add_argument('--module', default='alexnet_jax.main',
                      help='python module every process runs')
  parser.add_argument('--kill_after', type=float, default=30.0,
                      help='seconds between SIGTERM and SIGKILL after a failure')
  args, unknown = parser.parse_known_args(argv)
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error('--num_processes and --devices_per_process must be at least 1')
  return args, unknown + passed


def main(argv: Sequence[str]) -> int:
  args, passed = parse_args(argv)
  n, per = args.num_processes, args.devices_per_process
  gpus: list[str] = []
  if args.platform == 'gpu':
    listed = args.gpus or os.environ.get('CUDA_VISIBLE_DEVICES', '')
    gpus = [g for g in listed.split(',') if g] if listed else [str(i) for i in range(n * per)]
    if len(gpus) < n * per:
      print(f'Error: {n} processes x {per} GPUs need {n * per} GPUs, got {gpus}',
            file=sys.stderr)
      return 2
  coordinator = f'127.0.0.1:{args.port or free_port()}'
  command = [sys.executable, '-m', args.module, *passed]
  envs = [process_env(dict(os.environ), process_id=i, num_processes=n,
                      coordinator=coordinator, platform=args.platform,
                      devices_per_process=per, gpus=gpus)
          for i in range(n)]
  print(f'[launch] {n} processes x {per} {args.platform.upper()} devices, '
        f'coordinator {coordinator}: {" ".join(command[1:])}', flush=True)
  return run([command] * n, envs, kill_after=args.kill_after)


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
