"""User errors end in one line on stderr and a nonzero status, never a traceback.

The subprocess cases run the real entry points (each costs a JAX + TensorFlow
import, a few seconds); the rest are in-process.
"""

import errno
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

from alexnet_jax import cli
from alexnet_jax import config_lib
from alexnet_jax.cpu import xla_flags
from alexnet_jax.data import imagenet
from conftest import REPO


def _env(**extra):
  env = dict(os.environ)
  env.pop(cli.DEBUG_ENV, None)
  env.update(TF_CPP_MIN_LOG_LEVEL='2', JAX_PLATFORMS='cpu', **extra)
  # The malloc settings the entry points would re-execute themselves to get:
  # given, each process starts (imports JAX and TensorFlow) once, not twice.
  tunables = xla_flags.with_malloc_defaults(env.get('GLIBC_TUNABLES', ''))
  if tunables is not None:
    env['GLIBC_TUNABLES'] = tunables
  return env


def _run(args, prefix=(), **env):
  return subprocess.run([*prefix, sys.executable, '-m', *args], cwd=REPO, env=_env(**env),
                        capture_output=True, text=True, timeout=300)


def _last_line(run) -> str:
  """The last non-empty line of stderr, after checking the run failed without a traceback."""
  assert run.returncode != 0, run.stderr[-3000:]
  assert 'Traceback' not in run.stderr, run.stderr[-3000:]
  lines = [l for l in run.stderr.splitlines() if l.strip()]
  return lines[-1]


def _read_only_prefix(folder) -> list[str] | None:
  """A command prefix that makes `folder` unwritable for the command, or None.

  Not root: chmod 0o555 does it. Root writes through any mode, so `folder` is
  bind-mounted read-only onto itself in a mount namespace of the command's
  own (`unshare -m`): a real read-only filesystem (EROFS), gone with the
  process.
  """
  if os.geteuid() != 0:
    os.chmod(folder, 0o555)
    return []
  unshare = shutil.which('unshare')
  if not unshare:
    return None
  prefix = [unshare, '-m', 'sh', '-c',
            'd=$1; shift; mount --bind "$d" "$d" && mount -o remount,bind,ro "$d" && exec "$@"',
            'sh', str(folder)]
  probe = subprocess.run(prefix + ['touch', str(folder / 'probe')], capture_output=True)
  if probe.returncode == 0 or os.path.exists(folder / 'probe'):
    return None  # no mount namespace here, or the mount did not make it read-only
  return prefix


# ------------------------------------------------------------------ subprocesses


def test_workdir_that_is_a_file(tmp_path):
  (tmp_path / 'run').write_text('')
  line = _last_line(_run(['alexnet_jax.main', f'--workdir={tmp_path / "run"}']))
  assert line == f'Error: --workdir={tmp_path / "run"} is a file, not a folder: pass a folder'


def test_workdir_on_a_read_only_filesystem(tmp_path):
  folder = tmp_path / 'ro'
  folder.mkdir()
  prefix = _read_only_prefix(folder)
  if prefix is None:
    pytest.skip('cannot make a folder read-only for root here (no unshare -m); '
                'see test_check_workdir_reports_an_unwritable_folder')
  try:
    run = _run(['alexnet_jax.main', f'--workdir={folder}'], prefix=prefix)
  finally:
    os.chmod(folder, 0o755)
  line = _last_line(run)
  assert run.returncode == 1
  assert line.startswith(f'Error: cannot write to --workdir={folder} ('), line
  assert line.endswith('): pass a writable folder'), line
  assert os.listdir(folder) == []  # no probe file left behind


@pytest.mark.parametrize('module', ['alexnet_jax.main', 'alexnet_jax.summary',
                                    'alexnet_jax.tools.dataset_stats', 'benchmarks.conv_layers'])
def test_missing_config_file(module, tmp_path):
  run = _run([module, '--config=configs/missing.py', '--config.seed=1',
              f'--workdir={tmp_path}'] if module.endswith('main') else
             [module, '--config=configs/missing.py'])
  assert run.returncode == 2
  assert _last_line(run) == ('FATAL Flags parsing error: cannot load config file '
                             'configs/missing.py: no such file (pass one of configs/*.py)')


