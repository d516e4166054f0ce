"""Using trained networks: loading a workdir, image files, predict, evaluate, figures."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest
import skimage.data
import tensorflow as tf

from alexnet_jax import checkpointing
from alexnet_jax import config_lib
from alexnet_jax import data
from alexnet_jax import evaluate
from alexnet_jax import inference
from alexnet_jax import optim
from alexnet_jax import predict
from alexnet_jax import train
from alexnet_jax.data import common
from alexnet_jax.data import fashion_mnist
from alexnet_jax.data import imagenet
from alexnet_jax.tools import figures
from conftest import REPO, load_config, make_model, set_keys, tiny_fashion_config


def _softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _write_workdir(config, workdir, seed=0):
  """A workdir as training leaves it, its checkpoint (step 0) holding random weights.

  Drawn in numpy into the trainer's state shapes: nothing to compile.
  """
  os.makedirs(workdir)
  shapes = jax.eval_shape(lambda: train.create_train_state(
      config, make_model(config), optim.create_optimizer(config.optimizer)))
  rs = np.random.RandomState(seed)
  state = jax.tree.map(lambda s: (rs.normal(0, 0.05, s.shape).astype(s.dtype)
                                  if np.issubdtype(s.dtype, np.floating)
                                  else np.zeros(s.shape, s.dtype)), shapes)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  ckpt.save(state, {})
  ckpt.close()
  checkpointing.write_config(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A tiny Fashion-MNIST network trained for a few steps (on a part of the training set)."""
  path = str(tmp_path_factory.mktemp('trained'))
  config = set_keys(tiny_fashion_config(), {
      'max_train_steps': 10, 'max_eval_batches': 1, 'num_devices': 1,
      'eval_batch_size': 64, 'dataset.train_split': 'train[:2000]'})
  train.train_and_evaluate(config, path)
  return path


@pytest.fixture(scope='module')
def network(workdir):
  return inference.load(workdir)


@pytest.fixture(scope='module')
def other(tmp_path_factory):
  """Another member: a single-tower network with random weights."""
  config = set_keys(tiny_fashion_config(), {'model.towers': 1, 'seed': 1})
  return inference.load(_write_workdir(config, str(tmp_path_factory.mktemp('other') / 'w'),
                                       seed=1))


@pytest.fixture(scope='module')
def test_pngs(fashion_arrays, tmp_path_factory):
  """The first 6 test images as PNG files, with their arrays."""
  images, labels = (a[:6] for a in fashion_arrays['test'])
  folder = tmp_path_factory.mktemp('pngs')
  paths = []
  for i, image in enumerate(images):
    paths.append(str(folder / f'{i}.png'))
    Image.fromarray(image[:, :, 0]).save(paths[-1])
  return paths, images, labels


# ------------------------------------------------------------------ loading and files


def test_load_restores_the_trained_parameters(workdir, network):
  assert network.step == 10
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'))
  saved = ckpt.manager.restore(10)['state']['params']
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, saved, jax.device_get(network.params))
  assert network.class_names[9] == 'ankle boot' and len(network.class_names) == 10


@pytest.mark.parametrize('crops', ['center', 'ten'])
def test_files_get_the_pipelines_input_and_probabilities(network, test_pngs, crops):
  paths, images, labels = test_pngs
  inputs = inference.read_images(network, paths, crops)
  batch = next(fashion_mnist.eval_batches(network.config, images, labels, local_batch=6,
                                          crops=crops))
  np.testing.assert_array_equal(inputs, batch['image'])  # the same function, bit for bit
  probs = network.apply(inputs, batch_size=4)['probs']  # two batches, one padded
  # Reference: the network on the pipeline's batch, softmax averaged over crops.
  x = batch['image'].reshape((-1, 28, 28, 1))
  want = _softmax(np.asarray(network.model.apply({'params': network.params}, x, train=False)))
  want = want.reshape(6, -1, 10).mean(1)
  np.testing.assert_allclose(probs, want, rtol=1e-5, atol=1e-7)
  fc7 = network.apply(inputs[:2], features=True)['features']
  assert fc7.shape == (2, 32) and fc7.min() >= 0 and fc7.max() > 0  # after the ReLU


