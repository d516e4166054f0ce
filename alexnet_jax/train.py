"""Training and evaluation: the pmap-ed step, the loop, checkpoints, outputs.

Everything that crosses devices goes through the named axis `parallel.AXIS`
(`pmean` / `psum`), so the same step runs on 1 device or many, with the
network whole on every device or its towers split over device pairs
(`parallel.Layout`). With several processes (alexnet_jax/distributed.py) the
pmaps span the devices of all of them, each process feeds its own devices,
and process 0 alone writes the outputs.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import time
from typing import Any, Callable, Sequence

import flax
import flax.jax_utils
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from alexnet_jax import backend
from alexnet_jax import checkpointing
from alexnet_jax import config_lib
from alexnet_jax import data as data_lib
from alexnet_jax import metric_writers
from alexnet_jax import model as model_lib
from alexnet_jax import optim
from alexnet_jax import parallel
from alexnet_jax import provenance
from alexnet_jax import workdir as workdir_lib

AXIS = parallel.AXIS


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  lr_scale: jax.Array  # product of the plateau reductions applied so far


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


def create_train_state(config, model: model_lib.AlexNet,
                       tx: optax.GradientTransformation) -> TrainState:
  size = config.dataset.image_size
  channels = len(config.dataset.mean)
  dummy = jnp.zeros((1, size, size, channels), jnp.float32)

  @jax.jit
  def init(rng):
    params = model.init({'params': rng}, dummy, train=False)['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), lr_scale=jnp.ones((), jnp.float32))

  return init(jax.random.key(config.seed))


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def loss_and_grads(params, batch, rng, *, model: model_lib.AlexNet,
                   layout: parallel.Layout, train: bool = True):
  """(loss, logits, grads) of this device's share, grads averaged over its replicas.

  `params` and `model` are this device's (`parallel.split_model`). With the
  towers split, differentiating through the exchanges sums the cotangents of
  every device of a replica, i.e. gives the gradient of the sum of their
  losses; all towers of a replica compute the same loss, so each contributes
  loss / towers and the sum is the replica's loss.
  """
  def loss_fn(params):
    logits = model.apply({'params': params}, batch['image'], train=train,
                         rngs={'dropout': rng} if train else None)
    loss = cross_entropy(logits, batch['label']).mean()
    return loss / layout.towers, (loss, logits)

  (_, (loss, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  grads = model.ops.mean_over_devices(grads, AXIS, layout.replica_groups)
  return loss, logits, grads


def train_step(state: TrainState, batch, *, model: model_lib.AlexNet,
               layout: parallel.Layout, tx: optax.GradientTransformationExtraArgs,
               schedule: Callable[[jax.Array], jax.Array], seed: int):
  """One SGD step on this device's share of the batch and of the network.

  The dropout key is derived from (seed, step, device index), so a run is
  reproducible for a given device count and layout.
  """
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), state.step),
                           jax.lax.axis_index(AXIS))
  loss, logits, grads = loss_and_grads(state.params, batch, rng, model=model, layout=layout)
  lr = schedule(state.step) * state.lr_scale
  params, opt_state = model.ops.apply_optimizer(tx, grads, state.opt_state, state.params, lr)
  # Every tower of a replica holds the replica's loss and logits, so the mean
  # over all devices is the mean over replicas.
  metrics = model.ops.mean_over_devices({
      'train_loss': loss,
      'train_top1_error': jnp.mean(jnp.argmax(logits, -1) != batch['label']),
  }, AXIS)
  metrics['lr'] = lr
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(params, batch, *, model: model_lib.AlexNet, layout: parallel.Layout):
  """Sums over this step's real examples (mask 1) of all replicas.

  With images of shape (B, crops, H, W, C) the prediction is the average of
  the softmax over the crops (the paper's 10-patch testing); the returned
  logits are then log-probabilities. Counts are summed over one tower's
  devices, so each replica's examples count once.
  """
  images = batch['image']
  apply = lambda x: model.apply({'params': params}, x, train=False)
  if images.ndim == 5:
    b, crops = images.shape[:2]
    logits = apply(images.reshape((b * crops,) + images.shape[2:]))
    probs = jax.nn.softmax(logits).reshape(b, crops, -1).mean(axis=1)
    logits = jnp.log(probs)
  else:
    logits = apply(images)
  counts = masked_counts(logits, batch['label'], batch['mask'])
  return jax.lax.psum(counts, AXIS, axis_index_groups=layout.replica_groups)


def make_steps(model: model_lib.AlexNet, layout: parallel.Layout,
               tx: optax.GradientTransformationExtraArgs,
               schedule: Callable[[jax.Array], jax.Array], seed: int,
               devices: Sequence[Any]):
  """(train step, eval step), pmapped over `devices` laid out as `layout`.

  The train step donates its state; the eval step is called as
  `(device_params, sharded_batch)`.
  """
  model = parallel.split_model(model, layout)
  p_train_step = jax.pmap(
      functools.partial(train_step, model=model, layout=layout, tx=tx,
                        schedule=schedule, seed=seed),
      axis_name=AXIS, devices=devices, donate_argnums=(0,))
  p_eval_step = jax.pmap(functools.partial(eval_step, model=model, layout=layout),
                         axis_name=AXIS, devices=devices)
  return p_train_step, p_eval_step


def masked_counts(logits, labels, mask):
  """Correct top-1 / top-5 predictions, loss and example count, masked."""
  k = min(5, logits.shape[-1])
  _, top_k = jax.lax.top_k(logits, k)
  hit5 = jnp.any(top_k == labels[:, None], axis=-1)
  hit1 = top_k[:, 0] == labels
  return {
      'top1_correct': jnp.sum(hit1 * mask),
      'top5_correct': jnp.sum(hit5 * mask),
      'loss_sum': jnp.sum(cross_entropy(logits, labels) * mask),
      'count': jnp.sum(mask),
  }


def evaluate(p_eval_step, params, batches, shard_fn: Callable[[dict], dict],
             max_batches: int = 0) -> dict[str, float]:
  """Top-1/top-5 error over every example the iterator yields."""
  totals = None
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    out = p_eval_step(params, shard_fn(batch))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.tree.map(lambda x: float(x[0]), jax.device_get(totals))
  n = totals['count']
  return {
      'eval_top1_error': 1.0 - totals['top1_correct'] / n,
      'eval_top5_error': 1.0 - totals['top5_correct'] / n,
      'eval_loss': totals['loss_sum'] / n,
      'eval_examples': int(n),
  }


class Plateau:
  """The paper's rule: divide lr by 10 when validation error stops improving."""

  def __init__(self, sched_config, state: dict | None = None):
    self.cfg = sched_config
    state = state or {}
    self.best = state.get('best', float('inf'))
    self.bad_evals = state.get('bad_evals', 0)
    self.reductions = state.get('reductions', 0)

  def update(self, error: float) -> bool:
    """Records one evaluation; returns True when lr must be reduced now."""
    if error < self.best - self.cfg.min_delta:
      self.best, self.bad_evals = error, 0
      return False
    self.bad_evals += 1
    if (self.cfg.name == 'plateau' and self.bad_evals >= self.cfg.patience
        and self.reductions < self.cfg.max_reductions):
      self.reductions += 1
      self.bad_evals = 0
      return True
    return False

  def state(self) -> dict:
    return {'best': self.best, 'bad_evals': self.bad_evals,
            'reductions': self.reductions}


class StopSignal:
  """Turns SIGTERM/SIGINT into a flag checked between steps."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: signals stay with the caller
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def select_devices(config) -> list:
  """This process's devices: all local ones, or the first `num_devices`."""
  devices = jax.local_devices()
  if config.num_devices:
    if config.num_devices > len(devices):
      raise ValueError(
          f'Bad config: num_devices={config.num_devices} but only {len(devices)} '
          'local devices exist (on CPU, simulate more with XLA_FLAGS='
          '--xla_force_host_platform_device_count=N)')
    devices = devices[:config.num_devices]
  return devices


def global_devices(num_local: int) -> list:
  """The first `num_local` devices of every process, in process order.

  A pmap over these spans all processes (given only the local devices, each
  process would train a model of its own); each process passes the data of
  its own `num_local` devices.
  """
  devices = []
  for p in range(jax.process_count()):
    local = jax.local_devices(process_index=p)
    if len(local) < num_local:
      raise ValueError(
          f'Process {p} has {len(local)} devices, process {jax.process_index()} '
          f'uses {num_local}: every process needs the same number of devices '
          '(set --config.num_devices to the smallest count)')
    devices += local[:num_local]
  return devices


class StopAgreement:
  """Makes all processes stop at the same step when any of them is signalled.

  Each step every process votes (the signal it received, or 0) in a tiny
  all-reduce; the outcome is read one step later, so the host does not wait
  for the step it has just dispatched. Every process reads the same outcome
  at the same step, so all of them save the same checkpoint and stop.
  With a single process the local signal decides at once.
  """

  def __init__(self, devices: list, num_local: int):
    self._votes = []
    self._num_local = num_local
    self._vote = None
    if jax.process_count() > 1:
      self._vote = jax.pmap(lambda x: jax.lax.pmax(x, AXIS), axis_name=AXIS,
                            devices=devices)

  def __call__(self, received: str | None) -> str | None:
    """The signal name all processes stop for after this step, or None."""
    if self._vote is None:
      return received
    signum = signal.Signals[received].value if received else 0
    self._votes.append(self._vote(np.full((self._num_local,), signum, np.int32)))
    if len(self._votes) < 2:
      return None
    agreed = int(self._votes.pop(0)[0])
    return signal.Signals(agreed).name if agreed else None


def _host_metrics(history: list[dict]) -> dict[str, float]:
  stacked = jax.device_get(history)
  return {k: float(np.mean([m[k][0] for m in stacked])) for k in stacked[0]}


@contextlib.contextmanager
def hold_workdir(workdir: str):
  """The workdir's lock for the block, taken by process 0 for every process of the run.

  The other processes wait for process 0's verdict, and stop with it if the
  workdir is busy.
  """
  lock = workdir_lib.WorkdirLock(workdir)
  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except workdir_lib.WorkdirBusyError as e:
      error = e
  if jax.process_count() > 1:
    held = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not held and error is None:
      error = workdir_lib.WorkdirBusyError(
          f'{workdir} is in use by another run (process 0 could not lock it); wait for '
          'it to end, or pass another --workdir')
  if error is not None:
    raise error
  try:
    yield
  finally:
    lock.release()


def check_resume_config(config, workdir: str, allow_change: bool) -> None:
  """Refuses to resume a run with settings that change its computation.

  Settings that do not (logging, evaluation, checkpoint cadence, length) are
  allowed and printed; `write_config` keeps the saved config as config.N.json.
  """
  saved = checkpointing.read_json(os.path.join(workdir, 'config.json'))
  if saved is None:
    return
  blocking, free = config_lib.resume_changes(saved, json.loads(config.to_json_best_effort()))
  if blocking and not allow_change:
    raise ValueError(
        f'Bad config: {workdir} holds a run whose config differs in settings that change '
        f'the computation:\n{config_lib.format_changes(blocking)}\nRe-run with the saved '
        f'values ({os.path.join(workdir, "config.json")}), pass another --workdir, or pass '
        '--allow_config_change to resume with the new values.')
  if (blocking or free) and jax.process_index() == 0:
    print('Resuming with changed settings (the saved config is kept as config.N.json):\n'
          + config_lib.format_changes(blocking + free))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False) -> dict:
  """Trains, evaluates and checkpoints in `workdir`; re-running resumes.

  Returns the final results (also written to `workdir/results.json`), or the
  partial results with `'stopped_by'` set when a signal ended the run early.
  The workdir is locked for the run. A resumed run must have the saved
  config's settings wherever they change the computation, unless
  `allow_config_change`.
  """
  backend.set_deterministic(config.deterministic)
  devices = select_devices(config)  # this process's: they take its data
  num_devices = len(devices)
  all_devices = global_devices(num_devices)  # what the pmaps span
  config_lib.validate(config, len(all_devices))
  ops = backend.select_ops(config.conv_impl, config.dtype)
  os.makedirs(workdir, exist_ok=True)
  with hold_workdir(workdir):
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                      keep=config.keep_checkpoints)
    try:
      if ckpt.latest_step() is not None:
        check_resume_config(config, workdir, allow_config_change)
      return _train(config, workdir, devices, all_devices, ops, ckpt)
    finally:
      ckpt.close()


