"""ImageNet input: preprocessing ops, the real tfds builder, stats, end to end.

The archives are built in the ILSVRC-2012 layout from real photos shipped with
scikit-image and scikit-learn, a few synsets, so the real `imagenet2012`
builder prepares them in seconds.
"""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
from PIL import Image
import pytest
import skimage.data
from sklearn.datasets import load_sample_images
import tensorflow as tf
import tensorflow_datasets as tfds

from alexnet_jax import config_lib
from alexnet_jax import train
from alexnet_jax.data import common
from alexnet_jax.data import imagenet
from alexnet_jax.data import imagenet_squares
from conftest import REPO, load_config

# The labels of the first validation images in tfds's validation_labels.txt:
# images sorted by name get these synsets, so these are the training synsets.
SYNSETS = ('n01751748', 'n09193705', 'n02105855', 'n04263257')
NUM_VAL = 8  # readable validation images; one corrupt one is added
PER_SYNSET = 6
RESIZE, SIZE = 72, 67


# ------------------------------------------------------------------ data


def _photos():
  photos = [getattr(skimage.data, n)() for n in
            ('astronaut', 'chelsea', 'coffee', 'rocket', 'immunohistochemistry')]
  return photos + list(load_sample_images().images)


def _jpeg(array, quality=90) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, 'JPEG', quality=quality)
  return buffer.getvalue()


