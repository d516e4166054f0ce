"""Published AlexNet weights as a workdir of this project: torchvision, Caffe, ONNX.

  python -m alexnet_jax.tools.import_weights --source=torchvision \\
      --weights=alexnet-owt-7be5be79.pth --workdir=runs/torchvision_alexnet
  python -m alexnet_jax.tools.import_weights --source=caffe \\
      --weights=bvlc_alexnet.caffemodel [--mean_file=imagenet_mean.binaryproto] \\
      --workdir=runs/bvlc_alexnet
  python -m alexnet_jax.tools.import_weights --source=onnx \\
      --weights=bvlcalexnet-12.onnx --workdir=runs/bvlcalexnet_onnx

The new (or empty) workdir then holds what a trained run leaves, so that the
project's tools load it as they load any run (the config: `base_config()`
updated with config.json; the model: `model.create_model(config)`; the
parameters: `checkpointing.Checkpointer(DIR/checkpoints).restore_latest` of
the `train.create_train_state` template):
  config.json   the network of the source (towers, widths, kernel sizes,
                strides, pads, LRN and its convention, pooling) and its input:
                image_size, resize_size, channel order and normalisation;
  checkpoints/  the train state at step 0 with the source's parameters;
  import.json   where they came from: source, file, its sha256, the layer
                mapping (source names and shapes -> parameters of the model);
  stats_<R>.npz with --mean_file: the mean image, where the data pipeline
                reads it for dataset.mean_mode='image' (dataset.stats_dir).

The input the imported network sees is (image - mean) / std, with the image in
0-255 pixel units and in the colour order `dataset.channel_order`, and
dataset.mean, dataset.std and the mean image given in that same order.

The sources:
  torchvision  `alexnet`'s state dict (`features.{0,3,6,8,10}`,
               `classifier.{1,4,6}`), a torch.save file read without torch
               (a zip of pickled storages, unpickled with only the few
               classes a state dict holds), or an .npz of the same keys. One
               tower, 64-192-384-256-256 kernels, no LRN; 224x224 inputs
               (a 256 resize), normalised with ImageNet's RGB mean and std.
               Its AdaptiveAvgPool2d((6, 6)) is the identity on the 6x6 maps
               of a 224 input, so the model has no counterpart: other input
               sizes are refused.
  caffe        a .caffemodel (bvlc_alexnet), both the V1 `layers` and the
               current `layer` layouts (`caffe_pb`): two towers where conv2,
               conv4 and conv5 have 2 groups, LRN with alpha / size whose
               windows span all maps of the layer (Caffe's LRN sees both
               groups), Caffe's ceil-rounded pooling (exactly VALID at 227),
               227x227 BGR inputs in 0-255 minus the mean (104, 117, 123) or
               the --mean_file image.
  onnx         the model zoo's bvlcalexnet-12.onnx (Caffe's network via Caffe2):
               the attributes of its Conv, LRN, MaxPool and Gemm nodes are
               read, not assumed; its input size is the graph's (224), where
               the pads of its pools reproduce Caffe's ceil rounding
               (model.pool_padding='CEIL'); preprocessing as Caffe's.
Every source's fc6 takes conv5's maps flattened as (C, H, W); the model
flattens NHWC maps as (H, W, C), so fc6's rows are permuted. Convolution
kernels go from (out, in / groups, kh, kw) to (kh, kw, in / groups, out),
keeping the order of the groups, which is the model's order of its towers.
A source the model cannot express exactly (another layer order, pads,
strides, groups, pooling) is refused with one line naming the layer.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import os
import pickle
import shutil
import zipfile
from typing import Any, Callable, NoReturn

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import onnx
from onnx import numpy_helper
import tqdm

from alexnet_jax import backend
from alexnet_jax import checkpointing
from alexnet_jax import cli
from alexnet_jax import config_lib
from alexnet_jax import model as model_lib
from alexnet_jax import ops as ops_lib
from alexnet_jax import optim
from alexnet_jax import train
from alexnet_jax.data import imagenet
from alexnet_jax.tools import caffe_pb

SOURCES = ('torchvision', 'caffe', 'onnx')
NUM_CLASSES = 1000  # dataset.name='imagenet2012'
# torchvision's `alexnet` transforms: RGB in [0, 1], then these.
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)
# bvlc_alexnet's per-channel mean, BGR, 0-255 (Caffe's ilsvrc_2012_mean, rounded).
CAFFE_MEAN_BGR = (104.0, 117.0, 123.0)


class WeightsError(ValueError):
  """A weight file the model cannot take; the message names the layer and what to pass."""


# ------------------------------------------------------- the layers of a source


@dataclasses.dataclass
class ConvSpec:
  name: str               # the source's name of the layer (for messages and import.json)
  kernel: np.ndarray      # (out, in / groups, kh, kw), as Caffe, ONNX and PyTorch store it
  bias: np.ndarray        # (out,)
  stride: tuple[int, int]
  pads: tuple[int, int, int, int]  # top, left, bottom, right
  groups: int
  sources: tuple[str, ...]  # where kernel and bias came from


@dataclasses.dataclass
class ReluSpec:
  name: str


@dataclasses.dataclass
class LRNSpec:
  """Across channels, a / (k + alpha / size * sum of squares) ** beta: Caffe's, ONNX's, torch's."""
  name: str
  size: int
  alpha: float
  beta: float
  k: float


@dataclasses.dataclass
class PoolSpec:
  """Max pooling; `ceil`: Caffe's rounding of the output size, else floor (ONNX, PyTorch)."""
  name: str
  window: tuple[int, int]
  stride: tuple[int, int]
  pads: tuple[int, int, int, int]  # top, left, bottom, right
  ceil: bool


@dataclasses.dataclass
class AdaptiveAvgPoolSpec:
  """torchvision's AdaptiveAvgPool2d((size, size)): the identity on size x size maps."""
  name: str
  size: int


@dataclasses.dataclass
class FlattenSpec:
  """The maps flattened as (C, H, W); `width`: the flat width the source asks for, if any."""
  name: str
  width: int | None = None


@dataclasses.dataclass
class DenseSpec:
  name: str
  kernel: np.ndarray  # (in, out)
  bias: np.ndarray    # (out,)
  sources: tuple[str, ...]
  source_shape: tuple[int, ...]  # the kernel as the file stores it


@dataclasses.dataclass
class DropoutSpec:
  name: str
  rate: float


def _fail(message: str) -> NoReturn:
  raise WeightsError(message)


def _f32(value) -> float:
  """A float32 field (Caffe, ONNX) as the shortest decimal that is it: 1e-4, not 9.9999997e-05."""
  return float(str(np.float32(value)))


