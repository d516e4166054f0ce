"""A tfds builder for Fashion-MNIST that checks content, not archive bytes.

Debian's `dataset-fashion-mnist` installs the real Fashion-MNIST in
`/usr/share/datasets/fashion-mnist`, but re-compressed: the gzip bytes differ
from upstream's, so tfds's own `fashion_mnist` builder rejects them on
checksum. This builder reads the same four IDX files from a folder and checks
the SHA-256 of their *decompressed* content, which is what identifies the data.
"""

from __future__ import annotations

import gzip
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
CLASS_NAMES = ('t-shirt/top', 'trouser', 'pullover', 'dress', 'coat', 'sandal',
               'shirt', 'sneaker', 'bag', 'ankle boot')
# SHA-256 of the decompressed IDX files of Fashion-MNIST (Xiao et al., 2017).
CONTENT_SHA256 = {
    'train-images-idx3-ubyte':
        'c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888',
    'train-labels-idx1-ubyte':
        'bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9',
    't10k-images-idx3-ubyte':
        '5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b',
    't10k-labels-idx1-ubyte':
        '0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34',
}
SPLITS = {'train': ('train', 60_000), 'test': ('t10k', 10_000)}
INSTRUCTIONS = f"""\
Fashion-MNIST was not found. Either
  * install Debian's copy:  sudo apt-get install -y dataset-fashion-mnist
    (puts the four *-ubyte.gz files in {DEBIAN_DIR}), or
  * put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,
    t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from
    https://github.com/zalandoresearch/fashion-mnist in a folder and pass
    --config.dataset.manual_dir=FOLDER, or
  * on a machine with internet, tfds's own `fashion_mnist` download is used
    automatically when neither of the above is present."""


def read_idx(path: str) -> np.ndarray:
  """Reads a (possibly gzipped) IDX file into a uint8 array."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    raw = f.read()
  return parse_idx(raw, path)


def parse_idx(raw: bytes, name: str = 'IDX data') -> np.ndarray:
  if len(raw) < 8 or raw[:2] != b'\x00\x00' or raw[2] != 0x08:
    raise ValueError(f'{name} is not an unsigned-byte IDX file')
  ndim = raw[3]
  dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
  offset = 4 + 4 * ndim
  if len(raw) - offset != int(np.prod(dims)):
    raise ValueError(f'{name} is truncated: header says {dims}')
  return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def find_file(folder: str, stem: str) -> str | None:
  for name in (stem + '.gz', stem):
    path = os.path.join(folder, name)
    if os.path.exists(path):
      return path
  return None


def content_sha256(path: str) -> str:
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def verify_folder(folder: str) -> None:
  """Raises FileNotFoundError / ValueError unless `folder` holds the real data."""
  for stem, want in CONTENT_SHA256.items():
    path = find_file(folder, stem)
    if path is None:
      raise FileNotFoundError(f'{stem}(.gz) is missing from {folder}.\n{INSTRUCTIONS}')
    got = content_sha256(path)
    if want and got != want:
      raise ValueError(
          f'{path} does not hold Fashion-MNIST (content SHA-256 {got}, expected '
          f'{want}); the file is corrupt or another dataset.\n{INSTRUCTIONS}')


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from local IDX files, verified by content hash."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Reads the IDX files of Debian or upstream.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017), 28x28 grey.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(28, 28, 1)),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _split_generators(self, dl_manager):
    folder = str(dl_manager.manual_dir)
    verify_folder(folder)
    return {split: self._generate_examples(folder, prefix)
            for split, (prefix, _) in SPLITS.items()}

  def _generate_examples(self, folder, prefix):
    images = read_idx(find_file(folder, f'{prefix}-images-idx3-ubyte'))
    labels = read_idx(find_file(folder, f'{prefix}-labels-idx1-ubyte'))
    if len(images) != len(labels):
      raise ValueError(f'{folder}: {len(images)} images but {len(labels)} labels')
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image[:, :, None], 'label': int(label)}
