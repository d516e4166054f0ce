"""The paper's Figures 3 and 4 for a trained network.

  python -m alexnet_jax.tools.figures --workdir=DIR --out=OUT [--queries=5]
      [--neighbours=6] [--max_train=N]

Figure 3 (OUT/figure3.png, OUT/figure3.json): the conv1 kernels, tower by
tower (the paper's 48 kernels of GPU 1 above the 48 of GPU 2), each rescaled
to the full display range. The paper observes that the kernels of one GPU
are largely colour-agnostic and those of the other colour-specific; the
colour score measures it: of each kernel's energy (sum of squared weights),
the fraction off the grey axis, i.e. not along (1, 1, 1) / sqrt(3) in every
pixel's RGB vector, averaged over a tower's kernels. 0 is a kernel of greys,
2/3 one of a single primary colour. A grey (one-channel) network has no
score.

Figure 4 (OUT/figure4.png, OUT/figure4.json): for the first --queries images
of the eval split, the top-5 predictions as bars, and the training images
whose last hidden layer (fc7, after its ReLU) is nearest in Euclidean
distance, a row per query. Every input is the centre crop as evaluation
prepares it; the training set is scanned in batches keeping a running
top-k per query (`Nearest`), so no more than one batch of fc7 vectors is
held. Images are shown as stored (the inputs with their normalisation
undone), not as the network sees them.
"""

from __future__ import annotations

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

# pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app
from absl import flags
from absl import logging
from matplotlib.figure import Figure
import numpy as np
import tqdm

from alexnet_jax import backend
from alexnet_jax import checkpointing
from alexnet_jax import cli
from alexnet_jax import data
from alexnet_jax import inference
# pylint: enable=g-import-not-at-top,wrong-import-position


def define_flags():
  """Command-line flags; defined on running, so importing this module defines none."""
  flags.DEFINE_string('workdir', None, 'Workdir of a training run (config.json, checkpoints/).')
  flags.DEFINE_string('out', None, 'Folder for figure3.png/.json and figure4.png/.json.')
  flags.DEFINE_integer('queries', 5, 'Figure 4: query images, the first of the eval split.')
  flags.DEFINE_integer('neighbours', 6, 'Figure 4: nearest training images per query.')
  flags.DEFINE_integer('max_train', 0, 'Figure 4: scan the first N training images only '
                       '(0 = all).')
  flags.DEFINE_integer('batch_size', 0, 'Images per forward pass; 0 = dataset.eval_batch_size.')


# ---------------------------------------------------------------- Figure 3


def colour_scores(kernel_HWCF: np.ndarray) -> np.ndarray | None:
  """Per kernel, the fraction of its energy off the grey axis; None for grey input.

  kernel (h, w, 3, kernels). Each pixel's RGB vector v splits into its
  projection on u = (1, 1, 1) / sqrt(3) and the rest: score = sum |v - (v.u)u|^2
  / sum |v|^2 over the kernel's pixels (0 for a kernel of zeros).
  """
  if kernel_HWCF.shape[2] != 3:
    return None
  w = np.asarray(kernel_HWCF, np.float64).reshape(-1, 3, kernel_HWCF.shape[3])
  total = np.sum(w**2, axis=(0, 1))
  on_axis = np.sum((w.sum(axis=1) / np.sqrt(3.0))**2, axis=0)
  return np.divide(total - on_axis, total, out=np.zeros_like(total), where=total > 0)


def tower_scores(kernel_HWCF: np.ndarray, towers: int) -> list[float] | None:
  """The mean colour score of each tower's kernels (tower t: the t-th block of outputs)."""
  scores = colour_scores(kernel_HWCF)
  if scores is None:
    return None
  return [float(s.mean()) for s in np.split(scores, towers)]