def _as_float32(array, name: str) -> np.ndarray:
  array = np.asarray(array)
  if not np.issubdtype(array.dtype, np.floating) and array.dtype.name != 'bfloat16':
    _fail(f'{name} holds {array.dtype} values, not floats: pass the weights of a trained network')
  return array.astype(np.float32, copy=False)


# ------------------------------------------------------- torchvision (.pth / .npz)

# torch's storage classes -> numpy dtypes of their elements.
_TORCH_STORAGES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': jnp.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """Stands for torch.<X>Storage in the pickle: the dtype of a storage."""
  dtype: Any


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> np.ndarray:
  """torch._utils._rebuild_tensor_v2, into numpy: the view (offset, size, stride) of a storage."""
  del unused  # requires_grad, backward hooks, metadata
  size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
  if any(n == 0 for n in size):
    return np.zeros(size, storage.dtype)
  contiguous = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
  if stride == contiguous and storage_offset == 0 and storage.size == int(np.prod(size)):
    return storage.reshape(size)  # the whole storage, in order: no copy
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if storage_offset < 0 or min(stride, default=0) < 0 or last >= storage.size:
    raise pickle.UnpicklingError('a tensor reaches past the end of its storage')
  view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                         strides=[s * storage.itemsize for s in stride])
  return np.array(view)


def _rebuild_parameter(data, *unused):
  del unused
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  del new_type, state
  return func(*args)


class _TorchTypePlaceholder:
  """torch.Tensor or torch.nn.Parameter named in a pickle: only passed along, never built."""


_TORCH_GLOBALS = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
    ('torch', 'Tensor'): _TorchTypePlaceholder,
    ('torch.nn.parameter', 'Parameter'): _TorchTypePlaceholder,
}


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles a torch.save'd state dict with numpy arrays for tensors.

  Only the globals a state dict of tensors names are resolved; anything else
  (a whole pickled module, arbitrary objects) is refused, so that reading a
  file runs none of its code.
  """

  def __init__(self, file, read_storage: Callable[[str, Any, int], np.ndarray]):
    super().__init__(file)
    self._read_storage = read_storage

  def find_class(self, module, name):
    if module == 'torch' and name in _TORCH_STORAGES:
      return _StorageType(np.dtype(_TORCH_STORAGES[name]))
    if (module, name) in _TORCH_GLOBALS:
      return _TORCH_GLOBALS[(module, name)]
    raise pickle.UnpicklingError(f'it holds {module}.{name}, not a plain state dict of tensors')

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
      raise pickle.UnpicklingError(f'unknown persistent id {str(pid)[:80]}')
    _, storage_type, key, _, numel = pid
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'storage of an unknown type {storage_type!r}')
    return self._read_storage(str(key), storage_type.dtype, int(numel))


def read_torch_file(path: str) -> dict[str, np.ndarray]:
  """The tensors of a torch.save file (zip format) as numpy arrays, by key; torch is not needed."""
  if not zipfile.is_zipfile(path):
    _fail(f'{path} is not a zip-format torch.save file (the format of torch >= 1.6): '
          're-save the state dict with torch.save, or pass an .npz of the same keys')
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('data.pkl')]
    if len(pickles) != 1:
      _fail(f'{path} holds {len(pickles)} data.pkl records, not one: pass a file written '
            'by torch.save(state_dict, path)')
    prefix = pickles[0][:-len('data.pkl')]
    order = '<'
    if f'{prefix}byteorder' in names:
      order = '>' if archive.read(f'{prefix}byteorder').strip() == b'big' else '<'

    def read_storage(key, dtype, numel):
      record = f'{prefix}data/{key}'
      if record not in names:
        raise pickle.UnpicklingError(f'storage {key} is missing')
      data = np.frombuffer(archive.read(record), dtype.newbyteorder(order)
                           if dtype.itemsize > 1 else dtype)
      if data.size < numel:
        raise pickle.UnpicklingError(f'storage {key} holds {data.size} of its {numel} values')
      return data[:numel].astype(dtype, copy=False)

    with archive.open(pickles[0]) as f:
      try:
        obj = _StateDictUnpickler(f, read_storage).load()
      except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        _fail(f'{path} cannot be read as a state dict ({e}): save `model.state_dict()` '
              'with torch.save, or pass an .npz of its tensors')
  if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
    obj = obj['state_dict']  # a training checkpoint holding the state dict
  if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
    _fail(f'{path} holds a {type(obj).__name__}, not a state dict of tensors: save '
          '`model.state_dict()` with torch.save')
  return dict(obj)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """A state dict from a torch.save file or an .npz, keys without DataParallel's 'module.'."""
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as npz:
      state = {k: npz[k] for k in npz.files}
  else:
    state = read_torch_file(path)
  return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}


# torchvision.models.alexnet: (layer, its index in `features` or `classifier`).
_TORCHVISION_CONVS = (('conv1', 0, 4, 2), ('conv2', 3, 1, 2), ('conv3', 6, 1, 1),
                      ('conv4', 8, 1, 1), ('conv5', 10, 1, 1))  # name, index, stride, pad
_TORCHVISION_DENSE = (('fc6', 1), ('fc7', 4), ('fc8', 6))


def torchvision_layers(state: dict[str, np.ndarray]) -> list:
  """torchvision's `alexnet` as layer specs, from its state dict."""
  used = set()

  def tensor(key: str, layer: str) -> np.ndarray:
    if key not in state:
      _fail(f'{layer}: the state dict has no {key}: pass the state dict of torchvision\'s '
            'alexnet (features.{0,3,6,8,10}, classifier.{1,4,6})')
    used.add(key)
    return _as_float32(state[key], key)

  layers = []
  for name, index, stride, pad in _TORCHVISION_CONVS:
    w, b = f'features.{index}.weight', f'features.{index}.bias'
    layers += [ConvSpec(f'features.{index}', tensor(w, name), tensor(b, name), (stride, stride),
                        (pad,) * 4, 1, (w, b)),
               ReluSpec(f'features.{index + 1}')]
    if name in ('conv1', 'conv2', 'conv5'):
      layers.append(PoolSpec(f'features.{index + 2}', (3, 3), (2, 2), (0,) * 4, ceil=False))
  layers += [AdaptiveAvgPoolSpec('avgpool', 6), FlattenSpec('flatten')]
  for i, (name, index) in enumerate(_TORCHVISION_DENSE):
    w, b = f'classifier.{index}.weight', f'classifier.{index}.bias'
    kernel = tensor(w, name)
    if kernel.ndim != 2:
      _fail(f'{name} ({w}): shape {list(kernel.shape)}, not (out, in): pass torchvision\'s '
            'alexnet state dict')
    if i:
      layers.append(ReluSpec(f'classifier.{index - 2}'))
    layers += [DropoutSpec(f'classifier.{index - 1}', 0.5),
               DenseSpec(f'classifier.{index}', kernel.T, tensor(b, name), (w, b),
                         tuple(kernel.shape))]
  unknown = sorted(set(state) - used)
  if unknown:
    _fail(f'the state dict also holds {", ".join(unknown[:5])}, which torchvision\'s alexnet '
          'has not: pass the state dict of torchvision.models.alexnet')
  return layers


