"""Command line of studies.

  python -m alexnet_jax.sweep run SWEEP.py --root=DIR [--executor=local|slurm]
      [--parallel=N] [--devices_per_run=K] [--dry_run]
  python -m alexnet_jax.sweep report DIR [--baseline=KEY=VALUE,...]
  python -m alexnet_jax.sweep compare RUN_DIR_A RUN_DIR_B

`run` lists (`--dry_run`) or runs the runs of a sweep file (configs/sweeps/)
under ROOT, skipping finished runs and resuming started ones; `report`
writes ROOT/report.md, report.csv and curves.png over the seeds of each
configuration; `compare` says where two runs differ (provenance, the first
logged step whose metrics differ, each parameter tensor).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

from alexnet_jax import checkpointing
from alexnet_jax import cli
from alexnet_jax.sweep import compare as compare_lib
from alexnet_jax.sweep import hyper
from alexnet_jax.sweep import report as report_lib
from alexnet_jax.sweep import runner

USAGE = ('usage: python -m alexnet_jax.sweep run SWEEP.py --root=DIR [...] | '
         'report DIR [--baseline=KEY=VALUE,...] | compare RUN_DIR_A RUN_DIR_B')

flags.DEFINE_string('root', None, 'run: the study folder; each run is ROOT/<name>-<hash>.')
flags.DEFINE_enum('executor', 'local', ['local', 'slurm'], 'run: where the runs go.')
flags.DEFINE_integer('parallel', 1, 'run: runs at once (local), or the array parallelism (slurm).')
flags.DEFINE_integer('devices_per_run', 1,
                     'run: GPUs of each run (on the CPU: simulated devices).')
flags.DEFINE_bool('share_gpus', False,
                  'run (local): let runs share GPUs, each with its fraction of the memory.')
flags.DEFINE_bool('dry_run', False, 'run: list the runs and their states, run nothing.')
flags.DEFINE_multi_string('run_flag', [],
                          'run: a flag passed to every run as it is, e.g. '
                          '--run_flag=--config.max_train_steps=10 (not part of the run names).')
flags.DEFINE_string('slurm_partition', '', 'run (slurm): partition.')
flags.DEFINE_integer('slurm_time', 24 * 60, 'run (slurm): time limit of a task, minutes; a task '
                     'that reaches it is requeued and resumes.')
flags.DEFINE_string('slurm_account', '', 'run (slurm): account.')
flags.DEFINE_string('slurm_qos', '', 'run (slurm): QOS.')
flags.DEFINE_string('slurm_constraint', '', 'run (slurm): node constraint.')
flags.DEFINE_integer('slurm_cpus_per_task', 8, 'run (slurm): CPUs per task (input pipeline).')
flags.DEFINE_integer('slurm_mem_gb', 0, 'run (slurm): memory per task, GB (0: the default).')
flags.DEFINE_multi_string('slurm_setup', [], 'run (slurm): a shell line run before each task, '
                          'e.g. "source .venv/bin/activate".')
flags.DEFINE_string('baseline', '', 'report: the baseline group, KEY=VALUE,... of its overrides '
                    '(default: the group without overrides besides the seed).')
FLAGS = flags.FLAGS


class RunsFailedError(ValueError):
  """Some runs of a sweep failed; the others finished."""


def run_command(sweep_file: str) -> int:
  if not FLAGS.root:
    raise ValueError('run needs --root=DIR, the folder that holds the study')
  for name in ('parallel', 'devices_per_run'):
    if FLAGS[name].value < 1:
      raise ValueError(f'--{name}={FLAGS[name].value} must be at least 1')
  sweep = hyper.load(sweep_file, FLAGS.root, FLAGS.devices_per_run)
  states = {r.name: r.state() for r in sweep.runs}
  busy = {r.name for r in sweep.runs if states[r.name] != 'done' and runner.is_busy(r.workdir)}
  if FLAGS.dry_run:
    width = max(len(r.name) for r in sweep.runs)
    print(f'{len(sweep.runs)} runs of {sweep.file} (base {sweep.base_config}) under {sweep.root}')
    for r in sweep.runs:
      state = states[r.name] + (' (running elsewhere)' if r.name in busy else '')
      flags_text = ' '.join(r.flags()) or '(base config)'
      print(f'  {r.name:<{width}}  {state:<8}  {flags_text}')
    return 0
  os.makedirs(sweep.root, exist_ok=True)
  manifest = os.path.join(sweep.root, 'sweep.json')
  old = checkpointing.read_json(manifest)
  if old and old.get('sweep_file') != sweep.file:
    raise ValueError(f'{sweep.root} holds the study of {old.get("sweep_file")}: pass another '
                     '--root for this sweep file')
  # The manifest first: `report` finds every run, even those never started.
  checkpointing.write_json(manifest, sweep.manifest())
  todo = [r for r in sweep.runs if states[r.name] != 'done' and r.name not in busy]
  done = sum(s == 'done' for s in states.values())
  print(f'{len(sweep.runs)} runs: {done} done, {len(busy)} running elsewhere (skipped), '
        f'{len(todo)} to run ({sum(states[r.name] == "partial" for r in todo)} resumed)')
  if not todo:
    return 0
  if FLAGS.executor == 'slurm':
    options = runner.SlurmOptions(
        partition=FLAGS.slurm_partition, time_min=FLAGS.slurm_time, account=FLAGS.slurm_account,
        qos=FLAGS.slurm_qos, constraint=FLAGS.slurm_constraint,
        cpus_per_task=FLAGS.slurm_cpus_per_task, mem_gb=FLAGS.slurm_mem_gb,
        array_parallelism=FLAGS.parallel, setup=tuple(FLAGS.slurm_setup))
    jobs = runner.submit_slurm(sweep, todo, FLAGS.devices_per_run, FLAGS.parallel, options,
                               FLAGS.run_flag)
    print(f'Submitted {len(jobs)} array tasks (job {jobs[0].job_id.split("_")[0]}); logs in '
          f'{os.path.join(sweep.root, "logs")}. Re-run this command with --dry_run to see '
          'their states, and `python -m alexnet_jax.sweep report` when they are done.')
    return 0
  slots = runner.local_slots(FLAGS.parallel, FLAGS.devices_per_run, FLAGS.share_gpus)
  outcome = runner.run_local(sweep, todo, slots, FLAGS.run_flag)
  failed = [name for name, state in outcome.items() if state != 'done']
  if failed:
    raise RunsFailedError(f'{len(failed)} of {len(todo)} runs failed ({", ".join(failed)}); '
                       f'their logs are in {os.path.join(sweep.root, "logs")}; re-run the '
                       'command to retry them')
  print(f'All {len(sweep.runs)} runs are done: python -m alexnet_jax.sweep report {sweep.root}')
  return 0


def main(argv):
  if not FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax is chatty at INFO
  command, *args = argv[1:] or ['']
  expected = {'run': 1, 'report': 1, 'compare': 2}
  if command not in expected or len(args) != expected[command]:
    raise app.UsageError(USAGE)
  if command == 'run':
    return run_command(args[0])
  if command == 'report':
    baseline = report_lib.parse_baseline(FLAGS.baseline) if FLAGS.baseline else None
    written = report_lib.write_report(args[0], baseline)
    print(open(written['report.md'], encoding='utf-8').read() if 'report.md' in written
          else written)
    return 0
  print(compare_lib.format_comparison(compare_lib.compare_runs(*args)))
  return 0


if __name__ == '__main__':
  cli.run(main)