def _small_photo(rs, photos):
  """A random crop of a random photo, 80-200 pixels a side, random aspect."""
  photo = photos[rs.randint(len(photos))]
  h, w = photo.shape[:2]
  ch, cw = rs.randint(h // 2, h), rs.randint(w // 2, w)
  top, left = rs.randint(h - ch), rs.randint(w - cw)
  scale = rs.uniform(0.3, 0.45)
  image = Image.fromarray(photo[top:top + ch, left:left + cw])
  return np.asarray(image.resize((int(cw * scale), int(ch * scale)), Image.BILINEAR))


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def make_archives(manual_dir: str) -> dict:
  """ILSVRC2012_img_{train,val}.tar with one corrupt JPEG in each."""
  rs = np.random.RandomState(0)
  photos = _photos()
  os.makedirs(manual_dir, exist_ok=True)
  with tarfile.open(os.path.join(manual_dir, imagenet.TRAIN_TAR), 'w') as outer:
    for k, synset in enumerate(SYNSETS):
      inner_bytes = io.BytesIO()
      with tarfile.open(fileobj=inner_bytes, mode='w') as inner:
        for i in range(PER_SYNSET):
          _add(inner, f'{synset}_{i}.JPEG', _jpeg(_small_photo(rs, photos)))
        if k == 0:  # a greyscale JPEG, as ImageNet has, and a truncated one
          grey = np.asarray(Image.fromarray(skimage.data.camera()).resize((120, 90)))
          _add(inner, f'{synset}_{PER_SYNSET}.JPEG', _jpeg(grey))
          _add(inner, f'{synset}_{PER_SYNSET + 1}.JPEG', _jpeg(_small_photo(rs, photos))[:300])
      _add(outer, f'{synset}.tar', inner_bytes.getvalue())
  with tarfile.open(os.path.join(manual_dir, imagenet.VAL_TAR), 'w') as tar:
    for i in range(1, NUM_VAL + 1):
      _add(tar, f'ILSVRC2012_val_{i:08d}.JPEG', _jpeg(_small_photo(rs, photos)))
    _add(tar, f'ILSVRC2012_val_{NUM_VAL + 1:08d}.JPEG', b'\xff\xd8\xff' + rs.bytes(500))
  return {'num_train': len(SYNSETS) * PER_SYNSET + 2, 'num_val': NUM_VAL + 1}


def tiny_paper_config(root, prescaled=True):
  """The paper's config on the tiny archives, with a small network and images."""
  config = load_config('paper')
  config.dataset.prescaled = prescaled
  config.dataset.data_dir = str(root / 'tfds')
  config.dataset.manual_dir = str(root / 'manual')
  config.dataset.resize_size = RESIZE
  config.dataset.image_size = SIZE  # conv1 11/4 -> 15, pools -> 7 -> 3 -> 1
  config.dataset.shuffle_buffer = 64
  config.model.features = (8, 16, 16, 16, 8)
  config.model.fc_features = (32, 32)
  config.global_batch_size = 8
  config.eval_batch_size = 8
  config.log_every_steps = 2
  config.checkpoint_every_steps = 100
  config.progress_bar = False
  return config


@pytest.fixture(scope='session')
def imagenet_root(tmp_path_factory):
  """Archives in a manual dir, prepared by the real builder, squares, stats by the CLI."""
  root = tmp_path_factory.mktemp('imagenet')
  counts = make_archives(str(root / 'manual'))
  original = imagenet.prepare(tiny_paper_config(root, prescaled=False))
  assert original.info.splits['train'].num_examples == counts['num_train']
  assert original.info.splits['validation'].num_examples == counts['num_val']
  squares = imagenet.prepare(tiny_paper_config(root))  # the corrupt ones are left out
  assert squares.info.splits['train'].num_examples == counts['num_train'] - 1
  assert squares.info.splits['validation'].num_examples == counts['num_val'] - 1
  for prescaled, unreadable in ((False, 1), (True, 0)):
    config = tiny_paper_config(root)
    run = subprocess.run(
        [sys.executable, '-m', 'alexnet_jax.tools.dataset_stats', '--config=configs/paper.py',
         f'--config.dataset.data_dir={config.dataset.data_dir}',
         f'--config.dataset.manual_dir={config.dataset.manual_dir}',
         f'--config.dataset.prescaled={prescaled}',
         f'--config.dataset.resize_size={RESIZE}', '--batch_size=5'],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert f'{counts["num_train"] - 1} images ({unreadable} unreadable, skipped)' in run.stdout, \
        run.stdout
  return root


def _train_jpegs(config, split='train'):
  """(file name, JPEG bytes, label) of a split of the dataset that `config` reads."""
  builder = imagenet.prepare(config)
  ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  return [(ex['file_name'].decode(), ex['image'], int(ex['label']))
          for ex in tfds.as_numpy(ds)]


# ------------------------------------------------------------------ ops


def _run(fn, *args, in_tf_data):
  """fn(*args) eagerly, or as the map function of a one-element tf.data pipeline."""
  return _run_many(fn, [args], in_tf_data=in_tf_data)[0]


def _run_many(fn, arg_tuples, *, in_tf_data):
  """[fn(*args) for args in arg_tuples], eagerly or mapped over one tf.data pipeline."""
  if not in_tf_data:
    return [tf.nest.map_structure(np.asarray, fn(*map(tf.convert_to_tensor, a)))
            for a in arg_tuples]
  columns = tuple(np.stack(c) for c in zip(*arg_tuples))
  return list(tf.data.Dataset.from_tensor_slices(columns).map(fn).as_numpy_iterator())


both = pytest.mark.parametrize('in_tf_data', [False, True])


@both
def test_center_square_resize_is_the_paper_rescale_and_centre_crop(in_tf_data):
  # Landscape 451 x 300 (decoded at full size) and portrait 400 x 600 (halved
  # by libjpeg, then rescaled).
  for photo, size in ((skimage.data.chelsea(), 200),
                      (np.ascontiguousarray(skimage.data.coffee().transpose(1, 0, 2)), 128)):
    data = _jpeg(photo)
    out = _run(lambda j, size=size: common.center_square_resize(j, size), tf.constant(data),
               in_tf_data=in_tf_data)
    assert out.shape == (size, size, 3) and out.dtype == np.float32
    # The paper's wording, with PIL: shorter side -> size, then the central square.
    decoded = Image.open(io.BytesIO(data))
    w, h = decoded.size
    scale = size / min(w, h)
    big = np.asarray(decoded.resize((round(w * scale), round(h * scale)), Image.BILINEAR),
                     np.float32)
    top, left = (big.shape[0] - size) // 2, (big.shape[1] - size) // 2
    err = lambda dy, dx: np.abs(out - big[top + dy:top + dy + size,
                                          left + dx:left + dx + size]).mean()
    along = (0, 1) if w > h else (1, 0)  # shift along the cropped axis
    assert err(0, 0) < 3.0, err(0, 0)  # interpolation differences only
    # A crop misplaced by 3 pixels would be caught.
    assert min(err(3 * along[0], 3 * along[1]), err(-3 * along[0], -3 * along[1])) > 3 * err(0, 0)


def test_large_images_shrink_in_the_decoder_without_aliasing():
  data = _jpeg(np.asarray(Image.fromarray(skimage.data.astronaut()).resize((1100, 900))))
  out = common.center_square_resize(tf.constant(data), 128).numpy()
  reference = np.asarray(Image.open(io.BytesIO(data)).crop((100, 0, 1000, 900))
                         .resize((128, 128), Image.LANCZOS), np.float32)
  assert np.abs(out - reference).mean() < 3.0
  # Decoding at full size and shrinking 7x bilinearly would alias visibly.
  naive = tf.image.resize(tf.io.decode_jpeg(data)[:, 100:1000], [128, 128]).numpy()
  assert np.abs(naive - reference).mean() > np.abs(out - reference).mean()


@both
def test_train_window_positions_in_range_and_uniform(in_tf_data):
  shape = tf.constant([300, 451, 3])  # side 300: window round(300 * 67 / 72) = 279
  windows = _run_many(lambda s: imagenet.train_window(shape, s, 72, 67),
                      [(np.array([7, i], np.int64),) for i in range(300)], in_tf_data=in_tf_data)
  tops = np.array([w[0] for w in windows])
  lefts = np.array([w[1] for w in windows]) - (451 - 300) // 2
  assert {int(w[2]) for w in windows} == {279}
  assert tops.min() == 0 and tops.max() == 300 - 279  # both ends reached
  assert lefts.min() == 0 and lefts.max() == 300 - 279
  scaled = np.array([w[3] for w in windows])
  assert scaled.min() == 0 and scaled.max() == 72 - 67
  np.testing.assert_array_equal(scaled, np.round(np.stack([tops, lefts], 1) * 72 / 300))


@both
def test_random_crop_is_the_rescaled_window(in_tf_data):
  data = _jpeg(skimage.data.coffee())  # 400 x 600
  seed = tf.constant([1, 2], tf.int64)
  image, offsets = _run(lambda j, s: imagenet.random_crop_resize(j, s, 256, 227),
                        tf.constant(data), seed, in_tf_data=in_tf_data)
  top, left, window, _ = [np.asarray(v) for v in imagenet.train_window(
      tf.constant([400, 600, 3]), seed, 256, 227)]
  assert image.shape == (227, 227, 3)
  full = tf.cast(tf.io.decode_jpeg(data), tf.float32)[top:top + window, left:left + window]
  error = np.abs(image - tf.image.resize(full, [227, 227]).numpy())
  # libjpeg's cropped decode differs from the full one only next to the edges.
  assert np.median(error) == 0 and error.mean() < 0.2, error.mean()
  np.testing.assert_array_equal(offsets, np.round(np.array([top, left - 100]) * 256 / 400))


def _square(size=256):
  return imagenet_squares.square_jpeg(tf.constant(_jpeg(skimage.data.coffee())), size, 90).numpy()


@both
def test_random_crop_of_a_square_is_its_window_at_the_paper_positions(in_tf_data):
  data = _square()
  outs = _run_many(lambda j, s: imagenet.random_crop(j, s, 256, 227),
                   [(data, np.array([4, i], np.int64)) for i in range(200)], in_tf_data=in_tf_data)
  offsets = np.stack([o for _, o in outs])
  # The paper's 30 x 30 positions, both ends reached.
  assert offsets.min() == 0 and offsets.max() == 256 - 227
  full = tf.io.decode_jpeg(data).numpy()
  for image, (r, c) in outs[:10]:
    assert image.shape == (227, 227, 3) and image.dtype == np.uint8
    error = np.abs(image.astype(int) - full[r:r + 227, c:c + 227])
    # libjpeg's cropped decode differs from the full one only next to the edges.
    assert np.median(error) == 0 and error.mean() < 0.2, error.mean()


@both
def test_train_image_of_a_square_is_crop_mean_flip_pca(in_tf_data):
  data = _square(72)
  rs = np.random.RandomState(2)
  mean = rs.uniform(0, 255, (72, 72, 3)).astype(np.float32)
  eigvec, _ = np.linalg.qr(rs.normal(size=(3, 3)))
  eigval = np.array([0.2, 0.02, 0.005], np.float32)
  kwargs = dict(mean=tf.constant(mean), eigval=tf.constant(eigval),
                eigvec=tf.constant(eigvec.astype(np.float32)), resize=72, size=67,
                flip=True, pca_std=0.1, prescaled=True)
  seeds = [np.array([6, i], np.int64) for i in range(8)]
  outs = _run_many(lambda j, s: imagenet.train_image(j, s, **kwargs),
                   [(data, s) for s in seeds], in_tf_data=in_tf_data)
  flips = 0
  for seed, out in zip(seeds, outs):
    crop_seed, flip_seed, pca_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.constant(seed), 3))
    crop, (r, c) = [np.asarray(v) for v in imagenet.random_crop(tf.constant(data), crop_seed, 72, 67)]
    want = crop.astype(np.float32) - mean[r:r + 67, c:c + 67]
    if bool(tf.random.stateless_uniform([], flip_seed, 0, 2, tf.int32) > 0):
      want, flips = want[:, ::-1], flips + 1
    alphas = imagenet.pca_alphas(pca_seed, 0.1).numpy()
    want = want + 255.0 * eigvec @ (alphas * eigval)
    np.testing.assert_allclose(out, want, atol=1e-3)
  assert 0 < flips < 8


