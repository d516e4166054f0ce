"""alexnet_jax.data: input ops, eagerly and inside tf.data; the IDX reader; determinism."""

import gzip

import numpy as np
import pytest
import tensorflow as tf

import alexnet_jax.data
from alexnet_jax.data import common
from alexnet_jax.data import fashion_mnist


def _origins(out, padded, h, w, p):
  """For each output image, the (row, col, flipped) crop of `padded` it equals."""
  result = []
  for img in out[..., 0]:
    found = [(r, c, f) for r in range(2 * p + 1) for c in range(2 * p + 1)
             for f in (False, True)
             if np.array_equal(padded[r:r + h, c:c + w][:, ::-1] if f
                               else padded[r:r + h, c:c + w], img)]
    assert len(found) == 1, 'output is not exactly one crop of the padded image'
    result.append(found[0])
  return result


@pytest.mark.parametrize('in_tf_data', [False, True])
def test_crop_and_flip_is_exact_and_in_range(in_tf_data):
  b, h, w, p = 64, 6, 7, 2
  # Distinct positive pixel values, so every crop position is identifiable.
  image = np.arange(1, h * w + 1, dtype=np.int32).reshape(h, w)
  images = np.broadcast_to(image[None, :, :, None], (b, h, w, 1)).copy()
  fn = lambda x: common.crop_and_flip_batch(
      x, tf.constant([3, 4], tf.int64), crop_padding=p, flip=True)
  if in_tf_data:
    out = next(iter(tf.data.Dataset.from_tensors(images).map(fn))).numpy()
  else:
    out = fn(tf.constant(images)).numpy()
  assert out.shape == images.shape
  origins = _origins(out, np.pad(image, p), h, w, p)  # zero padding, as the op
  assert len(set(origins)) > 10  # offsets and flips vary across the batch
  assert {f for _, _, f in origins} == {False, True}


def test_crop_and_flip_is_deterministic_given_seed():
  x = tf.random.uniform((16, 8, 8, 1), 0, 255, tf.int32, seed=1)
  a = common.crop_and_flip_batch(x, tf.constant([1, 2], tf.int64), crop_padding=2, flip=True)
  b = common.crop_and_flip_batch(x, tf.constant([1, 2], tf.int64), crop_padding=2, flip=True)
  c = common.crop_and_flip_batch(x, tf.constant([1, 3], tf.int64), crop_padding=2, flip=True)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_train_stream_resumes_exactly(tiny_config):
  rs = np.random.RandomState(0)
  images = rs.randint(0, 255, (100, 28, 28, 1)).astype(np.uint8)
  labels = np.arange(100, dtype=np.int32)
  full = list(fashion_mnist.train_dataset(tiny_config, images, labels, local_batch=32)
              .take(7).as_numpy_iterator())
  resumed = list(fashion_mnist.train_dataset(tiny_config, images, labels, local_batch=32,
                                             start_step=4).take(3).as_numpy_iterator())
  for a, b in zip(full[4:], resumed):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  # Each epoch (3 batches of 32 from 100) sees distinct examples.
  epoch0 = np.concatenate([b['label'] for b in full[:3]])
  assert len(set(epoch0.tolist())) == 96
  assert not np.array_equal(full[0]['label'], full[3]['label'])  # reshuffled


def test_eval_batches_pad_and_mask_every_example_once(tiny_config):
  images = np.zeros((70, 28, 28, 1), np.uint8)
  labels = np.arange(70, dtype=np.int32)
  batches = list(fashion_mnist.eval_batches(tiny_config, images, labels, local_batch=32))
  assert [len(b['label']) for b in batches] == [32, 32, 32]
  mask = np.concatenate([b['mask'] for b in batches])
  got = np.concatenate([b['label'] for b in batches])[mask == 1]
  np.testing.assert_array_equal(np.sort(got), labels)
  assert mask.sum() == 70


