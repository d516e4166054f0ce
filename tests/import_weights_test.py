"""Importing published AlexNet weights (alexnet_jax/tools/import_weights.py).

Each source is a file this test writes in the source's own format, with random
weights: a torchvision-layout module saved by torch.save, Caffe models built
with the runtime caffe.proto messages (both layouts), and a graph shaped as the
ONNX zoo's bvlcalexnet. The imported network must give the source's logits on
real photos, each prepared by the source's own preprocessing, while our model
reads the same pixels as its config.json describes them (channel order, mean,
std, mean image). Tolerance: 1e-4 of the largest logit; the two sides sum in
different orders in float32 (about 1e-6 relative per layer), while a wrong
layout, permutation, pad or LRN convention moves logits by percents.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper
from onnx import numpy_helper
import onnxruntime
import pytest
import skimage.data
import skimage.transform
import sklearn.datasets
import torch
from torch import nn

from conftest import REPO, needs_cpu_kernels, make_model, set_keys, tiny_fashion_config
from alexnet_jax import backend
from alexnet_jax import checkpointing
from alexnet_jax import config_lib
from alexnet_jax import model as model_lib
from alexnet_jax import ops as ops_lib
from alexnet_jax import optim
from alexnet_jax import train
from alexnet_jax.tools import caffe_pb
from alexnet_jax.tools import import_weights as iw

FULL = dict(features=(96, 256, 384, 384, 256), fc=(4096, 4096))   # bvlc_alexnet
NARROW = dict(features=(8, 16, 24, 24, 16), fc=(32, 32))          # same shape, cheap
TOLERANCE = 1e-4


# ------------------------------------------------------------------ photos


@pytest.fixture(scope='module')
def photos():
  """Three real photos, RGB uint8, of different sizes and aspect ratios."""
  flower = sklearn.datasets.load_sample_images().images[1]
  return [skimage.data.astronaut(), skimage.data.chelsea(), flower]


def _resize(image, shape):
  return skimage.transform.resize(image.astype(np.float64), shape, order=1,
                                  preserve_range=True, anti_aliasing=False)


def _center(image, size):
  top, left = (image.shape[0] - size) // 2, (image.shape[1] - size) // 2
  return image[top:top + size, left:left + size]


def _shorter_side(image, size):
  h, w = image.shape[:2]
  s = size / min(h, w)
  return _resize(image, (round(h * s), round(w * s)))


def described_input(config, crop_rgb, mean_image=None):
  """The network input that config.json describes, from a 0-255 RGB crop (H, W, 3)."""
  d = config.dataset
  x = crop_rgb[..., ::-1] if d.channel_order == 'bgr' else crop_rgb
  mean = _center(mean_image, d.image_size) if d.mean_mode == 'image' else np.asarray(d.mean)
  return ((x - mean) / np.asarray(d.std)).astype(np.float32)


# ------------------------------------------------------------------ source networks


class TorchvisionAlexNet(nn.Module):
  """torchvision.models.alexnet's module layout (torchvision does not import here)."""

  def __init__(self):
    super().__init__()
    self.features = nn.Sequential(
        nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
    self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
    self.classifier = nn.Sequential(
        nn.Dropout(), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True), nn.Dropout(),
        nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, 1000))

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def caffe_weights(features, fc, seed=0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """bvlc_alexnet's layers with random weights, Caffe's shapes (conv2, 4, 5 in 2 groups)."""
  rng = np.random.default_rng(seed)
  f = features
  shapes = {'conv1': (f[0], 3, 11, 11), 'conv2': (f[1], f[0] // 2, 5, 5),
            'conv3': (f[2], f[1], 3, 3), 'conv4': (f[3], f[2] // 2, 3, 3),
            'conv5': (f[4], f[3] // 2, 3, 3), 'fc6': (fc[0], f[4] * 36),
            'fc7': (fc[1], fc[0]), 'fc8': (1000, fc[1])}
  out = {}
  for name, shape in shapes.items():
    # Uniform with He's variance 2 / fan_in (uniform draws are the cheaper ones).
    half_width = np.float32(np.sqrt(6.0 / np.prod(shape[1:])))
    kernel = rng.random(shape, np.float32)
    kernel -= np.float32(0.5)
    kernel *= 2 * half_width
    out[name] = (kernel, (rng.standard_normal(shape[0]) * 0.1).astype(np.float32))
  return out


class CaffeAlexNet(nn.Module):
  """bvlc_alexnet rebuilt in torch: groups 2, LRN k=1 (torch's also divides alpha by size),
  Caffe's ceil-rounded pooling."""

  def __init__(self, weights):
    super().__init__()
    conv = lambda n, **kw: nn.Conv2d(weights[n][0].shape[1] * kw.get('groups', 1),
                                     weights[n][0].shape[0], weights[n][0].shape[2], **kw)
    lrn = lambda: nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)
    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)
    self.features = nn.Sequential(
        conv('conv1', stride=4), nn.ReLU(), lrn(), pool(),
        conv('conv2', padding=2, groups=2), nn.ReLU(), lrn(), pool(),
        conv('conv3', padding=1), nn.ReLU(), conv('conv4', padding=1, groups=2), nn.ReLU(),
        conv('conv5', padding=1, groups=2), nn.ReLU(), pool())
    self.classifier = nn.Sequential(
        nn.Linear(*weights['fc6'][0].shape[::-1]), nn.ReLU(),
        nn.Linear(*weights['fc7'][0].shape[::-1]), nn.ReLU(),
        nn.Linear(*weights['fc8'][0].shape[::-1]))
    layers = [m for m in self.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
      for layer, name in zip(layers, weights):
        layer.weight.copy_(torch.from_numpy(weights[name][0]))
        layer.bias.copy_(torch.from_numpy(weights[name][1]))
    self.eval()

  def forward(self, x):
    return self.classifier(torch.flatten(self.features(x), 1))


def torch_logits(module, inputs_NHWC):
  with torch.no_grad():
    return module(torch.from_numpy(np.ascontiguousarray(inputs_NHWC.transpose(0, 3, 1, 2)))
                  ).numpy()


# ------------------------------------------------------------------ files in the sources' formats


def _add_blob(layer, array, legacy: bool):
  blob = layer.blobs.add()
  if legacy:  # V1 files: 4-D num/channels/height/width, (1, 1, out, in) for inner products
    shape = (1,) * (4 - array.ndim) + array.shape
    blob.num, blob.channels, blob.height, blob.width = shape
  else:
    blob.shape.dim.extend(array.shape)
  blob.data.append(np.ascontiguousarray(array, '<f4').tobytes())  # Caffe's packed floats


def write_caffemodel(path, weights, *, legacy: bool, caffenet_order: bool = False):
  """bvlc_alexnet's train_val net with `weights`, in the V1 (`layers`) or current layout."""
  net = caffe_pb.NetParameter(name='AlexNet')
  types = {v: k for k, v in caffe_pb.V1_LAYER_TYPES.items()}

  def add(name, kind, **params):
    layer = net.layers.add(name=name, type=types[kind]) if legacy else net.layer.add(
        name=name, type=kind)
    for field, values in params.items():
      message = getattr(layer, field)
      for key, value in values.items():
        if isinstance(value, list):
          getattr(message, key).extend(value)
        else:
          setattr(message, key, value)
    if name in weights:
      _add_blob(layer, weights[name][0], legacy)
      _add_blob(layer, weights[name][1], legacy)
    return layer

  for phase in (0, 1):
    data = add('data', 'Data', transform_param={'crop_size': 227, 'mirror': phase == 0})
    data.include.add(phase=phase)
  lrn = {'local_size': 5, 'alpha': 1e-4, 'beta': 0.75}
  pool = {'pool': 0, 'kernel_size': 3, 'stride': 2}
  for i, (pad, group) in enumerate([(0, 1), (2, 2), (1, 1), (1, 2), (1, 2)], start=1):
    name = f'conv{i}'
    conv = {'num_output': weights[name][0].shape[0], 'kernel_size': [weights[name][0].shape[2]],
            'group': group}
    conv.update({'pad': [pad]} if pad else {})
    conv.update({'stride': [4]} if i == 1 else {})
    add(name, 'Convolution', convolution_param=conv)
    add(f'relu{i}', 'ReLU')
    if i <= 2 and caffenet_order:
      add(f'pool{i}', 'Pooling', pooling_param=pool)
      add(f'norm{i}', 'LRN', lrn_param=lrn)
    elif i <= 2:
      add(f'norm{i}', 'LRN', lrn_param=lrn)
      add(f'pool{i}', 'Pooling', pooling_param=pool)
  add('pool5', 'Pooling', pooling_param=pool)
  for i in (6, 7, 8):
    add(f'fc{i}', 'InnerProduct',
        inner_product_param={'num_output': weights[f'fc{i}'][0].shape[0]})
    if i < 8:
      add(f'relu{i}', 'ReLU')
      add(f'drop{i}', 'Dropout', dropout_param={'dropout_ratio': 0.5})
  add('accuracy', 'Accuracy').include.add(phase=1)
  add('loss', 'SoftmaxWithLoss')
  with open(path, 'wb') as f:
    f.write(net.SerializeToString())


def write_mean_file(path, mean_bgr_chw):
  blob = caffe_pb.BlobProtoFloats(num=1, channels=3, height=mean_bgr_chw.shape[1],
                                  width=mean_bgr_chw.shape[2])
  blob.data.extend(mean_bgr_chw.reshape(-1).tolist())
  with open(path, 'wb') as f:
    f.write(blob.SerializeToString())


def zoo_alexnet_onnx(weights, *, pool_pads=(0, 0, 1, 1)) -> onnx.ModelProto:
  """A graph as the ONNX zoo's bvlcalexnet-12 (Caffe -> Caffe2 -> ONNX): input data_0
  1x3x224x224; pools with explicit pads reproducing Caffe's ceil rounding; Reshape,
  Gemm with transB=1, Dropout, Softmax."""
  inits, nodes = [], []

  def init(name, array):
    inits.append(numpy_helper.from_array(np.asarray(array), name))
    return name

  x = 'data_0'
  for i, (pad, group) in enumerate([(0, 1), (2, 2), (1, 1), (1, 2), (1, 2)], start=1):
    w, b = weights[f'conv{i}']
    nodes.append(helper.make_node(
        'Conv', [x, init(f'conv{i}_w_0', w), init(f'conv{i}_b_0', b)], [f'conv{i}_1'],
        kernel_shape=list(w.shape[2:]), strides=[4, 4] if i == 1 else [1, 1],
        pads=[pad] * 4, group=group, dilations=[1, 1], name=f'conv{i}_1'))
    nodes.append(helper.make_node('Relu', [f'conv{i}_1'], [f'conv{i}_2']))
    x = f'conv{i}_2'
    if i <= 2:
      nodes.append(helper.make_node('LRN', [x], [f'norm{i}_1'], size=5, alpha=1e-4, beta=0.75,
                                    bias=1.0))
      x = f'norm{i}_1'
    if i in (1, 2, 5):
      nodes.append(helper.make_node('MaxPool', [x], [f'pool{i}_1'], kernel_shape=[3, 3],
                                    strides=[2, 2], pads=list(pool_pads), name=f'pool{i}_1'))
      x = f'pool{i}_1'
  flat = weights['fc6'][0].shape[1]
  nodes.append(helper.make_node('Reshape', [x, init('OC2_DUMMY_1', np.array([1, flat]))],
                                ['OC2_DUMMY_0']))
  x = 'OC2_DUMMY_0'
  for i in (6, 7, 8):
    w, b = weights[f'fc{i}']
    nodes.append(helper.make_node('Gemm', [x, init(f'fc{i}_w_0', w), init(f'fc{i}_b_0', b)],
                                  [f'fc{i}_1'], transB=1, name=f'fc{i}_1'))
    x = f'fc{i}_1'
    if i < 8:
      nodes.append(helper.make_node('Relu', [x], [f'fc{i}_2']))
      nodes.append(helper.make_node('Dropout', [f'fc{i}_2'], [f'fc{i}_3']))
      x = f'fc{i}_3'
  nodes.append(helper.make_node('Softmax', [x], ['prob_1']))
  graph = helper.make_graph(
      nodes, 'bvlcalexnet',
      [helper.make_tensor_value_info('data_0', TensorProto.FLOAT, [1, 3, 224, 224])],
      [helper.make_tensor_value_info('prob_1', TensorProto.FLOAT, [1, 1000]),
       # The logits, for the comparison (the zoo's graph outputs only prob_1).
       helper.make_tensor_value_info('fc8_1', TensorProto.FLOAT, [1, 1000])],
      initializer=inits)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 12)])
  model.ir_version = 7
  return model