# ------------------------------------------------------- Caffe (.caffemodel)

_CAFFE_SKIPPED = ('Data', 'ImageData', 'Input', 'MemoryData', 'DummyData', 'HDF5Data',
                  'WindowData', 'Accuracy', 'SoftmaxWithLoss', 'Softmax', 'Split', 'Silence')


def _caffe_pair(values, h: int, w: int, default: int | None, name: str,
                what: str) -> tuple[int, int]:
  """Caffe's (h, w) of a kernel, stride or pad: its _h / _w fields, or one or two values."""
  values = [int(v) for v in values]
  if h or w:
    return int(h), int(w)
  if len(values) in (1, 2):
    return values[0], values[-1]
  if not values and default is not None:
    return default, default
  _fail(f'{name}: {what} {values} is not one or two values: pass a 2-D network')


def _caffe_blobs(layer: caffe_pb.Layer, count: int) -> list[np.ndarray]:
  if len(layer.blobs) != count:
    _fail(f'{layer.name}: {len(layer.blobs)} parameter blobs, expected {count} (weights'
          f'{" and biases" if count == 2 else ""}): pass a .caffemodel with trained weights')
  return [caffe_pb.blob_array(b, f'{layer.name} blob {i}') for i, b in enumerate(layer.blobs)]


def _caffe_conv(layer: caffe_pb.Layer) -> ConvSpec:
  p = layer.param.convolution_param
  if any(d != 1 for d in p.dilation):
    _fail(f'{layer.name}: dilation {list(p.dilation)}; the model has no dilated convolutions')
  blobs = _caffe_blobs(layer, 2 if p.bias_term else 1)
  kernel = blobs[0]
  if kernel.ndim != 4:
    _fail(f'{layer.name}: weights of shape {list(kernel.shape)}, not (out, in / group, kh, kw)')
  bias = blobs[1].reshape(-1) if p.bias_term else np.zeros(kernel.shape[0], np.float32)
  kh, kw = _caffe_pair(p.kernel_size, p.kernel_h, p.kernel_w, None, layer.name, 'kernel_size')
  if (kh, kw) != kernel.shape[2:]:
    _fail(f'{layer.name}: kernel_size {kh}x{kw} but weights of shape {list(kernel.shape)}')
  if p.HasField('num_output') and p.num_output != kernel.shape[0]:
    _fail(f'{layer.name}: num_output {p.num_output} but weights of shape {list(kernel.shape)}')
  stride = _caffe_pair(p.stride, p.stride_h, p.stride_w, 1, layer.name, 'stride')
  ph, pw = _caffe_pair(p.pad, p.pad_h, p.pad_w, 0, layer.name, 'pad')
  return ConvSpec(layer.name, _as_float32(kernel, layer.name), _as_float32(bias, layer.name),
                  stride, (ph, pw, ph, pw), int(p.group),
                  (f'{layer.name} blob 0', f'{layer.name} blob 1' if p.bias_term else '(none)'))


def _caffe_pool(layer: caffe_pb.Layer) -> PoolSpec:
  p = layer.param.pooling_param
  if p.pool != 0:
    _fail(f'{layer.name}: {"average" if p.pool == 1 else "stochastic"} pooling; the model '
          'max-pools')
  if p.global_pooling:
    _fail(f'{layer.name}: global pooling; the model pools 3x3 windows')
  window = _caffe_pair([p.kernel_size] if p.HasField('kernel_size') else [], p.kernel_h,
                       p.kernel_w, None, layer.name, 'kernel_size')
  stride = _caffe_pair([p.stride], p.stride_h, p.stride_w, 1, layer.name, 'stride')
  ph, pw = _caffe_pair([p.pad], p.pad_h, p.pad_w, 0, layer.name, 'pad')
  return PoolSpec(layer.name, window, stride, (ph, pw, ph, pw), ceil=p.round_mode == 0)


def _caffe_dense(layer: caffe_pb.Layer) -> DenseSpec:
  p = layer.param.inner_product_param
  if p.axis != 1:
    _fail(f'{layer.name}: inner product over axis {p.axis}; the model flattens from axis 1')
  blobs = _caffe_blobs(layer, 2 if p.bias_term else 1)
  kernel = blobs[0]
  shape = kernel.shape
  if kernel.ndim > 2:  # the V1 layout stores (1, 1, out, in)
    if any(n != 1 for n in kernel.shape[:-2]):
      _fail(f'{layer.name}: weights of shape {list(shape)}, not (out, in)')
    kernel = kernel.reshape(kernel.shape[-2:])
  # (out, in), or (in, out) with `transpose`; the model's kernel is (in, out).
  kernel = kernel if p.transpose else kernel.T
  bias = blobs[1].reshape(-1) if p.bias_term else np.zeros(kernel.shape[1], np.float32)
  return DenseSpec(layer.name, _as_float32(kernel, layer.name), _as_float32(bias, layer.name),
                   (f'{layer.name} blob 0', f'{layer.name} blob 1' if p.bias_term else '(none)'),
                   tuple(shape))


def caffe_layers(layers: list[caffe_pb.Layer]) -> list:
  """The layers of a Caffe net as layer specs (the fully connected layers flatten (C, H, W))."""
  specs, flat = [], False
  for layer in layers:
    t = layer.type
    if t in _CAFFE_SKIPPED:
      continue
    if t == 'Convolution':
      specs.append(_caffe_conv(layer))
    elif t == 'ReLU':
      specs.append(ReluSpec(layer.name))
    elif t == 'LRN':
      p = layer.param.lrn_param
      if p.norm_region != 0:
        _fail(f'{layer.name}: LRN within channels; the model normalises across channels')
      specs.append(LRNSpec(layer.name, int(p.local_size), _f32(p.alpha), _f32(p.beta),
                           _f32(p.k)))
    elif t == 'Pooling':
      specs.append(_caffe_pool(layer))
    elif t in ('InnerProduct', 'Flatten'):
      if not flat:  # an inner product on maps flattens them, as a Flatten layer does
        specs.append(FlattenSpec(layer.name if t == 'Flatten' else f'{layer.name} (input)'))
        flat = True
      if t == 'InnerProduct':
        specs.append(_caffe_dense(layer))
    elif t == 'Dropout':
      specs.append(DropoutSpec(layer.name, _f32(layer.param.dropout_param.dropout_ratio)))
    else:
      _fail(f'layer {layer.name!r} is a {t} layer, which the AlexNet model has not: pass '
            'an AlexNet .caffemodel (bvlc_alexnet)')
  return specs