def test_idx_reader_and_content_check(tmp_path):
  data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  raw = bytes([0, 0, 8, 3]) + b''.join(d.to_bytes(4, 'big') for d in data.shape) + data.tobytes()
  path = tmp_path / 'x-idx3-ubyte.gz'
  with gzip.open(path, 'wb') as f:
    f.write(raw)
  np.testing.assert_array_equal(fashion_mnist.read_idx(str(path)), data)
  with pytest.raises(ValueError, match='truncated'):
    fashion_mnist.parse_idx(raw[:-1])
  # A folder with the right names but wrong content is rejected by hash.
  for stem in fashion_mnist.CONTENT_SHA256:
    with gzip.open(tmp_path / f'{stem}.gz', 'wb') as f:
      f.write(raw)
  with pytest.raises(ValueError, match='does not hold Fashion-MNIST'):
    fashion_mnist.verify_folder(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='apt-get install -y dataset-fashion-mnist'):
    fashion_mnist.verify_folder(str(tmp_path / 'empty'))


def test_real_fashion_mnist_loads(fashion_arrays):
  (x_train, y_train), (x_test, y_test) = fashion_arrays['train'], fashion_arrays['test']
  assert x_train.shape == (60000, 28, 28, 1) and x_test.shape == (10000, 28, 28, 1)
  assert np.bincount(y_train).tolist() == [6000] * 10
  assert np.bincount(y_test).tolist() == [1000] * 10


@pytest.mark.parametrize('in_tf_data', [False, True])
def test_padded_ten_crops_are_the_papers_ten_patches(in_tf_data):
  h, w, p = 6, 6, 2
  image = np.arange(1, h * w + 1, dtype=np.int32).reshape(h, w, 1)
  fn = lambda x: common.padded_ten_crops(x, p)
  if in_tf_data:
    out = next(iter(tf.data.Dataset.from_tensors(image).map(fn))).numpy()
  else:
    out = fn(tf.constant(image)).numpy()
  padded = np.pad(image, [(p, p), (p, p), (0, 0)])
  # Four corners of the padded image, its centre (the image), then mirrors.
  corners = [padded[r:r + h, c:c + w] for r, c in ((0, 0), (0, 2 * p), (2 * p, 0),
                                                    (2 * p, 2 * p))]
  expected = np.stack(corners + [image])
  expected = np.concatenate([expected, expected[:, :, ::-1]])
  assert out.shape == (10, h, w, 1)
  np.testing.assert_array_equal(out, expected)


def test_ten_crop_eval_batches_normalise_and_mask(tiny_config):
  rs = np.random.RandomState(1)
  images = rs.randint(0, 255, (5, 28, 28, 1)).astype(np.uint8)
  labels = np.arange(5, dtype=np.int32)
  batches = list(fashion_mnist.eval_batches(tiny_config, images, labels, local_batch=4,
                                            crops='ten'))
  assert [b['image'].shape for b in batches] == [(4, 10, 28, 28, 1)] * 2
  assert np.concatenate([b['mask'] for b in batches]).tolist() == [1] * 5 + [0] * 3
  mean, std = tiny_config.dataset.mean[0], tiny_config.dataset.std[0]
  # Patch 4 is the image itself, patch 9 its mirror image.
  np.testing.assert_allclose(batches[1]['image'][0, 4], (images[4] - mean) / std, atol=1e-5)
  np.testing.assert_allclose(batches[1]['image'][0, 9], (images[4, :, ::-1] - mean) / std,
                             atol=1e-5)


def test_create_data_rejects_unknown_dataset(tiny_config):
  tiny_config.dataset.name = 'mnist'
  with pytest.raises(ValueError, match="dataset.name='mnist' is not known"):
    alexnet_jax.data.create_data(tiny_config, local_batch=8, eval_local_batch=8)
  # The package re-exports what the trainer uses from `common`.
  assert alexnet_jax.data.Data is common.Data
  assert alexnet_jax.data.DataNotFoundError is common.DataNotFoundError
  assert alexnet_jax.data.shard is common.shard


def test_fashion_mnist_create_data_shares(fashion_arrays, tiny_config):
  del fashion_arrays  # prepared once per session
  data = alexnet_jax.data.create_data(tiny_config, local_batch=32, eval_local_batch=512)
  assert (data.num_train, data.num_eval, data.steps_per_epoch) == (60000, 10000, 60000 // 32)
  batch = next(data.train(0).as_numpy_iterator())
  assert batch['image'].shape == (32, 28, 28, 1)
  assert sum(int(b['mask'].sum()) for b in data.eval()) == 10000
