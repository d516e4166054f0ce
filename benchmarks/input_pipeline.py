"""Input speed: the tf.data training pipeline against bare decoding and PIL.

  python -m benchmarks.input_pipeline [--out=benchmarks_out/input_pipeline.json]

(from the repository's root, or with it on PYTHONPATH).

Makes ImageNet-like JPEGs (500x375 or 375x500, quality 90, cut from real
photos) and their prescaled copies (256x256 squares, quality 90, made by
`imagenet_squares.square_jpeg` as the one-off copy of the dataset is), and
measures in one process:
  tf_pipeline           `imagenet.train_batches` as configs/paper.py runs it,
                        on the squares: decode of a random 227 window, mean
                        image, flip, PCA lighting, the unreadable-image
                        bookkeeping, batches of 64;
  tf_decode             `tf.io.decode_jpeg` of the whole original, nothing else;
  pil_numpy             tf_pipeline's operations with PIL and numpy, on the squares;
  tf_pipeline_original  the pipeline with dataset.prescaled=False, on the
                        originals: decode of the window of the central square
                        under a random 227 crop of its 256 rescale, rescale,
                        then as tf_pipeline;
  tf_decode_squares     bare decode of the squares;
  pil_numpy_original    tf_pipeline_original's operations with PIL and numpy
                        (PIL decodes the whole image, and its bilinear filter
                        widens when shrinking, which TF's does not);
  tf_make_squares       the one-off conversion, per image: decode, rescale,
                        encode (reported also spread over --epochs).
Per core: every variant runs on one thread (tf.data with a private pool of one
thread and no intra-op parallelism; PIL and numpy in the calling thread), and
rates are images per CPU-second of this process, so other jobs on the machine
do not lower them. The median of --rounds interleaved rounds is reported.
Targets: tf_pipeline >= 1.3x pil_numpy and >= 0.8x tf_decode.
"""

from __future__ import annotations

import io
import os
import platform
import statistics
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import numpy as np
import PIL
from PIL import Image
import skimage.data
from sklearn.datasets import load_sample_images
import tensorflow as tf

from alexnet_jax import cli
from alexnet_jax import config_lib
from alexnet_jax.data import imagenet
from alexnet_jax.data import imagenet_squares
import benchmarks
# pylint: enable=g-import-not-at-top,wrong-import-position


def define_flags():
  """Command-line flags; defined on running, so importing this module defines none."""
  flags.DEFINE_string('out', 'benchmarks_out/input_pipeline.json', 'JSON results file.')
  flags.DEFINE_integer('num_jpegs', 96, 'Distinct JPEGs made.')
  flags.DEFINE_integer('images', 1280, 'Images per measurement (a multiple of 64).')
  flags.DEFINE_integer('rounds', 5, 'Interleaved rounds; the median is reported.')
  flags.DEFINE_integer('epochs', 90, 'Epochs over which the one-off copy is amortised.')

BATCH = 64
RESIZE, CROP = 256, 227
QUALITY = 90  # of the prescaled squares, as config_lib's default


def make_jpegs(n: int, seed: int = 0) -> list[bytes]:
  """ImageNet-like JPEGs: random 4:3 / 3:4 cuts of real photos, 500x375, q90."""
  photos = [getattr(skimage.data, name)() for name in
            ('astronaut', 'chelsea', 'coffee', 'rocket', 'immunohistochemistry')]
  photos += list(load_sample_images().images)
  rs = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    photo = photos[rs.randint(len(photos))]
    size = (500, 375) if rs.rand() < 0.75 else (375, 500)  # (width, height)
    h, w = photo.shape[:2]
    scale = rs.uniform(0.7, 1.0) * min(w / size[0], h / size[1])
    cw, ch = int(size[0] * scale), int(size[1] * scale)
    left, top = rs.randint(w - cw + 1), rs.randint(h - ch + 1)
    image = Image.fromarray(photo).resize(size, Image.BICUBIC,
                                          box=(left, top, left + cw, top + ch))
    buffer = io.BytesIO()
    image.save(buffer, 'JPEG', quality=90)
    out.append(buffer.getvalue())
  return out