def caffe_input(net, layers: list[caffe_pb.Layer]) -> tuple[int | None, tuple | None]:
  """(input size, per-channel mean) the net itself records, each None if it records none.

  The size: an Input layer's or the net's input shape, else the crop of its
  data layers (bvlc_alexnet: 227); the mean: its data layers' mean_value.
  """
  dims = []
  for layer in layers:
    if layer.type == 'Input' and len(layer.param.input_param.shape):
      dims = list(layer.param.input_param.shape[0].dim)
      break
  if not dims and len(net.input_shape):
    dims = list(net.input_shape[0].dim)
  if not dims and len(net.input_dim) >= 4:
    dims = list(net.input_dim[:4])
  size = None
  if len(dims) == 4:
    if dims[2] != dims[3]:
      _fail(f'the net takes {dims[2]}x{dims[3]} inputs; the model takes square images')
    size = int(dims[3])
  mean = None
  for layer in layers:
    t = layer.param.transform_param
    if layer.type in ('Data', 'ImageData', 'WindowData', 'MemoryData'):
      if size is None and t.crop_size:
        size = int(t.crop_size)
      if mean is None and len(t.mean_value) == 3:
        mean = tuple(_f32(v) for v in t.mean_value)
  return size, mean


def read_mean_file(path: str) -> np.ndarray:
  """A Caffe mean file (BlobProto 1x3xHxW, BGR) as an (H, W, 3) array in BGR order."""
  blob = caffe_pb.parse(caffe_pb.BlobProto, path, 'Caffe mean file (.binaryproto)')
  mean = caffe_pb.blob_array(blob, path)
  while mean.ndim > 3 and mean.shape[0] == 1:
    mean = mean[0]
  if mean.ndim != 3 or mean.shape[0] != 3:
    _fail(f'{path} holds a blob of shape {list(mean.shape)}, not a 3-channel mean image: pass '
          'imagenet_mean.binaryproto')
  if mean.shape[1] != mean.shape[2]:
    _fail(f'{path}: the mean image is {mean.shape[1]}x{mean.shape[2]}; the data pipeline '
          'takes a square one (resize_size x resize_size)')
  return np.ascontiguousarray(mean.transpose(1, 2, 0))


# ------------------------------------------------------- ONNX


def _onnx_attrs(node) -> dict[str, Any]:
  out = {}
  for a in node.attribute:
    value = onnx.helper.get_attribute_value(a)
    out[a.name] = value.decode() if isinstance(value, bytes) else value
  return out


def _onnx_check_auto_pad(attrs, name):
  if attrs.get('auto_pad', 'NOTSET') not in ('NOTSET', 'VALID', ''):
    _fail(f'{name}: auto_pad={attrs["auto_pad"]}; pass a model with explicit pads')


def _onnx_pads(attrs, name) -> tuple[int, int, int, int]:
  """ONNX's pads (top, left, bottom, right) of a 2-D Conv or MaxPool."""
  _onnx_check_auto_pad(attrs, name)
  pads = [int(p) for p in attrs.get('pads', [0, 0, 0, 0])]
  if len(pads) != 4:
    _fail(f'{name}: pads {pads} are not those of a 2-D operation')
  return pads[0], pads[1], pads[2], pads[3]


def onnx_layers(model) -> tuple[list, int | None]:
  """(layer specs, input size or None) of an ONNX AlexNet: a chain of nodes from its one input."""
  graph = model.graph
  values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
  inputs = [i for i in graph.input if i.name not in values]
  if len(inputs) != 1:
    _fail(f'the graph has {len(inputs)} inputs besides its weights ({[i.name for i in inputs]}), '
          'not one image input: pass an AlexNet ONNX model')
  dims = [d.dim_value if d.HasField('dim_value') else None
          for d in inputs[0].type.tensor_type.shape.dim]
  if len(dims) != 4 or dims[1] not in (3, None):
    _fail(f'the input {inputs[0].name} has shape {dims}, not (N, 3, H, W)')
  if dims[2] is not None and dims[2] != dims[3]:
    _fail(f'the input {inputs[0].name} is {dims[2]}x{dims[3]}; the model takes square images')
  size = dims[3]

  def value(node, index: int, what: str) -> np.ndarray:
    if len(node.input) <= index or node.input[index] not in values:
      _fail(f'{node.name or node.op_type}: its {what} is not a stored tensor (an initializer '
            'or Constant): pass a model with constant weights')
    return values[node.input[index]]

  specs, current = [], inputs[0].name
  for node in graph.node:
    name = node.name or f'{node.op_type} -> {node.output[0]}'
    attrs = _onnx_attrs(node)
    if node.op_type == 'Constant':
      if 'value' not in attrs:
        _fail(f'{name}: a Constant without a tensor value; pass a model whose constants are '
              'tensors')
      values[node.output[0]] = numpy_helper.to_array(attrs['value'])
      continue
    if not node.input or node.input[0] != current:
      _fail(f'node {name} does not take the output of the node before it ({current}): the '
            'graph is not a chain of layers as AlexNet\'s')
    current = node.output[0]
    op = node.op_type
    if op == 'Conv':
      kernel = _as_float32(value(node, 1, 'weight'), name)
      bias = (_as_float32(value(node, 2, 'bias'), name) if len(node.input) > 2
              else np.zeros(kernel.shape[0], np.float32))
      if any(d != 1 for d in attrs.get('dilations', [1, 1])):
        _fail(f'{name}: dilations {attrs["dilations"]}; the model has no dilated convolutions')
      shape = attrs.get('kernel_shape', list(kernel.shape[2:]))
      if list(shape) != list(kernel.shape[2:]):
        _fail(f'{name}: kernel_shape {shape} but a weight of shape {list(kernel.shape)}')
      strides = attrs.get('strides', [1, 1])
      specs.append(ConvSpec(name, kernel, bias, (int(strides[0]), int(strides[1])),
                            _onnx_pads(attrs, name), int(attrs.get('group', 1)),
                            tuple(node.input[1:3])))
    elif op == 'Relu':
      specs.append(ReluSpec(name))
    elif op == 'LRN':
      specs.append(LRNSpec(name, int(attrs['size']), _f32(attrs.get('alpha', 1e-4)),
                           _f32(attrs.get('beta', 0.75)), _f32(attrs.get('bias', 1.0))))
    elif op == 'MaxPool':
      if len([o for o in node.output if o]) > 1:
        _fail(f'{name}: MaxPool with an indices output; the model has none')
      if any(d != 1 for d in attrs.get('dilations', [1, 1])):
        _fail(f'{name}: dilations {attrs["dilations"]}; the model pools dense windows')
      window, strides = attrs['kernel_shape'], attrs.get('strides', [1, 1])
      specs.append(PoolSpec(name, (int(window[0]), int(window[1])),
                            (int(strides[0]), int(strides[1])), _onnx_pads(attrs, name),
                            ceil=bool(attrs.get('ceil_mode', 0))))
    elif op in ('Reshape', 'Flatten'):
      if op == 'Flatten' and attrs.get('axis', 1) != 1:
        _fail(f'{name}: Flatten from axis {attrs["axis"]}; the model flattens from axis 1')
      width = None
      if op == 'Reshape':
        target = [int(d) for d in (attrs['shape'] if 'shape' in attrs
                                   else value(node, 1, 'shape'))]
        if len(target) != 2:
          _fail(f'{name}: reshapes to {target}, not (batch, features)')
        width = target[1]
      specs.append(FlattenSpec(name, width))
    elif op == 'Gemm':
      if attrs.get('transA', 0):
        _fail(f'{name}: Gemm with transA=1; the model multiplies untransposed inputs')
      b = _as_float32(value(node, 1, 'weight'), name)
      kernel = b.T if attrs.get('transB', 0) else b
      if attrs.get('alpha', 1.0) != 1.0:
        kernel = kernel * np.float32(attrs['alpha'])
      bias = (_as_float32(value(node, 2, 'bias'), name) * float(attrs.get('beta', 1.0))
              if len(node.input) > 2 else np.zeros(kernel.shape[1], np.float32))
      bias = np.broadcast_to(bias, (kernel.shape[1],)).astype(np.float32)
      specs.append(DenseSpec(name, kernel, bias, tuple(node.input[1:3]), tuple(b.shape)))
    elif op == 'Dropout':
      rate = attrs.get('ratio')
      if rate is None and len(node.input) > 1 and node.input[1] in values:
        rate = float(values[node.input[1]])
      specs.append(DropoutSpec(name, 0.5 if rate is None else _f32(rate)))
    elif op in ('Identity', 'Softmax'):
      pass  # the model outputs logits: a final softmax is left to the tools
    else:
      _fail(f'node {name} is a {op}, which the AlexNet model has not: pass an AlexNet ONNX '
            'model (bvlcalexnet)')
  return specs, size