@both
def test_flip_is_exact_and_seeded(in_tf_data):
  image = np.arange(5 * 7 * 3, dtype=np.float32).reshape(5, 7, 3)
  outs = _run_many(imagenet.random_flip, [(image, np.array([3, i], np.int64)) for i in range(20)],
                   in_tf_data=in_tf_data)
  flipped = [bool(np.array_equal(o, image[:, ::-1])) for o in outs]
  assert all(f or np.array_equal(o, image) for o, f in zip(outs, flipped))
  assert 0 < sum(flipped) < 20
  again = _run(imagenet.random_flip, tf.constant(image), tf.constant([3, 0], tf.int64),
               in_tf_data=in_tf_data)
  np.testing.assert_array_equal(again, outs[0])


@both
def test_ten_crops_geometry_is_exact(in_tf_data):
  image = np.arange(9 * 11 * 2, dtype=np.float32).reshape(9, 11, 2)
  out = _run(lambda x: common.ten_crops(x, 5), tf.constant(image), in_tf_data=in_tf_data)
  five = [image[:5, :5], image[:5, 6:], image[4:, :5], image[4:, 6:], image[2:7, 3:8]]
  np.testing.assert_array_equal(out, np.stack(five + [c[:, ::-1] for c in five]))
  centre = _run(lambda x: common.center_crop(x, 5), tf.constant(image), in_tf_data=in_tf_data)
  np.testing.assert_array_equal(centre, image[2:7, 3:8])