def _stats():
  c = config_lib.base_config().dataset
  # A smooth, non-constant mean image, so subtracting it costs what a real one does.
  ramp = np.linspace(100, 140, RESIZE, dtype=np.float32)
  mean = np.stack([ramp[:, None] + ramp[None, :] * 0.1] * 3, -1)
  return imagenet.Stats(mean, np.asarray(c.pca_eigval, np.float32),
                        np.asarray(c.pca_eigvec, np.float32))


def _one_thread(ds):
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def _squares(jpegs: list[bytes]) -> list[bytes]:
  """The prescaled copies of `jpegs`, as `imagenet_squares` writes them."""
  return [imagenet_squares.square_jpeg(j, RESIZE, QUALITY).numpy() for j in jpegs]


def tf_pipeline(jpegs: list[bytes], n: int, *, prescaled: bool):
  """The training pipeline over `n` images; returns a function that runs it."""
  config = config_lib.base_config()
  config.dataset.prescaled = prescaled
  stats = _stats()
  examples = tf.data.Dataset.zip({
      'position': tf.data.Dataset.range(n),
      'jpeg': tf.data.Dataset.from_tensor_slices(jpegs).repeat(),
      'label': tf.data.Dataset.from_tensors(tf.constant(0, tf.int32)).repeat()})
  ds = _one_thread(imagenet.train_batches(examples, config, stats,
                                          local_batch=BATCH, per_epoch=n))
  return lambda: sum(1 for _ in ds)


def _tf_map(jpegs: list[bytes], n: int, fn):
  """fn over `n` JPEGs on one thread; one pixel per image leaves the graph."""
  ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat().take(n)
  ds = ds.map(lambda j: tf.reshape(fn(j), [-1])[0],
              num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH)
  ds = _one_thread(ds.prefetch(tf.data.AUTOTUNE))
  return lambda: sum(1 for _ in ds)


def tf_decode(jpegs: list[bytes], n: int):
  """Bare `decode_jpeg` of `n` images (reduced in-graph, batched like the pipeline)."""
  return _tf_map(jpegs, n, lambda j: tf.io.decode_jpeg(j, channels=3))


def tf_make_squares(jpegs: list[bytes], n: int):
  """The one-off conversion of `imagenet_squares`: decode, rescale, encode."""
  return _tf_map(jpegs, n, lambda j: imagenet_squares.square_jpeg(j, RESIZE, QUALITY))


def pil_numpy(jpegs: list[bytes], n: int, *, prescaled: bool):
  """The pipeline's operations with PIL and numpy, batched like it."""
  stats = _stats()
  rs = np.random.RandomState(0)

  def window(image):
    if prescaled:  # as `imagenet.random_crop`: a crop of the stored square
      r, c = rs.randint(0, RESIZE - CROP + 1, 2)
      return image.crop((c, r, c + CROP, r + CROP)), r, c
    w, h = image.size
    side = min(w, h)
    # As `imagenet.random_crop_resize`: the window of the central square that
    # a 227 crop of its 256 rescale covers, rescaled straight to 227.
    size = round(side * CROP / RESIZE)
    dy, dx = rs.randint(0, side - size + 1, 2)
    top, left = (h - side) // 2 + dy, (w - side) // 2 + dx
    image = image.resize((CROP, CROP), Image.BILINEAR,
                         box=(left, top, left + size, top + size))
    r, c = np.minimum(np.round(np.array([dy, dx]) * RESIZE / side).astype(int),
                      RESIZE - CROP)
    return image, r, c

  def one(data):
    image, r, c = window(Image.open(io.BytesIO(data)).convert('RGB'))
    x = np.asarray(image, np.float32) - stats.mean[r:r + CROP, c:c + CROP]
    if rs.rand() < 0.5:
      x = x[:, ::-1]
    return x + 255.0 * stats.eigvec @ (rs.normal(0.0, 0.1, 3) * stats.eigval)

  def run():
    for start in range(0, n, BATCH):
      np.stack([one(jpegs[i % len(jpegs)]) for i in range(start, start + BATCH)])
  return run


def _measure(run, n: int) -> dict[str, float]:
  wall0, cpu0 = time.perf_counter(), sum(os.times()[:2])
  run()
  wall, cpu = time.perf_counter() - wall0, sum(os.times()[:2]) - cpu0
  return {'images_per_cpu_sec': n / cpu, 'images_per_sec': n / wall,
          'cpu_sec': cpu, 'wall_sec': wall}


