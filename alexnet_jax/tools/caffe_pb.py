"""The messages of Caffe's `caffe.proto` that a trained AlexNet is stored in, built at run time.

A `.caffemodel` is a serialized `NetParameter`, and a mean file
(`imagenet_mean.binaryproto`) a serialized `BlobProto`, whose packed values
are declared here as bytes (see `BlobProto` below; `BlobProtoFloats` is the
declaration of caffe.proto, for writing small test files). Rather than ship the
code `protoc` would generate, this module declares the subset of
`caffe.proto` that importing weights needs, with Caffe's own field numbers,
types and defaults, as a `FileDescriptorProto` in a private descriptor pool,
and asks protobuf for the message classes. Fields not declared here are kept
as unknown fields by the parser and otherwise ignored.

Both layouts Caffe has written are declared: the current one (`layer`,
field 100, `LayerParameter` whose type is a string) and the one of models
saved before 2015, bvlc_alexnet among them (`layers`, field 2,
`V1LayerParameter` whose type is an enum). `layers_of` reads either as
`Layer`s with the current type names.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory
import numpy as np

_F = descriptor_pb2.FieldDescriptorProto
_OPTIONAL, _REPEATED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED
_TYPES = {'string': _F.TYPE_STRING, 'bytes': _F.TYPE_BYTES, 'bool': _F.TYPE_BOOL,
          'float': _F.TYPE_FLOAT,
          'double': _F.TYPE_DOUBLE, 'int32': _F.TYPE_INT32, 'uint32': _F.TYPE_UINT32,
          'int64': _F.TYPE_INT64}

# V1LayerParameter.LayerType: enum value -> the type name of LayerParameter
# (the names Caffe's upgrade of old models gives them).
V1_LAYER_TYPES = {
    0: 'NONE', 35: 'AbsVal', 1: 'Accuracy', 30: 'ArgMax', 2: 'BNLL', 3: 'Concat',
    37: 'ContrastiveLoss', 4: 'Convolution', 5: 'Data', 39: 'Deconvolution', 6: 'Dropout',
    32: 'DummyData', 7: 'EuclideanLoss', 25: 'Eltwise', 38: 'Exp', 8: 'Flatten',
    9: 'HDF5Data', 10: 'HDF5Output', 28: 'HingeLoss', 11: 'Im2col', 12: 'ImageData',
    13: 'InfogainLoss', 14: 'InnerProduct', 15: 'LRN', 29: 'MemoryData',
    16: 'MultinomialLogisticLoss', 34: 'MVN', 17: 'Pooling', 26: 'Power', 18: 'ReLU',
    19: 'Sigmoid', 27: 'SigmoidCrossEntropyLoss', 36: 'Silence', 20: 'Softmax',
    21: 'SoftmaxWithLoss', 22: 'Split', 33: 'Slice', 23: 'TanH', 24: 'WindowData',
    31: 'Threshold',
}
_V1_ENUM_NAMES = {
    0: 'NONE', 35: 'ABSVAL', 1: 'ACCURACY', 30: 'ARGMAX', 2: 'BNLL', 3: 'CONCAT',
    37: 'CONTRASTIVE_LOSS', 4: 'CONVOLUTION', 5: 'DATA', 39: 'DECONVOLUTION', 6: 'DROPOUT',
    32: 'DUMMY_DATA', 7: 'EUCLIDEAN_LOSS', 25: 'ELTWISE', 38: 'EXP', 8: 'FLATTEN',
    9: 'HDF5_DATA', 10: 'HDF5_OUTPUT', 28: 'HINGE_LOSS', 11: 'IM2COL', 12: 'IMAGE_DATA',
    13: 'INFOGAIN_LOSS', 14: 'INNER_PRODUCT', 15: 'LRN', 29: 'MEMORY_DATA',
    16: 'MULTINOMIAL_LOGISTIC_LOSS', 34: 'MVN', 17: 'POOLING', 26: 'POWER', 18: 'RELU',
    19: 'SIGMOID', 27: 'SIGMOID_CROSS_ENTROPY_LOSS', 36: 'SILENCE', 20: 'SOFTMAX',
    21: 'SOFTMAX_LOSS', 22: 'SPLIT', 33: 'SLICE', 23: 'TANH', 24: 'WINDOW_DATA',
    31: 'THRESHOLD',
}

# message -> [(field, number, label, type, default or None, packed)]; a type
# that is not a scalar names a message or enum of this file.
_MESSAGES = {
    'BlobShape': [('dim', 1, _REPEATED, 'int64', None, True)],
    # Caffe's BlobProto, its packed values read as the bytes they are on the
    # wire (a packed field is length-delimited, as a bytes field): one array
    # per blob instead of a Python float per value, 61 million of them in
    # bvlc_alexnet. Caffe writes these fields packed, in one piece each.
    'BlobProto': [
        ('num', 1, _OPTIONAL, 'int32', '0', False),
        ('channels', 2, _OPTIONAL, 'int32', '0', False),
        ('height', 3, _OPTIONAL, 'int32', '0', False),
        ('width', 4, _OPTIONAL, 'int32', '0', False),
        ('data', 5, _REPEATED, 'bytes', None, False),
        ('diff', 6, _REPEATED, 'bytes', None, False),
        ('shape', 7, _OPTIONAL, 'BlobShape', None, False),
        ('double_data', 8, _REPEATED, 'bytes', None, False),
        ('double_diff', 9, _REPEATED, 'bytes', None, False),
    ],
    # BlobProto as caffe.proto declares it (the same bytes on the wire).
    'BlobProtoFloats': [
        ('num', 1, _OPTIONAL, 'int32', '0', False),
        ('channels', 2, _OPTIONAL, 'int32', '0', False),
        ('height', 3, _OPTIONAL, 'int32', '0', False),
        ('width', 4, _OPTIONAL, 'int32', '0', False),
        ('data', 5, _REPEATED, 'float', None, True),
        ('diff', 6, _REPEATED, 'float', None, True),
        ('shape', 7, _OPTIONAL, 'BlobShape', None, False),
        ('double_data', 8, _REPEATED, 'double', None, True),
        ('double_diff', 9, _REPEATED, 'double', None, True),
    ],
    'NetStateRule': [('phase', 1, _OPTIONAL, 'Phase', None, False)],
    'ConvolutionParameter': [
        ('num_output', 1, _OPTIONAL, 'uint32', None, False),
        ('bias_term', 2, _OPTIONAL, 'bool', 'true', False),
        ('pad', 3, _REPEATED, 'uint32', None, False),
        ('kernel_size', 4, _REPEATED, 'uint32', None, False),
        ('group', 5, _OPTIONAL, 'uint32', '1', False),
        ('stride', 6, _REPEATED, 'uint32', None, False),
        ('pad_h', 9, _OPTIONAL, 'uint32', '0', False),
        ('pad_w', 10, _OPTIONAL, 'uint32', '0', False),
        ('kernel_h', 11, _OPTIONAL, 'uint32', None, False),
        ('kernel_w', 12, _OPTIONAL, 'uint32', None, False),
        ('stride_h', 13, _OPTIONAL, 'uint32', None, False),
        ('stride_w', 14, _OPTIONAL, 'uint32', None, False),
        ('dilation', 18, _REPEATED, 'uint32', None, False),
    ],
    'PoolingParameter': [
        ('pool', 1, _OPTIONAL, 'PoolingParameter.PoolMethod', 'MAX', False),
        ('kernel_size', 2, _OPTIONAL, 'uint32', None, False),
        ('stride', 3, _OPTIONAL, 'uint32', '1', False),
        ('pad', 4, _OPTIONAL, 'uint32', '0', False),
        ('kernel_h', 5, _OPTIONAL, 'uint32', None, False),
        ('kernel_w', 6, _OPTIONAL, 'uint32', None, False),
        ('stride_h', 7, _OPTIONAL, 'uint32', None, False),
        ('stride_w', 8, _OPTIONAL, 'uint32', None, False),
        ('pad_h', 9, _OPTIONAL, 'uint32', '0', False),
        ('pad_w', 10, _OPTIONAL, 'uint32', '0', False),
        ('global_pooling', 12, _OPTIONAL, 'bool', 'false', False),
        ('round_mode', 13, _OPTIONAL, 'PoolingParameter.RoundMode', 'CEIL', False),
    ],
    'LRNParameter': [
        ('local_size', 1, _OPTIONAL, 'uint32', '5', False),
        ('alpha', 2, _OPTIONAL, 'float', '1', False),
        ('beta', 3, _OPTIONAL, 'float', '0.75', False),
        ('norm_region', 4, _OPTIONAL, 'LRNParameter.NormRegion', 'ACROSS_CHANNELS', False),
        ('k', 5, _OPTIONAL, 'float', '1', False),
    ],
    'InnerProductParameter': [
        ('num_output', 1, _OPTIONAL, 'uint32', None, False),
        ('bias_term', 2, _OPTIONAL, 'bool', 'true', False),
        ('axis', 5, _OPTIONAL, 'int32', '1', False),
        ('transpose', 6, _OPTIONAL, 'bool', 'false', False),
    ],
    'DropoutParameter': [('dropout_ratio', 1, _OPTIONAL, 'float', '0.5', False)],
    'TransformationParameter': [
        ('scale', 1, _OPTIONAL, 'float', '1', False),
        ('mirror', 2, _OPTIONAL, 'bool', 'false', False),
        ('crop_size', 3, _OPTIONAL, 'uint32', '0', False),
        ('mean_file', 4, _OPTIONAL, 'string', None, False),
        ('mean_value', 5, _REPEATED, 'float', None, False),
    ],
    'InputParameter': [('shape', 1, _REPEATED, 'BlobShape', None, False)],
    'LayerParameter': [
        ('name', 1, _OPTIONAL, 'string', None, False),
        ('type', 2, _OPTIONAL, 'string', None, False),
        ('bottom', 3, _REPEATED, 'string', None, False),
        ('top', 4, _REPEATED, 'string', None, False),
        ('blobs', 7, _REPEATED, 'BlobProto', None, False),
        ('include', 8, _REPEATED, 'NetStateRule', None, False),
        ('transform_param', 100, _OPTIONAL, 'TransformationParameter', None, False),
        ('convolution_param', 106, _OPTIONAL, 'ConvolutionParameter', None, False),
        ('dropout_param', 108, _OPTIONAL, 'DropoutParameter', None, False),
        ('inner_product_param', 117, _OPTIONAL, 'InnerProductParameter', None, False),
        ('lrn_param', 118, _OPTIONAL, 'LRNParameter', None, False),
        ('pooling_param', 121, _OPTIONAL, 'PoolingParameter', None, False),
        ('input_param', 143, _OPTIONAL, 'InputParameter', None, False),
    ],
    'V1LayerParameter': [
        ('bottom', 2, _REPEATED, 'string', None, False),
        ('top', 3, _REPEATED, 'string', None, False),
        ('name', 4, _OPTIONAL, 'string', None, False),
        ('type', 5, _OPTIONAL, 'V1LayerParameter.LayerType', None, False),
        ('blobs', 6, _REPEATED, 'BlobProto', None, False),
        ('convolution_param', 10, _OPTIONAL, 'ConvolutionParameter', None, False),
        ('dropout_param', 12, _OPTIONAL, 'DropoutParameter', None, False),
        ('inner_product_param', 17, _OPTIONAL, 'InnerProductParameter', None, False),
        ('lrn_param', 18, _OPTIONAL, 'LRNParameter', None, False),
        ('pooling_param', 19, _OPTIONAL, 'PoolingParameter', None, False),
        ('include', 32, _REPEATED, 'NetStateRule', None, False),
        ('transform_param', 36, _OPTIONAL, 'TransformationParameter', None, False),
    ],
    'NetParameter': [
        ('name', 1, _OPTIONAL, 'string', None, False),
        ('layers', 2, _REPEATED, 'V1LayerParameter', None, False),
        ('input', 3, _REPEATED, 'string', None, False),
        ('input_dim', 4, _REPEATED, 'int32', None, False),
        ('input_shape', 8, _REPEATED, 'BlobShape', None, False),
        ('layer', 100, _REPEATED, 'LayerParameter', None, False),
    ],
}
# Enums nested in a message: (message, enum) -> {name: value}.
_ENUMS = {
    ('PoolingParameter', 'PoolMethod'): {'MAX': 0, 'AVE': 1, 'STOCHASTIC': 2},
    ('PoolingParameter', 'RoundMode'): {'CEIL': 0, 'FLOOR': 1},
    ('LRNParameter', 'NormRegion'): {'ACROSS_CHANNELS': 0, 'WITHIN_CHANNEL': 1},
    ('V1LayerParameter', 'LayerType'): {v: k for k, v in _V1_ENUM_NAMES.items()},
}
_TOP_ENUMS = {'Phase': {'TRAIN': 0, 'TEST': 1}}


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
  fd = descriptor_pb2.FileDescriptorProto(name='alexnet_jax/caffe_subset.proto',
                                          package='caffe', syntax='proto2')
  enum_names = {e for _, e in _ENUMS} | set(_TOP_ENUMS)
  for name, values in _TOP_ENUMS.items():
    enum = fd.enum_type.add(name=name)
    for value_name, number in values.items():
      enum.value.add(name=value_name, number=number)
  for message_name, fields in _MESSAGES.items():
    message = fd.message_type.add(name=message_name)
    for (owner, enum_name), values in _ENUMS.items():
      if owner == message_name:
        enum = message.enum_type.add(name=enum_name)
        for value_name, number in sorted(values.items(), key=lambda kv: kv[1]):
          enum.value.add(name=value_name, number=number)
    for name, number, label, kind, default, packed in fields:
      field = message.field.add(name=name, number=number, label=label)
      if kind in _TYPES:
        field.type = _TYPES[kind]
      else:
        field.type_name = f'.caffe.{kind}'
        field.type = _F.TYPE_ENUM if kind.split('.')[-1] in enum_names else _F.TYPE_MESSAGE
      if default is not None:
        field.default_value = default
      if packed:
        field.options.packed = True
  return fd


def _message_classes() -> dict[str, Any]:
  pool = descriptor_pool.DescriptorPool()  # private: no clash with another `caffe` package
  pool.Add(_file_descriptor())
  return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f'caffe.{name}'))
          for name in _MESSAGES}


_CLASSES = _message_classes()
BlobShape = _CLASSES['BlobShape']
BlobProto = _CLASSES['BlobProto']
BlobProtoFloats = _CLASSES['BlobProtoFloats']
LayerParameter = _CLASSES['LayerParameter']
V1LayerParameter = _CLASSES['V1LayerParameter']
NetParameter = _CLASSES['NetParameter']


def parse(message_class, path: str, what: str):
  """The `message_class` message in the file `path`; a ValueError naming `what` if it is not one."""
  with open(path, 'rb') as f:
    data = f.read()
  message = message_class()
  try:
    message.ParseFromString(data)
  except Exception as e:  # pylint: disable=broad-except  (protobuf's DecodeError and kin)
    raise ValueError(f'{path} is not a {what} ({type(e).__name__}: {e}): pass a {what} '
                     'file written by Caffe') from e
  return message


def blob_array(blob, name: str) -> np.ndarray:
  """A `BlobProto`'s values, float32, in its shape (`shape`, or num, channels, height, width)."""
  if blob.HasField('shape'):
    shape = tuple(int(d) for d in blob.shape.dim)
  else:
    shape = (blob.num, blob.channels, blob.height, blob.width)
  raw, dtype = (blob.double_data, '<f8') if len(blob.double_data) else (blob.data, '<f4')
  raw = b''.join(raw)
  if len(raw) % np.dtype(dtype).itemsize:
    raise ValueError(f'{name}: the blob\'s values end mid-number: the file is damaged')
  array = np.frombuffer(raw, dtype).astype(np.float32, copy=False)
  if array.size != int(np.prod(shape)):
    raise ValueError(f'{name}: the blob holds {array.size} values, its shape {list(shape)} '
                     f'needs {int(np.prod(shape))}: the file is damaged')
  return array.reshape(shape)


@dataclasses.dataclass
class Layer:
  """One layer of a net, whichever layout stored it."""
  name: str
  type: str       # LayerParameter's type names: 'Convolution', 'ReLU', 'LRN', ...
  blobs: list     # BlobProto messages
  param: Any      # the LayerParameter or V1LayerParameter itself (its *_param fields)
  phases: tuple   # the phases it is included in; () = all


def layers_of(net) -> list[Layer]:
  """The layers of a NetParameter in order: `layer` (current) or `layers` (V1)."""
  if len(net.layer) and len(net.layers):
    raise ValueError('the net holds layers in both the current and the V1 layout; '
                     'pass a .caffemodel written by Caffe')
  if len(net.layer):
    return [Layer(l.name, l.type, list(l.blobs), l, tuple(r.phase for r in l.include))
            for l in net.layer]
  return [Layer(l.name, V1_LAYER_TYPES.get(l.type, f'V1 type {l.type}'), list(l.blobs), l,
                tuple(r.phase for r in l.include))
          for l in net.layers]