def test_config_file_with_a_syntax_error(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('from alexnet_jax import config_lib\n\ndef get_config(:\n  pass\n')
  run = _run(['alexnet_jax.main', f'--config={bad}', f'--workdir={tmp_path / "run"}'])
  assert run.returncode == 2
  line = _last_line(run)
  assert line.startswith(f'FATAL Flags parsing error: cannot load config file {bad} line 3: '), line
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('debug', [False, True])
def test_error_inside_the_project_is_one_line_unless_debugging(debug, tmp_path):
  run = _run(['alexnet_jax.main', '--config.dtype=float64', f'--workdir={tmp_path}'],
             **({cli.DEBUG_ENV: '1'} if debug else {}))
  assert run.returncode == 1
  message = "Bad config: dtype='float64'; use one of ('float32', 'bfloat16')"
  if debug:
    assert 'Traceback' in run.stderr and 'in validate' in run.stderr, run.stderr[-3000:]
    assert run.stderr.rstrip().endswith(f'ValueError: {message}')
  else:
    assert _last_line(run) == f'Error: {message}'


# ------------------------------------------------------------------ in-process


def test_check_workdir_creates_the_folder_and_leaves_nothing(tmp_path):
  cli.check_workdir(str(tmp_path / 'a' / 'b'))
  assert os.listdir(tmp_path / 'a' / 'b') == []
  cli.check_workdir(str(tmp_path / 'a' / 'b'))  # an existing folder is fine


def test_check_workdir_reports_an_unwritable_folder(tmp_path, monkeypatch):
  # Root writes through chmod 0o555, so the failing write is simulated.
  real_open = os.open

  def denied(path, *args, **kwargs):
    if os.fspath(path).startswith(str(tmp_path)):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(os, 'open', denied)
  with pytest.raises(cli.WorkdirError) as e:
    cli.check_workdir(str(tmp_path))
  assert str(e.value) == (f'cannot write to --workdir={tmp_path} (Permission denied): '
                          'pass a writable folder')


def test_unexpected_errors_name_their_type_and_the_debug_switch(capsys, monkeypatch):
  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

  def main(argv):
    del argv
    raise RuntimeError('the first line\nand more')

  with pytest.raises(SystemExit) as e:
    cli.call_main(main, ['prog'])
  assert e.value.code == 1
  assert capsys.readouterr().err == ('\nError: RuntimeError: the first line '
                                     f'(set {cli.DEBUG_ENV}=1 for the traceback)\n')
  # Known errors keep their whole message, which ends with what to do.
  assert cli.error_message(ValueError('Bad config: x\n  y: do z')) == 'Error: Bad config: x\n  y: do z'
  monkeypatch.setenv(cli.DEBUG_ENV, '1')
  with pytest.raises(RuntimeError):
    cli.call_main(main, ['prog'])


def test_config_file_errors_name_file_and_line(tmp_path):
  raises = tmp_path / 'raises.py'
  raises.write_text('def get_config():\n  c = {}\n  return c["x"]\n')
  with pytest.raises(ValueError, match=re.escape(f"cannot load config file {raises} line 3: KeyError: 'x'") + '$'):
    config_lib.load_file(str(raises))
  (tmp_path / 'none.py').write_text('X = 1\n')
  with pytest.raises(ValueError, match='defines no get_config'):
    config_lib.load_file(str(tmp_path / 'none.py'))
  with pytest.raises(FileNotFoundError, match='no such file'):
    config_lib.load_file(str(tmp_path / 'missing.py'))


def _imagenet_config(tmp_path):
  config = config_lib.base_config()
  config.dataset.data_dir = str(tmp_path / 'tfds')
  config.dataset.manual_dir = str(tmp_path / 'manual')
  os.makedirs(config.dataset.manual_dir)
  return config


def test_zero_byte_imagenet_archives_are_named(tmp_path):
  config = _imagenet_config(tmp_path)
  train = os.path.join(config.dataset.manual_dir, imagenet.TRAIN_TAR)
  val = os.path.join(config.dataset.manual_dir, imagenet.VAL_TAR)
  for path in (train, val):
    open(path, 'wb').close()
  with pytest.raises(imagenet.ArchiveError) as e:
    imagenet.prepare_original(config)
  assert str(e.value).startswith(f'{train} is empty (0 bytes); {val} is empty (0 bytes): '
                                 'copy the archives again'), e.value
  with tarfile.open(train, 'w'):
    pass  # a valid (empty) tar
  with open(val, 'wb') as f:
    f.write(b'not a tar' * 100)
  with pytest.raises(imagenet.ArchiveError, match='^' + re.escape(f'{val} is not a tar archive: copy the archive again')):
    imagenet.prepare_original(config)


def test_cut_imagenet_archive_is_named(tmp_path):
  config = _imagenet_config(tmp_path)
  train = os.path.join(config.dataset.manual_dir, imagenet.TRAIN_TAR)
  with tarfile.open(train, 'w') as tar:  # one synset archive, then cut short
    info = tarfile.TarInfo('n01751748.tar')
    info.size = 100_000
    tar.addfile(info, io.BytesIO(b'\0' * info.size))
  with open(train, 'r+b') as f:
    f.truncate(5000)
  with tarfile.open(os.path.join(config.dataset.manual_dir, imagenet.VAL_TAR), 'w'):
    pass
  with pytest.raises(imagenet.ArchiveError) as e:
    imagenet.prepare_original(config)
  assert str(e.value).startswith(f'{train} is damaged or incomplete ('), e.value
  assert str(e.value).endswith('copy it again')