@both
def test_pca_lighting_adds_exactly_the_offset_of_its_alphas(in_tf_data):
  rs = np.random.RandomState(0)
  image = rs.uniform(-100, 100, (6, 5, 3)).astype(np.float32)
  eigvec, _ = np.linalg.qr(rs.normal(size=(3, 3)))
  eigval = np.array([0.2, 0.02, 0.005], np.float32)
  seed = tf.constant([5, 9], tf.int64)
  out = _run(lambda x, s: imagenet.pca_lighting(x, s, eigval, eigvec.astype(np.float32), 0.1),
             tf.constant(image), seed, in_tf_data=in_tf_data)
  alphas = imagenet.pca_alphas(seed, 0.1).numpy()
  offset = 255.0 * (eigvec * (alphas * eigval)[None, :]).sum(1)  # sum_i a_i l_i p_i
  np.testing.assert_allclose(out - image, np.broadcast_to(offset, image.shape), atol=1e-4)
  # alpha_i ~ N(0, 0.1), fresh for every seed (image and presentation).
  draws = np.stack([imagenet.pca_alphas(tf.constant([5, i], tf.int64), 0.1).numpy()
                    for i in range(2000)])
  assert np.all(np.abs(draws.mean(0)) < 0.01) and np.all(np.abs(draws.std(0) - 0.1) < 0.006)