# ------------------------------------------------------------------ loading a workdir


def _update(config, saved: dict):
  for key, value in saved.items():
    if isinstance(value, dict):
      _update(config[key], value)
    elif isinstance(value, list):
      config[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    else:
      config[key] = value


def load_run(workdir):
  """A workdir as the project's tools load it: base_config() + config.json, the model, the
  newest checkpoint restored into the TrainState template."""
  config = config_lib.base_config()
  _update(config, checkpointing.read_json(os.path.join(workdir, 'config.json')))
  model = model_lib.create_model(config, backend.select_ops(config.conv_impl, config.dtype))
  template = train.create_train_state(config, model, optim.create_optimizer(config.optimizer))
  state, _ = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints')).restore_latest(
      template)
  return config, model, state


def model_logits(config, params, inputs):
  model = model_lib.create_model(config, backend.select_ops(config.conv_impl, config.dtype))
  return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
      params, inputs))


def assert_same_logits(ours, reference):
  scale = np.abs(reference).max()
  assert np.ptp(reference, axis=0).max() > 1e-3 * scale  # the photos are told apart
  error = np.abs(ours - reference).max()
  assert error <= TOLERANCE * scale, (error, scale)


# ------------------------------------------------------------------ the three sources


def test_torchvision_state_dict_gives_the_logits_of_torchvisions_network(tmp_path, photos):
  torch.manual_seed(0)
  source = TorchvisionAlexNet().eval()
  weights = tmp_path / 'alexnet.pth'
  torch.save(source.state_dict(), weights)
  imported = iw.convert('torchvision', str(weights))
  config, record = imported.config, imported.record
  d, m = config.dataset, config.model
  assert (d.name, d.num_classes, d.image_size, d.resize_size) == ('imagenet2012', 1000, 224, 256)
  assert (d.channel_order, d.mean_mode) == ('rgb', 'constant')
  assert m.towers == 1 and not m.lrn.enabled and m.pool_padding == 'VALID'
  assert tuple(m.features) == (64, 192, 384, 256, 256) and m.conv1_padding == 2
  assert record['weights']['sha256'] == hashlib.sha256(weights.read_bytes()).hexdigest()
  assert record['layers']['conv2']['from'] == ['features.3.weight', 'features.3.bias']
  assert record['layers']['fc6']['source_shape'] == [4096, 9216]

  crops = [_center(_shorter_side(p, 256), 224) for p in photos]
  mean, std = np.array(iw.TORCHVISION_MEAN), np.array(iw.TORCHVISION_STD)
  theirs = np.stack([(c / 255.0 - mean) / std for c in crops]).astype(np.float32)
  ours = np.stack([described_input(config, c) for c in crops])
  assert_same_logits(model_logits(config, imported.params, ours), torch_logits(source, theirs))