def run_benchmark(num_jpegs: int, images: int, rounds: int, epochs: int) -> dict:
  """All variants, interleaved over `rounds`; medians and target checks."""
  tf.config.set_visible_devices([], 'GPU')
  jpegs = make_jpegs(num_jpegs)
  squares = _squares(jpegs)
  runners = {
      'tf_pipeline': tf_pipeline(squares, images, prescaled=True),
      'tf_decode': tf_decode(jpegs, images),
      'pil_numpy': pil_numpy(squares, images, prescaled=True),
      'tf_pipeline_original': tf_pipeline(jpegs, images, prescaled=False),
      'tf_decode_squares': tf_decode(squares, images),
      'pil_numpy_original': pil_numpy(jpegs, images, prescaled=False),
      'tf_make_squares': tf_make_squares(jpegs, images),
  }
  for run in runners.values():  # warm-up: tracing, caches
    run()
  samples = {name: [] for name in runners}
  for _ in range(rounds):
    for name, run in runners.items():
      samples[name].append(_measure(run, images))
  rates = {name: statistics.median(s['images_per_cpu_sec'] for s in runs)
           for name, runs in samples.items()}
  vs_pil = rates['tf_pipeline'] / rates['pil_numpy']
  vs_decode = rates['tf_pipeline'] / rates['tf_decode']
  # CPU time per image per epoch when the one-off copy is spread over `epochs`.
  amortised = 1.0 / (1.0 / rates['tf_pipeline'] + 1.0 / (epochs * rates['tf_make_squares']))
  return {
      'images_per_cpu_sec': rates,
      'tf_pipeline_vs_pil_numpy': vs_pil,
      'tf_pipeline_vs_tf_decode': vs_decode,
      'also': {
          'tf_pipeline_vs_tf_decode_squares': rates['tf_pipeline'] / rates['tf_decode_squares'],
          'tf_pipeline_original_vs_tf_decode':
              rates['tf_pipeline_original'] / rates['tf_decode'],
          'tf_pipeline_original_vs_pil_numpy_original':
              rates['tf_pipeline_original'] / rates['pil_numpy_original'],
          f'tf_pipeline_with_copy_over_{epochs}_epochs': amortised,
          f'tf_pipeline_with_copy_over_{epochs}_epochs_vs_tf_decode':
              amortised / rates['tf_decode'],
      },
      'targets': {'tf_pipeline >= 1.3x pil_numpy': vs_pil >= 1.3,
                  'tf_pipeline >= 0.8x tf_decode': vs_decode >= 0.8},
      'per_core': 'each variant on one thread; rate = images / process CPU seconds',
      'samples': samples,
      'setup': {'jpegs': num_jpegs, 'jpeg_size': '500x375 (3 in 4) or 375x500',
                'jpeg_quality': 90, 'squares': f'{RESIZE}x{RESIZE}, quality {QUALITY}',
                'images_per_measurement': images, 'rounds': rounds, 'batch': BATCH,
                'resize': RESIZE, 'crop': CROP, 'epochs_for_amortising': epochs},
      'versions': {'tensorflow': tf.__version__, 'pillow': PIL.__version__,
                   'numpy': np.__version__, 'python': platform.python_version()},
      'machine': {'cpus': os.cpu_count(), 'processor': platform.processor()},
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  if f.images % BATCH:
    raise app.UsageError(f'--images must be a multiple of {BATCH}')
  result = run_benchmark(f.num_jpegs, f.images, f.rounds, f.epochs)
  for name, rate in result['images_per_cpu_sec'].items():
    print(f'{name:22s} {rate:8.1f} images per CPU-second')
  print(f'tf_pipeline / pil_numpy = {result["tf_pipeline_vs_pil_numpy"]:.2f} (target >= 1.3)')
  print(f'tf_pipeline / tf_decode = {result["tf_pipeline_vs_tf_decode"]:.2f} (target >= 0.8)')
  for name, value in result['also'].items():
    print(f'{name} = {value:.2f}')
  benchmarks.write_json(result, f.out)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