def _train(config, workdir: str, devices: list, all_devices: list, ops,
           ckpt: checkpointing.Checkpointer) -> dict:
  """The body of `train_and_evaluate`, with the workdir held."""
  num_devices = len(devices)
  local_batch = config.global_batch_size // jax.process_count()
  eval_local_batch = config.eval_batch_size // jax.process_count()
  data = data_lib.create_data(config, local_batch=local_batch,
                              eval_local_batch=eval_local_batch)
  steps_per_epoch = data.steps_per_epoch
  total_steps = config.num_epochs * steps_per_epoch
  if config.max_train_steps:
    total_steps = min(total_steps, config.max_train_steps)
  eval_every = max(1, round(config.eval_every_epochs * steps_per_epoch))

  model = model_lib.create_model(config, ops)
  tx = optim.create_optimizer(config.optimizer)
  schedule = optim.create_schedule(
      config.schedule, config.schedule.base_lr,
      steps_per_epoch, config.num_epochs * steps_per_epoch)
  state = create_train_state(config, model, tx)

  restored = ckpt.restore_latest(state)
  host_state = {}
  if restored is not None:
    state, host_state = restored
  chief = jax.process_index() == 0  # the only process that writes outputs
  if chief:
    if restored is not None:
      print(f'Resuming from the checkpoint at step {int(state.step)} in {workdir}')
    checkpointing.write_config(config, workdir)
    provenance.write(workdir, provenance.collect(config, backend.describe(ops, primitives=False)))
  plateau = Plateau(config.schedule, host_state.get('plateau'))
  prior_elapsed = float(host_state.get('elapsed_sec', 0.0))
  start_step = int(state.step)
  if start_step >= total_steps:
    results = checkpointing.read_json(os.path.join(workdir, 'results.json'))
    logging.info('%s already holds a finished run (step %d of %d); nothing to do.',
                 workdir, start_step, total_steps)
    if results:
      return results

  writer = metric_writers.MetricWriter(workdir, enabled=chief, after_step=start_step)
  if config.model_parallel == 2 and num_devices % 2:
    raise ValueError(
        f'Bad config: model_parallel=2 with {num_devices} device(s) per process; '
        'the two towers of a data replica must be devices of the same process. '
        'Give every process an even number of devices (launch/local.py '
        '--devices_per_process=2; under SLURM one task per node, see '
        'launch/slurm.sbatch)')
  # Tower pairs never straddle processes: `all_devices` lists each process's
  # devices together, an even number of them.
  layout = parallel.Layout(len(all_devices), towers=config.model_parallel)
  local_layout = parallel.Layout(num_devices, towers=config.model_parallel)
  p_train_step, p_eval_step = make_steps(model, layout, tx, schedule, config.seed,
                                         all_devices)
  state = parallel.state_to_devices(state, local_layout, devices)
  shard_fn = lambda b: parallel.shard_batch(b, local_layout)
  to_host = lambda s: parallel.state_from_devices(s, local_layout)

  def save(step_state):
    ckpt.save(to_host(step_state),
              {'plateau': plateau.state(),
               'elapsed_sec': prior_elapsed + time.time() - t_start})

  def run_eval(step_state, step):
    t0 = time.time()
    crops = config.dataset.eval_crops
    if step < total_steps and config.dataset.interim_eval_crops:
      crops = config.dataset.interim_eval_crops
    result = evaluate(p_eval_step, step_state.params, data.eval(crops), shard_fn,
                      config.max_eval_batches)
    result['eval_crops'] = 10 if crops == 'ten' else 1
    result['epoch'] = step / steps_per_epoch
    writer.write(step, result)
    logging.info('step %d: %s (%.1fs)', step, result, time.time() - t0)
    return result, time.time() - t0

  train_iter = (shard_fn(b) for b in data.train(start_step).as_numpy_iterator())
  train_iter = flax.jax_utils.prefetch_to_device(train_iter, 2, devices)

  progress = metric_writers.Progress(total_steps, start_step, bar=config.progress_bar,
                                     chief=chief)
  agree_to_stop = StopAgreement(all_devices, num_devices)
  history, last_eval, stopped_by = [], None, None
  compile_s, excluded_s, t_start = 0.0, 0.0, time.time()
  step = start_step
  with StopSignal() as stop:
    while step < total_steps:
      batch = next(train_iter)
      if step == start_step:
        t0 = time.time()
        state, metrics = p_train_step(state, batch)
        jax.block_until_ready(metrics)
        compile_s = time.time() - t0
        progress.note(f'compile + first step: {compile_s:.1f}s')
      else:
        state, metrics = p_train_step(state, batch)
      history.append(metrics)
      step += 1
      progress.update(step)
      stopped_by = agree_to_stop(stop.received)

      # On a stop signal the steps since the last log are logged before the save.
      if step % config.log_every_steps == 0 or step == total_steps or stopped_by:
        summary = _host_metrics(history)
        history = []
        if not np.isfinite(summary['train_loss']):
          raise NonFiniteLossError(
              f'Training loss is {summary["train_loss"]} at step {step}. Nothing '
              f'was saved from the diverged state; the last good checkpoint in '
              f'{workdir}/checkpoints is intact. Lower --config.schedule.base_lr '
              f'(now {config.schedule.base_lr}) or check the input data.')
        elapsed = time.time() - t_start - compile_s - excluded_s
        done = step - start_step - 1
        summary['train_images_per_sec'] = (done * config.global_batch_size / elapsed
                                           if done > 0 and elapsed > 0 else 0.0)
        writer.write(step, summary)
        progress.set_postfix(loss=summary['train_loss'], lr=summary['lr'])

      t_pause = time.time()
      if step % eval_every == 0 or step == total_steps:
        last_eval, _ = run_eval(state, step)
        progress.note(f'step {step}: top-1 error {last_eval["eval_top1_error"]:.4f}, '
                      f'top-5 error {last_eval["eval_top5_error"]:.4f} '
                      f'({last_eval["eval_examples"]} examples, '
                      f'{last_eval["eval_crops"]} crop(s) each)')
        if plateau.update(last_eval['eval_top1_error']):
          new_scale = float(config.schedule.factor ** plateau.reductions)
          state = state.replace(lr_scale=flax.jax_utils.replicate(
              jnp.float32(new_scale), devices))
          progress.note(f'validation error stopped improving: lr x{new_scale:g}')
      if (step % config.checkpoint_every_steps == 0 or step == total_steps
          or stopped_by):
        save(state)
      excluded_s += time.time() - t_pause
      if stopped_by:
        progress.note(f'{stopped_by} received: checkpoint saved at step {step}; '
                      'run the same command again to resume.')
        break
  progress.close()
  ckpt.wait()

  wall = time.time() - t_start
  trained = step - start_step
  train_s = wall - compile_s - excluded_s
  results = {
      'step': step,
      'total_steps': total_steps,
      'wall_time_sec': wall,
      'wall_time_total_sec': prior_elapsed + wall,  # all resumed segments
      'compile_sec': compile_s,
      'train_images_per_sec': (max(trained - 1, 0) * config.global_batch_size / train_s
                               if train_s > 0 else 0.0),
      'num_devices': len(all_devices),
      'model_parallel': config.model_parallel,
      'evaluated_prefix_only': bool(config.max_eval_batches),
  }
  if last_eval is not None:
    results.update({k: last_eval[k] for k in
                    ('eval_top1_error', 'eval_top5_error', 'eval_loss', 'eval_examples',
                     'eval_crops')})
  if stopped_by:
    results['stopped_by'] = stopped_by
  elif chief:
    checkpointing.write_json(os.path.join(workdir, 'results.json'), results)
    metric_writers.plot_curves(workdir)
  writer.close()
  return results
