"""Command line: python -m alexnet_jax.main --config=configs/<name>.py --workdir=DIR

Any config key can be overridden with --config.<key>=<value>; the config is
locked, so a mistyped key is an error. Without --config the Fashion-MNIST demo
runs. Re-running the same command resumes from the newest checkpoint.

Several processes (hosts, or GPUs of one machine) train one model together
when started by `python -m launch.local`, by `srun` (launch/slurm.sbatch), or
with --coordinator_address, --num_processes and --process_id on every host.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

from alexnet_jax import backend  # pylint: disable=g-import-not-at-top
from alexnet_jax import cli  # pylint: disable=g-import-not-at-top
from alexnet_jax import config_lib  # pylint: disable=g-import-not-at-top

backend.configure_process()  # XLA reads XLA_FLAGS once, before a backend starts

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from alexnet_jax import data
from alexnet_jax import distributed
from alexnet_jax import train

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(_REPO, 'configs', 'fashion_mnist.py')

with config_lib.unknown_keys_exit():  # overrides of the default apply here
  config_flags.DEFINE_config_file(
      'config', DEFAULT_CONFIG, 'Config file (configs/*.py).', lock_config=True)
flags.DEFINE_string('workdir', None,
                    'Run folder: checkpoints, metrics, results. Default runs/<config name>.')
flags.DEFINE_bool('allow_config_change', False,
                  'Resume a workdir even though the config differs from the saved one in '
                  'settings that change the computation (model, data, optimiser, schedule, '
                  'batch, seed, dtype, conv_impl); the saved config is kept as config.N.json.')
# Multi-process runs (alexnet_jax/distributed.py); under SLURM none is needed.
flags.DEFINE_string('coordinator_address', None,
                    'HOST:PORT of process 0 in a multi-process run '
                    '(env ALEXNET_COORDINATOR).')
flags.DEFINE_integer('num_processes', None,
                     'Number of processes of the run (env ALEXNET_NUM_PROCESSES).')
flags.DEFINE_integer('process_id', None,
                     'This process, 0 to num_processes-1 (env ALEXNET_PROCESS_ID).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  data.configure_tensorflow()
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and tfds are chatty at INFO
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join(
      'runs', os.path.splitext(os.path.basename(config_flags.get_config_filename(
          flags.FLAGS['config'])))[0])
  logging.info('workdir: %s', os.path.abspath(workdir))
  cli.check_workdir(workdir)
  backend.set_deterministic(config.deterministic)  # before JAX opens a backend
  # Before anything touches a device: the processes must meet first. Errors
  # end in one line on stderr (cli.run).
  distributed.initialize(distributed.resolve(
      flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
      flags.FLAGS.process_id))
  results = train.train_and_evaluate(config, workdir,
                                     allow_config_change=flags.FLAGS.allow_config_change)
  summary = {k: results[k] for k in ('step', 'eval_top1_error', 'eval_top5_error',
                                     'eval_examples', 'wall_time_sec')
             if k in results}
  if jax.process_index() == 0:
    print(f'\nResults in {os.path.abspath(workdir)}: {summary}')


if __name__ == '__main__':
  backend.configure_process(restart_module='alexnet_jax.main')  # malloc settings on the CPU
  cli.run(main)