# ------------------------------------------------------- the model of a source


@dataclasses.dataclass
class Network:
  """What a source's layers make of the model: config.model values and the parameters."""
  model: dict[str, Any]           # keys of config.model
  params: dict[str, dict[str, np.ndarray]]
  layers: dict[str, dict]         # import.json's mapping, by the model's layer name
  map_sizes: list[int]            # after each convolution's block


def _source_pool_windows(n: int, pool: PoolSpec) -> tuple[int, int]:
  """(pad before, number of windows) of a source's pooling of an n-long axis."""
  k, s = pool.window[0], pool.stride[0]
  before, after = pool.pads[0], pool.pads[2]
  span = n + before + after - k
  if span < 0:
    return before, 0
  if not pool.ceil:
    return before, span // s + 1
  out = -(-span // s) + 1
  if (out - 1) * s >= n + before:  # Caffe and PyTorch: the last window starts inside
    out -= 1
  return before, out


def _pool_padding(pools: list[tuple[str, int, PoolSpec]]) -> str:
  """The model.pool_padding giving the source's windows at every pooling (name, map size, spec)."""
  wanted = [_source_pool_windows(n, p) for _, n, p in pools]
  for mode in ops_lib.POOL_PADDINGS:
    ours = []
    for _, n, p in pools:
      before, after = ops_lib.pool_pads(n, p.window[0], p.stride[0], mode)
      ours.append((before, (n + before + after - p.window[0]) // p.stride[0] + 1))
    if ours == wanted:
      return mode
  described = '; '.join(f'{name} on {n}x{n} maps: pads {list(p.pads)}, {out} windows'
                        for (name, n, p), (_, out) in zip(pools, wanted))
  _fail(f'pooling that model.pool_padding cannot express ({described}): none of '
        f'{"/".join(ops_lib.POOL_PADDINGS)} gives these windows')


def _flat_rows_to_hwc(kernel: np.ndarray, c: int, h: int, w: int) -> np.ndarray:
  """fc6's kernel (C*H*W, out), rows in (C, H, W) order, with its rows in (H, W, C) order.

  Permuted as (out, C*H*W), the layout the sources store: one copy of the
  largest layer instead of three.
  """
  by_output = kernel.T  # a view of the stored (out, in) matrix
  return by_output.reshape(-1, c, h, w).transpose(0, 2, 3, 1).reshape(-1, c * h * w).T


def assemble(specs: list, image_size: int) -> Network:
  """The model's config and parameters for a source's layers at `image_size`; fails on any mismatch.

  Expected: five blocks `conv, relu[, lrn][, pool]` with an LRN after conv1
  and conv2 (both or neither, alike) and pools after conv1, conv2 and conv5,
  then a flattening and fully connected layers with ReLUs between them.
  """
  specs = list(specs)
  rates = [s.rate for s in specs if isinstance(s, DropoutSpec)]
  specs = [s for s in specs if not isinstance(s, DropoutSpec)]
  i, blocks = 0, []
  while i < len(specs) and isinstance(specs[i], ConvSpec):
    conv = specs[i]
    i += 1
    if i >= len(specs) or not isinstance(specs[i], ReluSpec):
      _fail(f'{conv.name}: no ReLU right after the convolution; the model has one after each')
    i += 1
    lrn = pool = None
    if i < len(specs) and isinstance(specs[i], LRNSpec):
      lrn, i = specs[i], i + 1
    if i < len(specs) and isinstance(specs[i], PoolSpec):
      pool, i = specs[i], i + 1
    if i < len(specs) and isinstance(specs[i], LRNSpec):
      _fail(f'{specs[i].name}: an LRN after the pooling (the order of CaffeNet, '
            'bvlc_reference_caffenet); the model normalises, then pools')
    blocks.append((conv, lrn, pool))
  if len(blocks) != 5:
    after = f' before {specs[i].name}' if i < len(specs) else ''
    _fail(f'the network has {len(blocks)} convolution blocks{after}; AlexNet has 5')

  lrns = [lrn for _, lrn, _ in blocks]
  for lrn, conv in zip(lrns[2:], blocks[2:]):
    if lrn is not None:
      _fail(f'{lrn.name}: an LRN after {conv[0].name}; the model normalises after conv1 and '
            'conv2 only')
  if (lrns[0] is None) != (lrns[1] is None):
    _fail(f'{blocks[0][0].name} and {blocks[1][0].name}: an LRN after one of them only; the '
          'model has one after both or after neither')

  model: dict[str, Any] = {}
  params, layers, sizes, pools = {}, {}, [], []
  n, channels, groups_of = image_size, 3, {}
  for index, (conv, lrn, pool) in enumerate(blocks):
    name = f'conv{index + 1}'
    where = f'{name} ({conv.name})'
    kernel = conv.kernel
    if kernel.ndim != 4 or kernel.shape[2] != kernel.shape[3]:
      _fail(f'{where}: weights of shape {list(kernel.shape)}, not (out, in, k, k)')
    out, per_group, k = kernel.shape[0], kernel.shape[1], kernel.shape[2]
    g = conv.groups
    if g < 1 or per_group * g != channels or out % g:
      _fail(f'{where}: weights of shape {list(kernel.shape)} in {g} group(s) take '
            f'{per_group * g} input maps; the layer before gives {channels}')
    if conv.bias.shape != (out,):
      _fail(f'{where}: bias of shape {list(conv.bias.shape)}, expected [{out}]')
    if conv.stride[0] != conv.stride[1]:
      _fail(f'{where}: strides {list(conv.stride)}; the model strides both axes alike')
    top, left, bottom, right = conv.pads
    if index == 0:
      if not top == left == bottom == right:
        _fail(f'{where}: pads {list(conv.pads)}; model.conv1_padding pads every side alike')
      model['conv1_stride'], model['conv1_padding'] = conv.stride[0], top
    else:
      if conv.stride[0] != 1:
        _fail(f'{where}: stride {conv.stride[0]}; the model\'s conv2-conv5 have stride 1')
      if conv.pads != (k // 2,) * 4:
        _fail(f'{where}: pads {list(conv.pads)}; the model pads {k}x{k} kernels by {k // 2} '
              'on every side')
    if index in (0, 2) and g != 1:
      _fail(f'{where}: {g} groups; the model\'s {name} sees the maps of both towers')
    if index in (1, 3, 4):
      groups_of[name] = g
    n = (n + top + bottom - k) // conv.stride[0] + 1
    if n < 1:
      _fail(f'{where}: no output at image size {image_size}')
    if lrn is not None:
      if lrn.size % 2 == 0:
        _fail(f'{lrn.name}: LRN over {lrn.size} maps; the model\'s windows are centred, of an '
              'odd size')
      if index == 1 and dataclasses.astuple(lrn)[1:] != dataclasses.astuple(blocks[0][1])[1:]:
        _fail(f'{lrn.name}: LRN {dataclasses.astuple(lrn)[1:]} differs from conv1\'s '
              f'{dataclasses.astuple(blocks[0][1])[1:]}; the model has one LRN setting')
    if (pool is not None) != (index in (0, 1, 4)):
      _fail(f'{where}: {"a" if pool else "no"} pooling after {name}; the model pools after '
            'conv1, conv2 and conv5')
    if pool is not None:
      if pool.window[0] != pool.window[1] or pool.stride[0] != pool.stride[1]:
        _fail(f'{pool.name}: {list(pool.window)} windows, strides {list(pool.stride)}; the '
              'model pools square windows with equal strides')
      if (pool.pads[0], pool.pads[2]) != (pool.pads[1], pool.pads[3]):
        _fail(f'{pool.name}: pads {list(pool.pads)} differ between the axes; the model pools '
              'both axes alike')
      first = blocks[0][2]
      if (pool.window, pool.stride) != (first.window, first.stride):
        _fail(f'{pool.name}: {pool.window[0]}x{pool.window[0]} windows, stride '
              f'{pool.stride[0]}, but {first.name} has {first.window[0]}x{first.window[0]}, '
              f'stride {first.stride[0]}; the model pools alike everywhere')
      pools.append((pool.name, n, pool))
      _, n = _source_pool_windows(n, pool)
      if n < 1:
        _fail(f'{pool.name}: no output at image size {image_size}')
    sizes.append(n)
    params[name] = {'kernel': kernel.transpose(2, 3, 1, 0), 'bias': conv.bias}
    layers[name] = {'from': list(conv.sources), 'source_shape': list(kernel.shape),
                    'shape': list(params[name]['kernel'].shape), 'groups': g,
                    'block_output': f'{n}x{n}x{out}'}
    channels = out

  towers = set(groups_of.values())
  if len(towers) != 1 or not towers <= {1, 2}:
    _fail(f'groups {groups_of}: the model has 1 or 2 towers, the groups of conv2, conv4 and '
          'conv5 alike')
  model['towers'] = towers.pop()
  model['pool_padding'] = _pool_padding(pools)
  first_pool, first_lrn = blocks[0][2], blocks[0][1]
  model['pool_window'], model['pool_stride'] = first_pool.window[0], first_pool.stride[0]
  model['features'] = tuple(int(b[0].kernel.shape[0]) for b in blocks)
  model['kernel_sizes'] = tuple(int(b[0].kernel.shape[2]) for b in blocks)
  model['lrn'] = {'enabled': first_lrn is not None}
  if first_lrn is not None:
    # Each source's LRN layer spans every map of its input, both groups' maps.
    model['lrn'].update(size=first_lrn.size, k=first_lrn.k, alpha=first_lrn.alpha,
                        beta=first_lrn.beta, alpha_over_size=True, across_towers=True)

  rest = specs[i:]
  if rest and isinstance(rest[0], AdaptiveAvgPoolSpec):
    if n != rest[0].size:
      _fail(f'{rest[0].name}: averages the {n}x{n} maps of a {image_size} input to '
            f'{rest[0].size}x{rest[0].size}, which the model cannot (it is the identity only on '
            f'{rest[0].size}x{rest[0].size} maps, e.g. of a 224 input)')
    rest = rest[1:]
  if not rest or not isinstance(rest[0], FlattenSpec):
    _fail(f'after conv5: {rest[0].name if rest else "nothing"}, where the model flattens the '
          'maps into fc6')
  flat_width = channels * n * n
  if rest[0].width not in (None, -1, flat_width):
    _fail(f'{rest[0].name}: reshapes to {rest[0].width} features; conv5 gives {channels}x{n}x{n}'
          f' = {flat_width} at image size {image_size}')
  rest, dense, width = rest[1:], [], flat_width
  for j, spec in enumerate(rest):
    want_dense = j % 2 == 0
    if want_dense != isinstance(spec, DenseSpec) or not isinstance(spec, (DenseSpec, ReluSpec)):
      _fail(f'{spec.name}: {type(spec).__name__[:-4]} where the model has '
            f'{"a fully connected layer" if want_dense else "a ReLU"}')
    if isinstance(spec, DenseSpec):
      name = f'fc{len(dense) + 6}'
      where = f'{name} ({spec.name})'
      if spec.kernel.ndim != 2 or spec.kernel.shape[0] != width:
        _fail(f'{where}: weights of shape {list(spec.source_shape)} take '
              f'{spec.kernel.shape[0] if spec.kernel.ndim == 2 else "?"} inputs; '
              + (f'conv5 gives {channels}x{n}x{n} = {width} at image size {image_size}'
                 if not dense else f'{dense[-1]} gives {width}'))
      units = spec.kernel.shape[1]
      if spec.bias.shape != (units,):
        _fail(f'{where}: bias of shape {list(spec.bias.shape)}, expected [{units}]')
      kernel = _flat_rows_to_hwc(spec.kernel, channels, n, n) if not dense else spec.kernel
      params[name] = {'kernel': kernel, 'bias': spec.bias}
      layers[name] = {'from': list(spec.sources), 'source_shape': list(spec.source_shape),
                      'shape': list(kernel.shape)}
      if not dense:
        layers[name]['rows'] = f'permuted from (C, H, W) = {(channels, n, n)} to (H, W, C)'
      dense.append(name)
      width = units
  if len(dense) < 2 or not isinstance(rest[-1], DenseSpec):
    _fail('the network does not end in fully connected layers (fc6 ... fc8) after its '
          'convolutions')
  if width != NUM_CLASSES:
    _fail(f'{dense[-1]} ({rest[-1].name}): {width} classes; ImageNet (imagenet2012) has '
          f'{NUM_CLASSES}')
  model['fc_features'] = tuple(int(params[d]['kernel'].shape[1]) for d in dense[:-1])
  model['dropout_rate'] = float(rates[0]) if rates else 0.5
  return Network(model, params, layers, sizes)


# ------------------------------------------------------- config, workdir


@dataclasses.dataclass
class Imported:
  """A converted source: the run's config, its parameters, import.json, the mean image."""
  config: Any
  params: dict
  record: dict
  mean_image: np.ndarray | None = None  # (R, R, 3) in the network's channel order


def build_config(network: Network, *, image_size: int, resize_size: int, channel_order: str,
                 mean: tuple, std: tuple, mean_mode: str):
  """base_config() describing the imported network and its input (dataset.* keys)."""
  config = config_lib.base_config()
  d = config.dataset
  d.name, d.num_classes = 'imagenet2012', NUM_CLASSES
  d.image_size, d.resize_size = int(image_size), int(resize_size)
  d.channel_order, d.mean_mode = channel_order, mean_mode
  d.mean = tuple(float(v) for v in mean)
  d.std = tuple(float(v) for v in std)
  m = config.model
  for key, value in network.model.items():
    if key == 'lrn':
      for lrn_key, lrn_value in value.items():
        m.lrn[lrn_key] = type(m.lrn[lrn_key])(lrn_value)
    else:
      m[key] = value
  config_lib.validate(config, 1)
  return config


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def _file_record(path: str) -> dict:
  return {'path': os.path.abspath(path), 'sha256': _sha256(path),
          'bytes': os.path.getsize(path)}


def _source_size(image_size: int, own: int | None, default: int) -> int:
  return image_size or own or default


def convert(source: str, weights: str, *, mean_file: str | None = None,
            image_size: int = 0) -> Imported:
  """Reads `weights` of `source` and makes the config and parameters of the model; writes nothing.

  `image_size` 0 takes the source's own input size (torchvision 224; Caffe
  the net's input or crop size, else 227; ONNX the graph's input).
  """
  if source not in SOURCES:
    _fail(f'--source={source!r}: pass one of {", ".join(SOURCES)}')
  if not os.path.isfile(weights):
    raise FileNotFoundError(f'--weights={weights}: no such file; pass the weight file to import')
  if mean_file is not None and source == 'torchvision':
    _fail('--mean_file is for Caffe and ONNX networks; torchvision\'s normalises with '
          'constant mean and std')
  if mean_file is not None and not os.path.isfile(mean_file):
    raise FileNotFoundError(f'--mean_file={mean_file}: no such file; pass Caffe\'s '
                            'imagenet_mean.binaryproto, or leave it out for the per-channel mean')
  notes, mean_image = [], None
  if source == 'torchvision':
    specs, own, layout = torchvision_layers(read_state_dict(weights)), 224, 'state dict'
    size = _source_size(image_size, None, own)
    network = assemble(specs, size)
    preprocessing = dict(channel_order='rgb', mean=tuple(255 * m for m in TORCHVISION_MEAN),
                         std=tuple(255 * s for s in TORCHVISION_STD), mean_mode='constant',
                         resize_size=256)
    notes.append('AdaptiveAvgPool2d((6, 6)) is the identity on the 6x6 maps of a 224 input: '
                 'the model has no counterpart.')
  else:
    if source == 'caffe':
      net = caffe_pb.parse(caffe_pb.NetParameter, weights, 'Caffe model (.caffemodel)')
      layers = caffe_pb.layers_of(net)
      if not layers:
        _fail(f'{weights} holds no Caffe layers: pass a .caffemodel (a NetParameter)')
      layout = 'NetParameter.layer' if len(net.layer) else 'NetParameter.layers (V1)'
      specs = caffe_layers(layers)
      own, own_mean = caffe_input(net, layers)
      size = _source_size(image_size, own, 227)
    else:
      try:
        graph = onnx.load(weights)
      except Exception as e:  # pylint: disable=broad-except  (protobuf's and onnx's errors)
        _fail(f'{weights} is not an ONNX model ({type(e).__name__}: {e}): pass an .onnx file')
      if not graph.graph.node:
        _fail(f'{weights} holds no ONNX graph nodes: pass an .onnx model')
      specs, own = onnx_layers(graph)
      layout, own_mean = f'ONNX opset {[o.version for o in graph.opset_import]}', None
      size = _source_size(image_size, own, 224)
    network = assemble(specs, size)
    mean = own_mean or CAFFE_MEAN_BGR
    preprocessing = dict(channel_order='bgr', mean=mean, std=(1.0, 1.0, 1.0),
                         mean_mode='constant', resize_size=256)
    notes.append('Caffe resizes images to 256x256 before cropping; this project resizes the '
                 'shorter side to resize_size and takes the central square.')
    if mean_file is not None:
      mean_image = read_mean_file(mean_file)
      if mean_image.shape[0] < size:
        _fail(f'{mean_file}: the mean image is {mean_image.shape[0]} pixels wide, smaller '
              f'than the {size} input')
      preprocessing.update(mean_mode='image', resize_size=mean_image.shape[0],
                           mean=tuple(float(v) for v in mean_image.mean((0, 1))))
  config = build_config(network, image_size=size, **preprocessing)
  record = {
      'source': source,
      'weights': _file_record(weights),
      'mean_file': _file_record(mean_file) if mean_file else None,
      'format': layout,
      'input': {'image_size': size, 'resize_size': config.dataset.resize_size,
                'channel_order': config.dataset.channel_order, 'pixel_range': '0-255',
                'mean_mode': config.dataset.mean_mode, 'mean': list(config.dataset.mean),
                'std': list(config.dataset.std),
                'note': 'the network sees (image - mean) / std, mean and std in '
                        'channel_order'},
      'model': {k: (list(v) if isinstance(v, tuple) else v) for k, v in network.model.items()},
      'layers': network.layers,
      'output': 'logits (a final softmax of the source is left out)',
      'notes': notes,
  }
  return Imported(config, network.params, record, mean_image)


def _check_empty(workdir: str) -> None:
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise cli.WorkdirError(f'--workdir={workdir} is not empty: pass a new or empty folder for '
                           'the imported network')


def write_workdir(imported: Imported, workdir: str, *, progress: bool = True) -> dict:
  """Writes config.json, the step-0 checkpoint, import.json (and the mean image) into `workdir`.

  `workdir` must be new or empty; if writing fails, what was written is removed.
  Returns import.json's record.
  """
  _check_empty(workdir)
  cli.check_workdir(workdir)
  config, record = imported.config, dict(imported.record)
  bar = tqdm.tqdm(total=3, desc='import', unit='step', disable=not progress)
  try:
    if imported.mean_image is not None:
      config.dataset.stats_dir = os.path.abspath(workdir)
      _write_mean_image(imported.mean_image, config)
      record['stats'] = os.path.basename(imagenet.stats_path(config, None))
    bar.set_postfix_str('train state')
    model = model_lib.create_model(config)
    tx = optim.create_optimizer(config.optimizer)
    state = train.create_train_state(config, model, tx)
    problems = checkpointing.compare(state.params, imported.params)
    if problems:
      _fail(f'the imported parameters do not fit the model of their config: {problems[0]}')
    params = jax.tree.map(lambda t, v: jnp.asarray(v, t.dtype), state.params, imported.params)
    state = state.replace(params=params, opt_state=tx.init(params))
    bar.update()
    bar.set_postfix_str('checkpoint')
    checkpointing.write_config(config, workdir)
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                      keep=config.keep_checkpoints)
    try:
      ckpt.save(state, {'imported_from': record['source']})
    finally:
      ckpt.close()
    bar.update()
    record['created'] = datetime.datetime.now().isoformat(timespec='seconds')
    record['step'] = int(state.step)
    checkpointing.write_json(os.path.join(workdir, 'import.json'), record)
    bar.update()
  except BaseException:
    for name in os.listdir(workdir):  # it was empty: all of it is this import's
      path = os.path.join(workdir, name)
      if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        os.remove(path)
    raise
  finally:
    bar.close()
  return record


def _write_mean_image(mean_image: np.ndarray, config) -> None:
  """The mean image where the data pipeline reads it (data/imagenet.py `load_stats`).

  In the network's channel order, as dataset.mean, and the file says which
  (`channel_order`; files of dataset_stats are RGB); `mean_rgb`, the key the
  pipeline reads for mean_mode='channel', is its per-channel mean, in that
  order too. The PCA is the config's (used only by training's lighting noise).
  """
  d = config.dataset
  np.savez(imagenet.stats_path(config, None), channel_order=np.array(d.channel_order),
           mean_image=mean_image.astype(np.float32),
           mean_rgb=mean_image.mean((0, 1)).astype(np.float32),
           eigval=np.asarray(d.pca_eigval, np.float32),
           eigvec=np.asarray(d.pca_eigvec, np.float32),
           num_images=np.int64(0), num_unreadable=np.int64(0),
           resize_size=np.int64(d.resize_size))


def import_weights(source: str, weights: str, workdir: str, *, mean_file: str | None = None,
                   image_size: int = 0, progress: bool = True) -> dict:
  """`convert`, then `write_workdir`: the whole import; returns import.json's record."""
  _check_empty(workdir)  # before reading a large file
  return write_workdir(convert(source, weights, mean_file=mean_file, image_size=image_size),
                       workdir, progress=progress)


# ------------------------------------------------------- command line

flags.DEFINE_enum('source', None, list(SOURCES), 'Where the weights come from.')
flags.DEFINE_string('weights', None, 'The weight file: torchvision .pth (or .npz), '
                    '.caffemodel or .onnx.')
flags.DEFINE_string('workdir', None, 'A new or empty folder for the imported network.')
flags.DEFINE_string('mean_file', None, 'Caffe and ONNX: a mean image (imagenet_mean.binaryproto) '
                    'to subtract instead of the per-channel mean.')
flags.DEFINE_integer('image_size', 0, 'Input size; 0 = the source\'s own (torchvision 224, '
                     'Caffe its crop size or 227, ONNX its input).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  backend.configure_process()  # XLA's CPU settings, before JAX starts a backend
  f = flags.FLAGS
  for name, example in (('source', 'torchvision'), ('weights', 'alexnet.pth'),
                        ('workdir', 'runs/alexnet_imported')):
    if not f[name].value:
      raise ValueError(f'--{name} is required, e.g. --{name}={example}')
  record = import_weights(f.source, f.weights, f.workdir, mean_file=f.mean_file,
                          image_size=f.image_size)
  model = record['model']
  print(f'Imported {record["source"]} weights {record["weights"]["path"]} into '
        f'{os.path.abspath(f.workdir)}: {model["towers"]} tower(s), features '
        f'{model["features"]}, fc {model["fc_features"]}, input '
        f'{record["input"]["image_size"]} {record["input"]["channel_order"].upper()}, '
        f'pooling {model["pool_padding"]}')


if __name__ == '__main__':
  cli.run(main)
