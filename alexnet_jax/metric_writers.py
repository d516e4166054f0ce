"""Run outputs: metrics.jsonl, TensorBoard events, a progress bar, plots."""

from __future__ import annotations

import json
import os

import tqdm


class MetricWriter:
  """Appends `{"step": s, ...}` lines to metrics.jsonl and TensorBoard events.

  after_step: the step a resumed run restarts from. Lines of later steps,
  written by the interrupted run after its last checkpoint, are dropped first,
  so that the file never holds a step twice.
  """

  def __init__(self, workdir: str, enabled: bool = True, after_step: int | None = None):
    self.enabled = enabled
    if not enabled:
      return
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._tf = tf
    path = os.path.join(workdir, 'metrics.jsonl')
    if after_step is not None and os.path.exists(path):
      _drop_after(path, after_step)
    self._jsonl = open(path, 'a')
    self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    with self._tb.as_default(step=int(step)):
      for k, v in record.items():
        if k != 'step' and isinstance(v, (int, float)):
          self._tf.summary.scalar(k, v)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _drop_after(path: str, step: int) -> None:
  """Rewrites metrics.jsonl without its lines beyond `step` (atomically)."""
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line)['step'] <= step:
        keep.append(line if line.endswith('\n') else line + '\n')
    except (ValueError, KeyError, TypeError):
      pass  # a line cut short by a crash
  if len(keep) != len(lines):
    with open(path + '.tmp', 'w') as f:
      f.writelines(keep)
    os.replace(path + '.tmp', path)


def _plain(v):
  if hasattr(v, 'item'):
    return v.item()
  return v


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A tqdm bar with ETA; `note` prints above it."""

  def __init__(self, total: int, initial: int, bar: bool = True, chief: bool = True):
    self.enabled = chief
    self.bar = tqdm.tqdm(total=total, initial=initial, unit='step', dynamic_ncols=True,
                         disable=not (bar and chief), smoothing=0.1)

  def update(self, step: int) -> None:
    self.bar.update(step - self.bar.n)

  def set_postfix(self, **kw) -> None:
    self.bar.set_postfix({k: f'{v:.4g}' for k, v in kw.items()}, refresh=False)

  def note(self, text: str) -> None:
    if self.enabled:
      self.bar.write(text) if not self.bar.disable else print(text, flush=True)

  def close(self) -> None:
    self.bar.close()


def plot_curves(workdir: str, filename: str = 'curves.png') -> str | None:
  """Training loss and train/eval error against epoch, saved beside the metrics."""
  records = read_metrics(workdir)
  if not records:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  train = [r for r in records if 'train_loss' in r]
  evals = [r for r in records if 'eval_top1_error' in r]
  fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
  if train:
    ax_loss.plot([r['step'] for r in train], [r['train_loss'] for r in train])
  ax_loss.set(xlabel='step', ylabel='training loss', yscale='log', title='Loss')
  if train:
    ax_err.plot([r['step'] for r in train], [r['train_top1_error'] for r in train],
                label='train top-1 (with dropout, augmented)', alpha=0.6)
  if evals:
    steps = [r['step'] for r in evals]
    ax_err.plot(steps, [r['eval_top1_error'] for r in evals], 'o-', label='eval top-1')
    ax_err.plot(steps, [r['eval_top5_error'] for r in evals], 's-', label='eval top-5')
    last = evals[-1]
    crops = last.get('eval_crops', 1)
    ax_err.set_title(f'Error (final top-1 {last["eval_top1_error"]:.4f} over '
                     f'{last["eval_examples"]} examples, {crops} crop(s))')
  ax_err.set(xlabel='step', ylabel='error', yscale='log')
  ax_err.legend()
  ax_err.grid(True, which='both', alpha=0.3)
  ax_loss.grid(True, which='both', alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, filename)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