@pytest.fixture(scope='module')
def full_caffe_weights():
  return caffe_weights(**FULL)


def test_caffe_v1_model_gives_the_logits_of_caffes_network(tmp_path, photos, full_caffe_weights):
  path = tmp_path / 'bvlc_alexnet.caffemodel'
  write_caffemodel(path, full_caffe_weights, legacy=True)
  imported = iw.convert('caffe', str(path))
  config = imported.config
  d, m = config.dataset, config.model
  assert (d.image_size, d.channel_order, tuple(d.mean)) == (227, 'bgr', iw.CAFFE_MEAN_BGR)
  assert m.towers == 2 and m.pool_padding == 'VALID' and tuple(m.fc_features) == (4096, 4096)
  assert (m.lrn.k, m.lrn.alpha, m.lrn.beta, m.lrn.size) == (1.0, 1e-4, 0.75, 5)
  assert m.lrn.alpha_over_size and m.lrn.across_towers
  assert imported.record['format'] == 'NetParameter.layers (V1)'

  crops = [_center(_resize(p, (256, 256)), 227) for p in photos]  # Caffe warps to 256x256
  theirs = np.stack([c[..., ::-1] - np.array(iw.CAFFE_MEAN_BGR) for c in crops]).astype(
      np.float32)
  ours = np.stack([described_input(config, c) for c in crops])
  assert_same_logits(model_logits(config, imported.params, ours),
                     torch_logits(CaffeAlexNet(full_caffe_weights), theirs))