@both
def test_mean_subtraction_is_exact(in_tf_data):
  rs = np.random.RandomState(1)
  image = rs.randint(0, 256, (4, 5, 3)).astype(np.float32)
  mean_image = rs.uniform(0, 255, (8, 9, 3)).astype(np.float32)
  out = _run(lambda x: imagenet.subtract_mean(x, tf.constant(mean_image), tf.constant([2, 3])),
             tf.constant(image), in_tf_data=in_tf_data)
  np.testing.assert_array_equal(out, image - mean_image[2:6, 3:8])
  whole = _run(lambda x: imagenet.subtract_mean(x, tf.constant(mean_image[:4, :5])),
               tf.constant(image), in_tf_data=in_tf_data)
  np.testing.assert_array_equal(whole, image - mean_image[:4, :5])
  rgb = np.array([120.5, 110.25, 100.0], np.float32)
  out = _run(lambda x: imagenet.subtract_mean(x, tf.constant(rgb)), tf.constant(image),
             in_tf_data=in_tf_data)
  np.testing.assert_array_equal(out, image - rgb)


def _positions(jpegs):
  return tf.data.Dataset.from_tensor_slices({
      'position': tf.range(len(jpegs), dtype=tf.int64), 'jpeg': jpegs,
      'label': tf.range(len(jpegs), dtype=tf.int32)})


def test_corrupt_jpegs_become_flagged_stand_ins_in_place():
  good = _jpeg(skimage.data.chelsea()[:100, :120])
  jpegs = [b'not a jpeg', good, good[:200], good, b'\xff\xd8\xff\xe0junk', good]
  ds = common.map_or_flag(
      _positions(jpegs), lambda ex: {'image': common.center_square_resize(ex['jpeg'], 16),
                                     'label': ex['label']}, parallel=2)
  out = list(ds.as_numpy_iterator())
  assert [e['position'] for e in out] == list(range(6))
  assert [bool(e['ok']) for e in out] == [False, True, False, True, False, True]
  assert [e['label'] for e in out] == [0, 1, 0, 3, 0, 5]
  assert not out[0]['image'].any() and out[1]['image'].any()


def test_unreadable_training_images_are_replaced_counted_and_reported(capfd):
  good = [_jpeg(p[:150, :200]) for p in _photos()[:3]]
  jpegs = [good[0], good[1], good[0][:300], good[2]] * 2  # epochs of 8: one bad each 4
  config = config_lib.base_config()
  config.dataset.resize_size, config.dataset.image_size = 40, 32
  stats = imagenet.Stats(np.full(3, 100.0, np.float32), np.ones(3, np.float32),
                         np.eye(3, dtype=np.float32))
  ds = imagenet.train_batches(_positions(jpegs * 2), config, stats, local_batch=4,
                              per_epoch=8)
  batches = list(ds.as_numpy_iterator())
  assert len(batches) == 4 and set(batches[0]) == {'image', 'label'}
  for k, b in enumerate(batches):
    # Slot 2 held the truncated JPEG: it now repeats a readable example.
    assert 4 * k + 2 not in b['label']
    assert any(np.array_equal(b['image'][2], b['image'][i]) and b['label'][2] == b['label'][i]
               for i in (0, 1, 3))
  err = capfd.readouterr().err
  assert 'skipped 2 unreadable images in epoch 0' in err, err
  assert 'skipped 2 unreadable images in epoch 1' in err, err


def test_fill_unreadable_keeps_batches_whole():
  batch = {'image': tf.constant([[1.0], [2.0], [0.0], [4.0]]), 'label': tf.constant([1, 2, 0, 4]),
           'ok': tf.constant([True, True, False, True]), 'position': tf.range(4)}
  out = imagenet.fill_unreadable(batch)
  assert int(out['unreadable']) == 1
  assert out['label'].numpy().tolist() == [1, 2, 4, 4]  # 3rd readable one fills slot 2
  assert out['image'].numpy()[:, 0].tolist() == [1.0, 2.0, 4.0, 4.0]
  assert out['position'].numpy().tolist() == [0, 1, 2, 3]


# ------------------------------------------------------------------ dataset


def test_missing_archives_say_where_they_go(tmp_path):
  config = config_lib.base_config()
  config.dataset.data_dir = str(tmp_path / 'tfds')
  with pytest.raises(common.DataNotFoundError) as e:
    imagenet.prepare(config)
  msg = str(e.value)
  assert 'ILSVRC2012_img_train.tar' in msg and 'ILSVRC2012_img_val.tar' in msg
  assert os.path.join(str(tmp_path / 'tfds'), 'downloads', 'manual') in msg
  assert '150 GB' in msg and 'hours' in msg