def kernel_grid(kernel_HWCF: np.ndarray, towers: int, columns: int = 16) -> np.ndarray:
  """The kernels as one image: tower 0's rows above tower 1's, each kernel in [0, 1].

  (towers * rows * (h + 1) + gaps, columns * (w + 1), C): a white band half a
  kernel high separates the towers, a white line the kernels.
  """
  h, w, c, n = kernel_HWCF.shape
  per_tower = n // towers
  columns = min(columns, per_tower)
  rows = -(-per_tower // columns)
  gap = max(2, h // 2)
  tower_height = rows * (h + 1)
  grid = np.ones((towers * tower_height + (towers - 1) * gap, columns * (w + 1), c))
  for i in range(n):
    k = np.asarray(kernel_HWCF[..., i], np.float64)
    lo, hi = k.min(), k.max()
    k = (k - lo) / (hi - lo) if hi > lo else np.full_like(k, 0.5)
    t, j = divmod(i, per_tower)
    r, col = divmod(j, columns)
    top = t * (tower_height + gap) + r * (h + 1)
    grid[top:top + h, col * (w + 1):col * (w + 1) + w] = k
  return grid


def figure3(network: inference.Network, out: str) -> dict:
  """Draws OUT/figure3.png, writes OUT/figure3.json; returns the JSON's content."""
  kernel = np.asarray(network.params['conv1']['kernel'])
  if network.config.dataset.channel_order == 'bgr':
    kernel = kernel[:, :, ::-1]  # shown, and scored, as RGB
  towers = network.config.model.towers
  scores = tower_scores(kernel, towers)
  grid = kernel_grid(kernel, towers)
  fig = Figure(figsize=(8, 8 * grid.shape[0] / grid.shape[1] + 0.8))
  ax = fig.add_subplot()
  if grid.shape[2] == 1:
    ax.imshow(grid[..., 0], cmap='gray', interpolation='nearest')
  else:
    ax.imshow(grid, interpolation='nearest')
  ax.set_axis_off()
  score_text = ('colour score undefined (grey input)' if scores is None else
                ', '.join(f'tower {t}: {s:.3f}' for t, s in enumerate(scores)))
  ax.set_title(f'conv1 kernels, {kernel.shape[3] // towers} per tower (tower 0 above); '
               f'{score_text}', fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(out, 'figure3.png'), dpi=150)
  result = {
      'workdir': os.path.abspath(network.workdir), 'step': network.step,
      'kernels': int(kernel.shape[3]), 'kernel_shape': list(kernel.shape[:3]),
      'towers': [{'tower': t, 'kernels': int(kernel.shape[3] // towers),
                  'colour_score': None if scores is None else scores[t]}
                 for t in range(towers)],
      'colour_score': ('fraction of each kernel\'s energy off the grey axis (1,1,1)/sqrt(3), '
                       'mean over the tower; undefined (null) for grey input'),
  }
  checkpointing.write_json(os.path.join(out, 'figure3.json'), result)
  return result


# ---------------------------------------------------------------- Figure 4


class Nearest:
  """A running top-k, per query vector, of the nearest vectors seen, by Euclidean distance.

  Vectors come in chunks with their indices, a mask (0: not a candidate) and
  payloads (arrays with a row per vector) of which the k nearest rows are
  kept. Ties go to the earlier index. After the updates: `distances`,
  `indices` (queries, k) and `kept[name]` (queries, k, ...), nearest first.
  """

  def __init__(self, queries: np.ndarray, k: int):
    self.queries = np.asarray(queries, np.float64)
    self.k = k
    self.distances = np.zeros((len(self.queries), 0))
    self.indices = np.zeros((len(self.queries), 0), np.int64)
    self.kept: dict[str, np.ndarray] = {}

  def update(self, vectors: np.ndarray, indices: np.ndarray, mask: np.ndarray,
             **payloads: np.ndarray) -> None:
    x = np.asarray(vectors, np.float64)
    squared = (np.sum(self.queries**2, 1)[:, None] + np.sum(x**2, 1)[None, :]
               - 2.0 * self.queries @ x.T)
    d = np.sqrt(np.maximum(squared, 0.0))
    d[:, np.asarray(mask) == 0] = np.inf
    q, n = d.shape
    held = self.distances.shape[1]
    distances = np.concatenate([self.distances, d], 1)
    candidates = np.concatenate([self.indices, np.broadcast_to(indices, (q, n))], 1)
    order = np.lexsort((candidates, distances), axis=1)[:, :self.k]
    # Masked vectors never count; every query has the same number of others.
    order = order[:, :int(np.isfinite(np.take_along_axis(distances, order, 1)).sum(1).min())]
    self.distances = np.take_along_axis(distances, order, 1)
    self.indices = np.take_along_axis(candidates, order, 1)
    for name, new in payloads.items():
      old = self.kept.get(name, np.zeros((q, 0) + new.shape[1:], new.dtype))
      self.kept[name] = np.array(
          [[old[i, j] if j < held else new[j - held] for j in row] for i, row in enumerate(order)],
          new.dtype).reshape(order.shape + new.shape[1:])


def figure4(network: inference.Network, out: str, *, queries: int = 5, neighbours: int = 6,
            max_train: int = 0, batch_size: int = 0, progress: bool = True) -> dict:
  """Draws OUT/figure4.png, writes OUT/figure4.json; returns the JSON's content."""
  config = network.config
  batch_size = batch_size or config.eval_batch_size
  stats = network.stats
  chosen = {'image': [], 'label': [], 'index': []}
  for batch in inference.eval_batches(config, config.dataset.eval_split, 'center',
                                      batch_size)[0]:
    for key in chosen:
      chosen[key] += list(batch[key][batch['mask'] > 0])
    if len(chosen['index']) >= queries:
      break
  images = np.stack(chosen['image'][:queries])
  labels, indices = chosen['label'][:queries], chosen['index'][:queries]
  query = network.apply(images, features=True, batch_size=batch_size)
  nearest = Nearest(query['features'], neighbours)
  train_batches, total = inference.eval_batches(config, config.dataset.train_split, 'center',
                                                batch_size, max_train)
  with tqdm.tqdm(total=total, unit='image', desc=f'fc7 of {config.dataset.train_split}',
                 disable=not progress, leave=False) as bar:
    for batch in train_batches:
      features = np.asarray(network(batch['image'], features=True)['features'])
      nearest.update(features, batch['index'], batch['mask'], label=batch['label'],
                     pixels=data.pixels(config, batch['image'], stats))
      bar.update(int(min(len(batch['mask']), total - bar.n)))
  names = network.class_names
  result = {
      'workdir': os.path.abspath(network.workdir), 'step': network.step,
      'eval_split': config.dataset.eval_split, 'train_split': config.dataset.train_split,
      'train_images_scanned': total, 'features': inference.hidden_layer(network.model),
      'queries': [{
          'index': int(indices[q]), 'label': int(labels[q]), 'name': names[labels[q]],
          'top5': inference.top_k(query['probs'][q], names),
          'neighbours': [{'index': int(i), 'label': int(l), 'distance': float(d)}
                         for i, l, d in zip(nearest.indices[q], nearest.kept['label'][q],
                                            nearest.distances[q])],
      } for q in range(len(indices))],
  }
  query_pixels = data.pixels(config, images, stats)
  neighbour_pixels = nearest.kept.get(
      'pixels', np.zeros((len(images), 0) + query_pixels.shape[1:], np.uint8))
  _draw_figure4(result, query_pixels, neighbour_pixels,
                os.path.join(out, 'figure4.png'))
  checkpointing.write_json(os.path.join(out, 'figure4.json'), result)
  return result


def _short(name: str) -> str:
  return name.split(',')[0][:18]


def _show(ax, image: np.ndarray, title: str, colour: str = 'black') -> None:
  ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap='gray',
            interpolation='nearest')
  ax.set_title(title, fontsize=7, color=colour)
  ax.set_axis_off()


def _draw_figure4(result: dict, query_pixels: np.ndarray, neighbour_pixels: np.ndarray,
                  path: str) -> None:
  rows = result['queries']
  k = neighbour_pixels.shape[1]
  fig = Figure(figsize=(1.3 * (k + 3), 1.4 * len(rows) + 0.4))
  grid = fig.add_gridspec(len(rows), k + 3)
  for r, row in enumerate(rows):
    _show(fig.add_subplot(grid[r, 0]), query_pixels[r], f'test {row["index"]}: '
          f'{_short(row["name"])}')
    bars = fig.add_subplot(grid[r, 1:3])
    top5 = row['top5'][::-1]
    bars.barh(range(len(top5)), [p for _, _, p in top5],
              color=['tab:red' if i == row['label'] else 'tab:blue' for i, _, _ in top5])
    bars.set_yticks(range(len(top5)), [_short(n) for _, n, _ in top5], fontsize=6)
    bars.set_xlim(0, 1)
    bars.tick_params(axis='x', labelsize=6)
    for j in range(k):
      ax = fig.add_subplot(grid[r, 3 + j])
      n = row['neighbours'][j]
      same = n['label'] == row['label']
      _show(ax, neighbour_pixels[r, j], f'{n["distance"]:.3g}',
            'black' if same else 'tab:red')
  fig.suptitle(f'Top-5 (true class red) and the nearest training images in '
               f'{result["features"]} (distance; red: another class)', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS.workdir or not flags.FLAGS.out:
    raise app.UsageError('--workdir (a training run) and --out (a folder) are required')
  for name, lowest in (('queries', 1), ('neighbours', 1), ('max_train', 0), ('batch_size', 0)):
    if flags.FLAGS[name].value < lowest:
      raise ValueError(f'--{name}={flags.FLAGS[name].value} must be >= {lowest}')
  data.configure_tensorflow()
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # Orbax and tfds are chatty at INFO
  network = inference.load(flags.FLAGS.workdir)
  cli.check_workdir(flags.FLAGS.out)
  fig3 = figure3(network, flags.FLAGS.out)
  for tower in fig3['towers']:
    score = tower['colour_score']
    print(f'tower {tower["tower"]}: colour score '
          f'{"N/A (grey input)" if score is None else f"{score:.4f}"} '
          f'({tower["kernels"]} conv1 kernels)')
  fig4 = figure4(network, flags.FLAGS.out, queries=flags.FLAGS.queries,
                 neighbours=flags.FLAGS.neighbours, max_train=flags.FLAGS.max_train,
                 batch_size=flags.FLAGS.batch_size)
  print(f'Figure 4: {len(fig4["queries"])} queries, nearest of '
        f'{fig4["train_images_scanned"]} training images in {fig4["features"]}')
  names = ('figure3.png', 'figure3.json', 'figure4.png', 'figure4.json')
  print(f'Wrote {", ".join(os.path.join(flags.FLAGS.out, n) for n in names)}')


if __name__ == '__main__':
  backend.configure_process()  # XLA reads XLA_FLAGS once, before a backend starts
  define_flags()
  cli.run(main)