def test_onnx_zoo_graph_gives_onnxruntime_logits(tmp_path, photos, full_caffe_weights):
  path = tmp_path / 'bvlcalexnet-12.onnx'
  onnx.save(zoo_alexnet_onnx(full_caffe_weights), path)
  imported = iw.convert('onnx', str(path))
  config = imported.config
  # At 224, conv1 gives 54x54 maps: Caffe's rounding makes 27 windows of them.
  assert (config.dataset.image_size, config.model.pool_padding) == (224, 'CEIL')
  assert config.model.towers == 2 and config.model.lrn.across_towers

  crops = [_center(_resize(p, (256, 256)), 224) for p in photos]
  theirs = [(c[..., ::-1] - np.array(iw.CAFFE_MEAN_BGR)).astype(np.float32) for c in crops]
  session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
  reference = np.concatenate([session.run(['fc8_1'], {'data_0': t.transpose(2, 0, 1)[None]})[0]
                              for t in theirs])
  ours = np.stack([described_input(config, c) for c in crops])
  assert_same_logits(model_logits(config, imported.params, ours), reference)


def test_command_line_writes_a_workdir_the_tools_load(tmp_path, photos):
  """A current-layout .caffemodel and a mean file, through the command line; the workdir
  loads as the project's tools load a run, and gives Caffe's logits."""
  weights = caffe_weights(**NARROW, seed=1)
  path, mean_path = tmp_path / 'net.caffemodel', tmp_path / 'imagenet_mean.binaryproto'
  write_caffemodel(path, weights, legacy=False)
  mean_chw = np.random.default_rng(2).uniform(60, 160, (3, 256, 256)).astype(np.float32)
  write_mean_file(mean_path, mean_chw)
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.tools.import_weights', '--source=caffe',
       f'--weights={path}', f'--mean_file={mean_path}', f'--workdir={workdir}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'Imported caffe weights' in result.stdout and '2 tower(s)' in result.stdout
  assert sorted(os.listdir(workdir)) == ['checkpoints', 'config.json', 'import.json',
                                         'stats_256.npz']

  config, _, state = load_run(str(workdir))
  d = config.dataset
  assert (d.mean_mode, d.stats_dir, d.resize_size) == ('image', str(workdir), 256)
  stats = np.load(workdir / 'stats_256.npz')
  np.testing.assert_array_equal(stats['mean_image'], mean_chw.transpose(1, 2, 0))  # BGR, HWC
  assert str(stats['channel_order']) == 'bgr'  # the pipeline's files are RGB unless they say
  record = json.loads((workdir / 'import.json').read_text())
  assert record['format'] == 'NetParameter.layer'
  assert record['mean_file']['sha256'] == hashlib.sha256(mean_path.read_bytes()).hexdigest()

  warped = [_resize(p, (256, 256)) for p in photos]
  mean_hwc = mean_chw.transpose(1, 2, 0)
  theirs = np.stack([_center(w[..., ::-1] - mean_hwc, 227) for w in warped]).astype(np.float32)
  ours = np.stack([described_input(config, _center(w, 227), stats['mean_image'])
                   for w in warped])
  assert_same_logits(model_logits(config, state.params, ours),
                     torch_logits(CaffeAlexNet(weights), theirs))