def test_other_images_become_grey_squares_of_the_dataset_size(network, tmp_path):
  path = str(tmp_path / 'cat.jpg')
  Image.fromarray(skimage.data.chelsea()).save(path)  # 451 x 300 colour JPEG
  x = inference.read_image(path, network.config, 'center')
  assert x.shape == (28, 28, 1)
  grey = np.asarray(Image.open(path).convert('L').resize((28, 28), Image.BILINEAR,
                                                          box=(75, 0, 375, 300)), np.float32)
  pixels = fashion_mnist.pixels(x, network.config)[..., 0].astype(np.float32)
  assert np.abs(pixels - grey).mean() < 6.0  # antialiased rescale vs PIL's


def test_unreadable_files_are_one_line_errors(network, tmp_path):
  bad = tmp_path / 'bad.png'
  bad.write_bytes(b'\x89PNG not really')
  with pytest.raises(ValueError, match='bad.png is not a readable image') as e:
    inference.read_images(network, [str(bad)], 'center')
  assert '\n' not in str(e.value) and '{{' not in str(e.value)
  with pytest.raises(FileNotFoundError, match='missing.png: no such file'):
    inference.read_images(network, [str(tmp_path / 'missing.png')], 'center')
  with pytest.raises(FileNotFoundError, match='holds no config.json'):
    inference.load(str(tmp_path))
  (tmp_path / 'config.json').write_text(json.dumps({'dataset': {'nmae': 'x'}, 'foo': 1}))
  with pytest.raises(ValueError, match='does not know: dataset.nmae, foo'):
    inference.load(str(tmp_path))
  (tmp_path / 'config.json').write_text(json.dumps({'dataset': {'name': 'fashion_mnist'}}))
  with pytest.raises(FileNotFoundError, match='holds no checkpoint'):
    inference.load(str(tmp_path))