def test_missing_stats_name_the_command(imagenet_root, tmp_path):
  config = tiny_paper_config(imagenet_root)
  config.dataset.stats_dir = str(tmp_path)
  with pytest.raises(common.DataNotFoundError, match='alexnet_jax.tools.dataset_stats'):
    imagenet.create_data(config, local_batch=8, eval_local_batch=8)
  config.dataset.mean_mode = 'constant'  # needs no file
  data = imagenet.create_data(config, local_batch=8, eval_local_batch=8)
  assert data.steps_per_epoch == 25 // 8


def test_squares_copy_is_the_rescaled_centre_of_every_readable_image(imagenet_root):
  originals = {name: (data, label) for name, data, label in
               _train_jpegs(tiny_paper_config(imagenet_root, prescaled=False))}
  squares = _train_jpegs(tiny_paper_config(imagenet_root))
  truncated = f'{SYNSETS[0]}_{PER_SYNSET + 1}.JPEG'
  assert sorted(n for n, _, _ in squares) == sorted(set(originals) - {truncated})
  for name, data, label in squares:
    source, source_label = originals[name]
    assert label == source_label
    # Stored exactly as `square_jpeg` encodes it ...
    assert data == imagenet_squares.square_jpeg(tf.constant(source), RESIZE, 90).numpy()
    # ... which is the paper's rescale and centre crop up to JPEG error (larger
    # on these 72-pixel thumbnails than on 256-pixel squares), well below the
    # difference to its mirror image.
    square = tf.io.decode_jpeg(data).numpy().astype(np.float32)
    exact = common.center_square_resize(tf.constant(source), RESIZE).numpy()
    assert square.shape == (RESIZE, RESIZE, 3)
    error = np.abs(square - exact).mean()
    assert error < 5.0 and error < 0.5 * np.abs(square - exact[:, ::-1]).mean(), error


@pytest.mark.parametrize('prescaled', [False, True])
def test_stats_equal_a_numpy_computation(imagenet_root, prescaled):
  config = tiny_paper_config(imagenet_root, prescaled)
  builder = imagenet.prepare(config)
  with open(imagenet.stats_path(config, builder), 'rb') as f:
    stats = dict(np.load(f))
  images = []
  for name, data, _ in _train_jpegs(config):
    try:
      images.append(imagenet.decode_square(tf.constant(data), RESIZE, prescaled).numpy())
    except tf.errors.InvalidArgumentError:
      assert name == f'{SYNSETS[0]}_{PER_SYNSET + 1}.JPEG'  # the truncated one
  images = np.stack(images).astype(np.float64)
  assert int(stats['num_images']) == len(images) == 25
  assert int(stats['num_unreadable']) == (0 if prescaled else 1)
  np.testing.assert_allclose(stats['mean_image'], images.mean(0), rtol=1e-5, atol=1e-3)
  pixels = images.reshape(-1, 3) / 255.0
  cov = np.cov(pixels, rowvar=False, bias=True)
  np.testing.assert_allclose(stats['covariance'], cov, rtol=1e-6, atol=1e-9)
  eigval, eigvec = np.linalg.eigh(cov)
  np.testing.assert_allclose(stats['eigval'], eigval[::-1], rtol=1e-6)
  np.testing.assert_allclose(np.abs(stats['eigvec']), np.abs(eigvec[:, ::-1]), atol=1e-6)
  loaded = imagenet.load_stats(config, builder)
  assert loaded.mean.shape == (RESIZE, RESIZE, 3)
  config.dataset.mean_mode = 'channel'
  np.testing.assert_allclose(imagenet.load_stats(config, builder).mean,
                             images.mean((0, 1, 2)), rtol=1e-5)