# ------------------------------------------------------------------ pieces


def test_blobs_read_as_bytes_equal_caffe_proto_floats():
  values = np.random.default_rng(0).standard_normal(2 * 3 * 4 * 5).astype(np.float32)
  typed = caffe_pb.BlobProtoFloats(num=2, channels=3, height=4, width=5)
  typed.data.extend(values.tolist())
  blob = caffe_pb.BlobProto()
  blob.ParseFromString(typed.SerializeToString())
  np.testing.assert_array_equal(caffe_pb.blob_array(blob, 'b'), values.reshape(2, 3, 4, 5))
  typed = caffe_pb.BlobProtoFloats()
  typed.shape.dim.extend([4, 30])
  typed.double_data.extend(values.astype(np.float64).tolist())
  blob.Clear()
  blob.ParseFromString(typed.SerializeToString())
  np.testing.assert_array_equal(caffe_pb.blob_array(blob, 'b'), values.reshape(4, 30))


@pytest.mark.parametrize('size,window,stride,pads', [
    (54, 3, 2, (0, 1)), (55, 3, 2, (0, 0)), (27, 3, 2, (0, 0)), (6, 3, 2, (0, 1)),
    (5, 1, 3, (0, 0))])  # the last: ceil gives a window starting past the end; dropped
def test_ceil_pooling_is_pytorchs_ceil_mode(size, window, stride, pads):
  assert ops_lib.pool_pads(size, window, stride, 'CEIL') == pads
  x = np.random.default_rng(size).standard_normal((2, size, size, 3)).astype(np.float32)
  ours = np.asarray(ops_lib.max_pool(x, window, stride, 'CEIL'))
  theirs = nn.functional.max_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), window, stride,
                                    ceil_mode=True).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_array_equal(ours, theirs)


