"""Single-tower AlexNet at 224x224 (torchvision's layer widths, 61,100,840 params).

  python -m alexnet_jax.main --config=configs/single_tower.py --workdir=runs/single

The paper recipe with one tower of 64-192-384-256-256 kernels, conv1 padded by 2
so a 224 input gives 55x55 maps, and no local response normalisation, as in
torchvision's `alexnet`. Needs `imagenet2012` prepared by tfds.
"""

from alexnet_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset.image_size = 224
  config.model.towers = 1
  config.model.features = (64, 192, 384, 256, 256)
  config.model.conv1_padding = 2
  config.model.lrn.enabled = False
  return config