def test_predict_command_prints_one_json_object_per_image(network, test_pngs, workdir):
  paths = test_pngs[0][:2]
  run = subprocess.run([sys.executable, '-m', 'alexnet_jax.predict', f'--workdir={workdir}',
                        '--crops=ten', '--json', *paths],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  lines = run.stdout.strip().splitlines()
  assert len(lines) == 2
  want = predict.predictions(network, paths, 'ten')
  for line, path, expected in zip(lines, paths, want):
    got = json.loads(line)
    assert set(got) == {'file', 'top5'} and got['file'] == path
    assert [c for c, _, _ in got['top5']] == [c for c, _, _ in expected['top5']]
    assert [n for _, n, _ in got['top5']] == [network.class_names[c] for c, _, _ in got['top5']]
    probs = [p for _, _, p in got['top5']]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
    np.testing.assert_allclose(probs, [p for _, _, p in expected['top5']], rtol=1e-5)
  text = predict.format_text(want[0])
  assert text.splitlines()[0] == paths[0] and len(text.splitlines()) == 6


# ------------------------------------------------------------------ evaluate


def test_evaluate_counts_every_example_and_a_self_ensemble_changes_nothing(network,
                                                                           fashion_arrays):
  images, labels = (a[:203] for a in fashion_arrays['test'])  # 203 = 3 * 64 + 11
  single = evaluate.evaluate([network], split='test[:203]', crops='center', batch_size=64,
                             progress=False)
  assert single['num_examples'] == 203
  x = (images.astype(np.float32) - np.array(network.config.dataset.mean)) / np.array(
      network.config.dataset.std)
  logits = np.asarray(network.model.apply({'params': network.params}, x, train=False))
  top5 = np.argsort(-logits, axis=1, kind='stable')[:, :5]
  np.testing.assert_allclose(single['top1_error'], np.mean(top5[:, 0] != labels), atol=1e-9)
  np.testing.assert_allclose(single['top5_error'],
                             1 - np.mean((top5 == labels[:, None]).any(1)), atol=1e-9)
  log_p = np.log(_softmax(logits.astype(np.float64)))
  np.testing.assert_allclose(single['loss'], -log_p[np.arange(203), labels].mean(), rtol=1e-5)
  double = evaluate.evaluate([network, network], split='test[:203]', crops='center',
                             batch_size=64, progress=False)
  for key in ('num_examples', 'top1_error', 'top5_error'):
    assert double[key] == single[key], key
  np.testing.assert_allclose(double['loss'], single['loss'], rtol=1e-6)
  # --max_examples: the first N of the split, a prefix that ends inside a batch.
  first = evaluate.evaluate([network], split='test', crops='center', batch_size=64,
                            max_examples=100, progress=False)
  assert first['num_examples'] == 100
  np.testing.assert_allclose(first['top1_error'], np.mean(top5[:100, 0] != labels[:100]))
  names = {evaluate.result_filename(r) for r in (single, double, first)}
  assert names == {'eval_test-203_center.json', 'eval_test_center_max100.json',
                   f'eval_test-203_center_ensemble-{evaluate.result_filename(double)[-15:-5]}.json'}


def test_an_ensemble_averages_the_softmax_of_its_members(network, other, fashion_arrays):
  images, labels = (a[:50] for a in fashion_arrays['test'])
  x = (images.astype(np.float32) - np.array(network.config.dataset.mean)) / np.array(
      network.config.dataset.std)
  logits = [np.asarray(n.model.apply({'params': n.params}, x, train=False))
            for n in (network, other)]
  mean = (_softmax(logits[0].astype(np.float64)) + _softmax(logits[1].astype(np.float64))) / 2
  np.testing.assert_allclose(np.exp(evaluate.ensemble_log_probs(logits)), mean, rtol=1e-5)
  # Members of different architectures (two towers, one), over the pipeline.
  result = evaluate.evaluate([network, other], split='test[:50]', crops='center',
                             batch_size=32, progress=False)
  assert result['num_examples'] == 50 and len(result['members']) == 2
  np.testing.assert_allclose(result['top1_error'], np.mean(mean.argmax(1) != labels),
                             atol=1e-9)


def test_members_must_share_labels_and_preprocessing(workdir, tmp_path):
  configs = [inference.load_config(workdir) for _ in range(2)]
  evaluate.check_members(configs, ['a', 'b'])  # the same run twice
  for key, value in (('num_classes', 12), ('std', (70.0,)), ('channel_order', 'bgr'),
                     ('crop_padding', 2)):
    changed = inference.load_config(workdir)
    changed.dataset[key] = value
    with pytest.raises(ValueError, match=f'dataset.{key} is') as e:
      evaluate.check_members([configs[0], changed], ['a', 'b'])
    assert '\n' not in str(e.value) and '--workdir=b' in str(e.value)
  changed = inference.load_config(workdir)
  changed.model.towers, changed.dataset.data_dir = 1, '/elsewhere'  # no part of the input
  evaluate.check_members([configs[0], changed], ['a', 'b'])
  # The command refuses before reading any checkpoint: one line, status 1.
  saved = json.load(open(os.path.join(workdir, 'config.json')))
  saved['dataset']['mean'] = [70.0]
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  run = subprocess.run([sys.executable, '-m', 'alexnet_jax.evaluate', f'--workdir={workdir}',
                        f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 1, run.stderr[-3000:]
  assert 'Traceback' not in run.stderr
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith('Error: ') and 'dataset.mean is [70.0]' in last, run.stderr[-2000:]


# ------------------------------------------------------------------ figures


def test_colour_score_of_hand_made_kernels():
  kernel = np.zeros((2, 2, 3, 4))
  kernel[..., 0] = 0.3                     # grey: all energy on the grey axis
  kernel[0, 0, 0, 1] = 1.0                 # pure red: 1 - (1/sqrt3)^2 = 2/3
  kernel[0, 0, :, 2] = (1.0, 0.0, 0.0)     # one red pixel, one white pixel:
  kernel[1, 1, :, 2] = (1.0, 1.0, 1.0)     # (2/3 + 0) / (1 + 3) = 1/6
  kernel[0, 1, :, 3] = (1.0, -1.0, 0.0)    # no grey component at all
  np.testing.assert_allclose(figures.colour_scores(kernel), [0, 2 / 3, 1 / 6, 1], atol=1e-12)
  np.testing.assert_allclose(figures.tower_scores(kernel, 2), [1 / 3, 7 / 12])
  assert figures.colour_scores(np.ones((3, 3, 1, 4))) is None  # grey input
  assert figures.colour_scores(np.zeros((3, 3, 3, 1)))[0] == 0.0
  grid = figures.kernel_grid(np.random.RandomState(0).randn(5, 5, 3, 40), towers=2)
  assert grid.shape == (2 * 2 * 6 + 2, 16 * 6, 3) and grid.min() == 0 and grid.max() == 1


def test_nearest_neighbours_equal_brute_force_across_chunks():
  rs = np.random.RandomState(0)
  vectors = rs.randn(53, 8).astype(np.float32)
  vectors[20] = vectors[3]  # a tie: the earlier index first
  queries = np.concatenate([rs.randn(2, 8), vectors[3:4]]).astype(np.float32)
  mask = np.ones(53)
  mask[[5, 17, 40]] = 0  # padding / unreadable: never a neighbour
  nearest = figures.Nearest(queries, k=6)
  for start in range(0, 53, 7):  # chunks of 7: the top-6 spans several
    part = slice(start, start + 7)
    nearest.update(vectors[part], np.arange(53)[part], mask[part],
                   label=np.arange(53)[part] * 10, image=vectors[part, :2])
  d = np.sqrt(((queries[:, None].astype(np.float64) - vectors[None]) ** 2).sum(-1))
  d[:, mask == 0] = np.inf
  want = np.argsort(d, axis=1, kind='stable')[:, :6]
  np.testing.assert_array_equal(nearest.indices, want)
  np.testing.assert_allclose(nearest.distances, np.take_along_axis(d, want, 1), atol=1e-6)
  np.testing.assert_array_equal(nearest.kept['label'], want * 10)
  np.testing.assert_array_equal(nearest.kept['image'], vectors[want, :2])
  assert list(nearest.indices[2, :2]) == [3, 20]


def test_figures_are_drawn_and_neighbours_are_the_nearest_training_images(
    network, fashion_arrays, tmp_path):
  fig3 = figures.figure3(network, str(tmp_path))
  assert [t['colour_score'] for t in fig3['towers']] == [None, None]  # grey network
  fig4 = figures.figure4(network, str(tmp_path), queries=2, neighbours=3, max_train=150,
                         batch_size=64, progress=False)
  for name in ('figure3.png', 'figure3.json', 'figure4.png', 'figure4.json'):
    assert os.path.getsize(tmp_path / name) > 1000 or name.endswith('.json'), name
  assert json.load(open(tmp_path / 'figure4.json')) == json.loads(json.dumps(fig4))
  # Brute force over the same 150 training images.
  train_images, train_labels = (a[:150] for a in fashion_arrays['train'])
  test_images, test_labels = (a[:2] for a in fashion_arrays['test'])
  norm = lambda im: (im.astype(np.float32) - np.array(network.config.dataset.mean)) / np.array(
      network.config.dataset.std)
  fc7 = lambda im: network.apply(norm(im), features=True)['features'].astype(np.float64)
  d = np.sqrt(((fc7(test_images)[:, None] - fc7(train_images)[None]) ** 2).sum(-1))
  want = np.argsort(d, axis=1, kind='stable')[:, :3]
  for q, row in enumerate(fig4['queries']):
    assert row['index'] == q and row['label'] == test_labels[q]
    assert [n['index'] for n in row['neighbours']] == list(want[q])
    assert [n['label'] for n in row['neighbours']] == list(train_labels[want[q]])
    np.testing.assert_allclose([n['distance'] for n in row['neighbours']],
                               d[q, want[q]], rtol=1e-4, atol=1e-5)
    assert len(row['top5']) == 5


# ------------------------------------------------------------------ ImageNet


def test_imagenet_names_follow_the_tfds_class_order():
  names = imagenet.class_names()
  assert len(names) == 1000 and len(set(names)) == 1000
  assert imagenet.synsets()[:2] == ['n01440764', 'n01443537']
  assert names[0] == 'tench, Tinca tinca' and names[207] == 'golden retriever'
  assert names[999] == 'toilet tissue, toilet paper, bathroom tissue'


def test_bgr_and_std_reach_the_imagenet_train_and_eval_images():
  rs = np.random.RandomState(3)
  square = tf.constant(rs.uniform(0, 255, (12, 12, 3)).astype(np.float32))
  mean, std = np.float32([100, 110, 120]), (50.0, 60.0, 70.0)
  mean = tf.constant(mean)
  rgb = imagenet.eval_image(square, mean=mean, size=10, crops='ten').numpy()
  bgr = imagenet.eval_image(square, mean=mean, size=10, crops='ten', std=std,
                            channel_order='bgr').numpy()
  np.testing.assert_allclose(bgr, rgb[..., ::-1] / np.float32(std), rtol=1e-6)
  jpeg = tf.io.encode_jpeg(tf.cast(square, tf.uint8))
  kwargs = dict(mean=mean, eigval=tf.ones(3), eigvec=tf.eye(3), resize=12,
                size=10, flip=True, pca_std=0.1, prescaled=True)
  seed = tf.constant([1, 2], tf.int64)
  plain = imagenet.train_image(jpeg, seed, **kwargs).numpy()
  caffe = imagenet.train_image(jpeg, seed, **kwargs, std=std, channel_order='bgr').numpy()
  np.testing.assert_allclose(caffe, plain[..., ::-1] / np.float32(std), rtol=1e-6)
  # dataset.mean is in the network's order: Stats.mean is RGB.
  config = config_lib.base_config()
  config.dataset.mean_mode, config.dataset.channel_order = 'constant', 'bgr'
  config.dataset.mean = (104.0, 117.0, 123.0)
  np.testing.assert_array_equal(imagenet.load_stats(config, None).mean, [123, 117, 104])


def test_a_statistics_file_says_its_channel_order(tmp_path):
  config = config_lib.base_config()
  config.dataset.stats_dir, config.dataset.resize_size = str(tmp_path), 4
  mean_image = np.random.RandomState(0).uniform(0, 255, (4, 4, 3)).astype(np.float32)
  common_keys = dict(mean_image=mean_image, mean_rgb=mean_image.mean((0, 1)),
                     eigval=np.ones(3), eigvec=np.eye(3))
  np.savez(tmp_path / 'stats_4.npz', **common_keys)  # as dataset_stats writes it: RGB
  np.testing.assert_array_equal(imagenet.load_stats(config, None).mean, mean_image)
  np.savez(tmp_path / 'stats_4.npz', **common_keys, channel_order=np.str_('bgr'))
  np.testing.assert_array_equal(imagenet.load_stats(config, None).mean, mean_image[..., ::-1])
  config.dataset.mean_mode = 'channel'
  np.testing.assert_allclose(imagenet.load_stats(config, None).mean,
                             mean_image.mean((0, 1))[::-1], rtol=1e-6)


def test_predict_and_figure3_on_an_imagenet_network(tmp_path):
  config = set_keys(load_config('paper'), {
      'dataset.resize_size': 72, 'dataset.image_size': 67, 'dataset.mean_mode': 'constant',
      'dataset.channel_order': 'bgr', 'dataset.mean': (104.0, 117.0, 123.0),
      'dataset.std': (50.0, 60.0, 70.0), 'dataset.data_dir': str(tmp_path / 'absent'),
      'model.features': (8, 16, 16, 16, 8), 'model.fc_features': (32, 32)})
  net = inference.load(_write_workdir(config, str(tmp_path / 'run')))
  path = str(tmp_path / 'cat.jpg')
  Image.fromarray(skimage.data.chelsea()).save(path, quality=90)
  result = predict.predictions(net, [path], 'center')[0]
  # Reference: the ImageNet decoding, then by hand: RGB minus the mean, BGR, / std, centre.
  square = common.center_square_resize(tf.constant(open(path, 'rb').read()), 72).numpy()
  x = ((square - np.float32([123, 117, 104]))[..., ::-1] / np.float32([50, 60, 70]))[2:69, 2:69]
  probs = _softmax(np.asarray(net.model.apply({'params': net.params}, x[None], train=False)))[0]
  assert [c for c, _, _ in result['top5']] == list(np.argsort(-probs, kind='stable')[:5])
  np.testing.assert_allclose([p for _, _, p in result['top5']], np.sort(probs)[::-1][:5],
                             rtol=1e-5)
  assert result['top5'][0][1] == imagenet.class_names()[result['top5'][0][0]]
  shown = data.pixels(net.config, x, net.stats)  # the input back to RGB pixels
  np.testing.assert_allclose(shown, np.round(square[2:69, 2:69]), atol=1)
  fig3 = figures.figure3(net, str(tmp_path))
  kernel = np.asarray(net.params['conv1']['kernel'])[:, :, ::-1]  # BGR network, shown RGB
  np.testing.assert_allclose([t['colour_score'] for t in fig3['towers']],
                             figures.tower_scores(kernel, 2))
  assert all(0.5 < t['colour_score'] < 0.8 for t in fig3['towers'])  # random: about 2/3
  assert (tmp_path / 'figure3.png').exists()