def _numpy_lrn(a, size, k, alpha, beta, blocks):
  """Cross-channel LRN with alpha / size, windows clipped to each of `blocks` channel blocks."""
  c = a.shape[-1]
  width = c // blocks
  out = np.empty_like(a)
  for j in range(c):
    lo = max(j - size // 2, j // width * width)
    hi = min(j + (size - 1) // 2, (j // width + 1) * width - 1)
    out[..., j] = a[..., j] / (k + alpha / size * np.sum(a[..., lo:hi + 1] ** 2, -1)) ** beta
  return out


@pytest.mark.parametrize('conv_impl', ['xla', pytest.param('onednn', marks=needs_cpu_kernels)])
def test_lrn_across_towers_spans_all_maps_of_the_layer(conv_impl):
  config = set_keys(tiny_fashion_config(), {
      'conv_impl': conv_impl, 'model.towers': 2, 'model.conv1_stride': 1,
      'model.conv1_padding': 0, 'model.kernel_sizes': (3, 3, 3, 3, 3),
      'model.features': (8, 8, 8, 8, 8), 'model.pool_window': 1, 'model.pool_stride': 1,
      'model.lrn.enabled': True, 'model.lrn.size': 5,
      'model.lrn.k': 1.0, 'model.lrn.alpha': 2.0, 'model.lrn.beta': 0.75,
      'model.lrn.alpha_over_size': True, 'dataset.image_size': 9})
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 9, 9, 1)).astype(np.float32)
  shapes = jax.eval_shape(functools.partial(make_model(config).init, train=False),
                          jax.random.key(0), x)['params']
  params = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  outputs = {}
  for across in (False, True):
    config.model.lrn.across_towers = across
    apply = functools.partial(make_model(config).apply, train=False,
                              capture_intermediates=True)
    _, state = jax.jit(apply)({'params': params}, x)
    outputs[across] = np.asarray(state['intermediates']['conv1']['__call__'][0])
  kernel, bias = (np.asarray(params['conv1'][n]) for n in ('kernel', 'bias'))
  windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))  # b,h,w,c,i,j
  pre = np.einsum('bhwcij,ijco->bhwo', windows, kernel) + bias
  a = np.maximum(pre, 0)
  # Tiny pools of 1x1: conv1's block is relu and LRN alone.
  for across, blocks in ((True, 1), (False, 2)):
    np.testing.assert_allclose(outputs[across], _numpy_lrn(a, 5, 1.0, 2.0, 0.75, blocks),
                               rtol=2e-5, atol=1e-6)
  assert np.abs(outputs[True] - outputs[False]).max() > 1e-2 * np.abs(outputs[True]).max()