@pytest.mark.parametrize('prescaled', [False, True])
def test_train_stream_is_a_function_of_seed_and_step(imagenet_root, prescaled):
  config = tiny_paper_config(imagenet_root, prescaled)
  data = imagenet.create_data(config, local_batch=8, eval_local_batch=8)
  counts = (3, 25, 8) if prescaled else (3, 26, 9)  # the copy leaves corrupt ones out
  assert (data.steps_per_epoch, data.num_train, data.num_eval) == counts
  full = list(data.train(0).take(7).as_numpy_iterator())
  resumed = list(data.train(2).take(5).as_numpy_iterator())  # mid-epoch, then epochs 1-2
  for a, b in zip(full[2:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert full[0]['image'].shape == (8, SIZE, SIZE, 3) and full[0]['label'].dtype == np.int32
  # Epochs differ in order; each epoch's 24 examples are distinct images.
  assert not np.array_equal(full[0]['label'], full[3]['label'])
  epoch0 = np.concatenate([b['image'] for b in full[:3]]).reshape(24, -1)
  assert len({row.tobytes() for row in epoch0}) >= 23  # a bad one is a copy
  # One shard: a cache (which fixes the shard order) changes nothing.
  config.dataset.cache = 'memory'
  cached = imagenet.create_data(config, local_batch=8, eval_local_batch=8)
  for a, b in zip(full, cached.train(0).take(7).as_numpy_iterator()):
    np.testing.assert_array_equal(a['image'], b['image'])
  for a, b in zip(data.eval(), cached.eval()):
    np.testing.assert_array_equal(a['image'], b['image'])
  config.seed = 1
  other = next(imagenet.create_data(config, local_batch=8, eval_local_batch=8)
               .train(0).as_numpy_iterator())
  assert not np.array_equal(other['image'], full[0]['image'])


@pytest.mark.parametrize('prescaled', [False, True])
def test_eval_counts_every_readable_example_once(imagenet_root, prescaled):
  config = tiny_paper_config(imagenet_root, prescaled)
  data = imagenet.create_data(config, local_batch=8, eval_local_batch=4)
  batches = list(data.eval())
  stored = NUM_VAL if prescaled else NUM_VAL + 1  # the copy leaves the garbage one out
  assert len(batches) == -(-stored // 4)
  assert all(b['image'].shape == (4, 10, SIZE, SIZE, 3) for b in batches)
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == NUM_VAL and not mask[stored:].any()  # garbage and padding: 0
  labels = np.concatenate([b['label'] for b in batches])[mask == 1]
  names = imagenet.prepare(config).info.features['label'].names
  truth = open(os.path.join(os.path.dirname(tfds.__file__), 'datasets', 'imagenet2012',
                            'validation_labels.txt')).read().split()[:NUM_VAL]
  # tfds stores validation in its own order: compare as multisets.
  assert sorted(names[l] for l in labels) == sorted(truth)
  # Processes with fewer examples pad with empty batches to the common count.
  builder = imagenet.prepare(config)
  extra = list(imagenet.eval_batches(config, builder, imagenet.load_stats(config, builder),
                                     split='validation', local_batch=4, num_examples=stored,
                                     num_batches=5))
  assert len(extra) == 5 and not extra[3]['mask'].any() and not extra[4]['mask'].any()


@pytest.mark.parametrize('prescaled', [False, True])
def test_paper_config_trains_and_tests_on_ten_crops(imagenet_root, tmp_path, prescaled):
  config = tiny_paper_config(imagenet_root, prescaled)
  config.max_train_steps = 4  # crosses the epoch boundary at step 3
  config.eval_every_epochs = 100  # one evaluation, at the end
  assert config.dataset.eval_crops == 'ten' and config.dataset.mean_mode == 'image'
  results = train.train_and_evaluate(config, str(tmp_path))
  assert results['step'] == 4
  assert results['eval_examples'] == NUM_VAL  # all readable validation images
  assert 0.0 <= results['eval_top1_error'] <= 1.0
  assert np.isfinite(results['eval_loss'])
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert all(np.isfinite(l['train_loss']) for l in lines if 'train_loss' in l)


def test_config_rejects_bad_imagenet_settings():
  config = config_lib.base_config()
  config_lib.validate(config, 1)
  for key, value, match in (('eval_crops', 'five', 'eval_crops'),
                            ('mean_mode', 'median', 'mean_mode'),
                            ('resize_size', 200, 'resize_size=200'),
                            ('pca_std', -0.1, 'pca_std')):
    bad = config_lib.base_config()
    bad.dataset[key] = value
    with pytest.raises(ValueError, match=match):
      config_lib.validate(bad, 1)