# ------------------------------------------------------------------ refusals naming the layer


def _narrow_torchvision_state():
  rng = np.random.default_rng(0)
  shapes = {'features.0': (8, 3, 11, 11), 'features.3': (16, 8, 5, 5),
            'features.6': (24, 16, 3, 3), 'features.8': (16, 24, 3, 3),
            'features.10': (16, 16, 3, 3), 'classifier.1': (32, 16 * 36),
            'classifier.4': (32, 32), 'classifier.6': (1000, 32)}
  state = {}
  for key, shape in shapes.items():
    state[f'{key}.weight'] = rng.standard_normal(shape).astype(np.float32)
    state[f'{key}.bias'] = rng.standard_normal(shape[0]).astype(np.float32)
  return state


@pytest.mark.parametrize('change,words', [
    (lambda s: s.pop('features.3.weight'), ['conv2', 'features.3.weight']),
    (lambda s: s.update({'features.6.weight': np.zeros((24, 12, 3, 3), np.float32)}),
     ['conv3 (features.6)', '[24, 12, 3, 3]', 'gives 16']),
    (lambda s: s.update({'classifier.4.bias': np.zeros(31, np.float32)}),
     ['fc7 (classifier.4)', 'bias']),
    (lambda s: s.update({'features.1.running_mean': np.zeros(8, np.float32)}),
     ['features.1.running_mean']),
])
def test_a_state_dict_that_is_not_torchvisions_alexnet_is_refused(tmp_path, change, words):
  state = _narrow_torchvision_state()
  iw.convert('torchvision', _save_npz(tmp_path, state))  # the narrow network itself imports
  change(state)
  with pytest.raises(iw.WeightsError) as error:
    iw.convert('torchvision', _save_npz(tmp_path, state))
  message = str(error.value)
  assert '\n' not in message and all(w in message for w in words), message


def _save_npz(tmp_path, state):
  path = tmp_path / 'state.npz'
  np.savez(path, **state)
  return str(path)


def test_caffe_models_the_network_cannot_express_are_refused(tmp_path):
  weights = caffe_weights(**NARROW)
  path = tmp_path / 'net.caffemodel'
  write_caffemodel(path, weights, legacy=True, caffenet_order=True)
  with pytest.raises(iw.WeightsError, match=r'norm1: an LRN after the pooling \(the order of '
                                            'CaffeNet'):
    iw.convert('caffe', str(path))
  weights['conv4'] = (weights['conv4'][0][:, :10], weights['conv4'][1])
  write_caffemodel(path, weights, legacy=False)
  with pytest.raises(iw.WeightsError, match=r'conv4 \(conv4\): weights of shape \[24, 10, 3, 3\] '
                                            r'in 2 group\(s\) take 20 input maps'):
    iw.convert('caffe', str(path))


def test_onnx_pools_no_pool_padding_reproduces_are_refused(tmp_path):
  path = tmp_path / 'net.onnx'
  onnx.save(zoo_alexnet_onnx(caffe_weights(**NARROW), pool_pads=(1, 1, 1, 1)), path)
  with pytest.raises(iw.WeightsError, match='pool1_1 on 54x54 maps: pads'):
    iw.convert('onnx', str(path))


def test_a_non_empty_workdir_is_refused_before_reading_anything(tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match='is not empty: pass a new or empty folder'):
    iw.import_weights('torchvision', str(tmp_path / 'absent.pth'), str(workdir))
  assert os.listdir(workdir) == ['notes.txt']
