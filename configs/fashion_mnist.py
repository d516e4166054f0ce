"""AlexNet scaled to Fashion-MNIST (28x28 grey): the embedded default.

  python -m alexnet_jax.main --workdir=runs/fashion_mnist

The architecture keeps the paper's character: five convolutions of which
conv2, conv4 and conv5 are grouped into two towers, local response
normalisation after conv1 and conv2 (the paper's k, n, alpha, beta), overlapping
3x3/2 max-pooling, and three fully connected layers with dropout. The paper's
augmentation becomes random 28x28 crops of the image zero-padded by 1 pixel,
plus horizontal flips; its ten-patch test becomes the four corners and centre
of the padded image and their reflections. Nesterov momentum with the paper's
update rule and a one-cycle learning-rate schedule fit the short budget.

Expected on a 2-core CPU (README, "Fashion-MNIST demo"): 92.75% test accuracy
on all 10,000 test images with the ten-patch test, in under 10 minutes
including dataset preparation and compilation (~2,500 train images/s).
"""

from alexnet_jax import config_lib


def get_config():
  config = config_lib.base_config()
  config.dataset.name = 'fashion_mnist'
  config.dataset.image_size = 28
  config.dataset.num_classes = 10
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'test'
  config.dataset.crop_padding = 1
  config.dataset.random_flip = True
  config.dataset.mean = (0.286 * 255,)
  config.dataset.std = (0.353 * 255,)

  config.model.towers = 2
  config.model.features = (16, 32, 128, 128, 128)
  config.model.kernel_sizes = (5, 5, 3, 3, 3)
  # Every 3x3/2 pool halves the maps: 28 -> 14 -> 7 -> 4. conv1 keeps the
  # full 28x28 resolution (the paper's stride-4 conv1 exists to cut a
  # 227-pixel image down; a 28-pixel one has nothing to spare), so it and
  # conv2 are kept narrow: the step costs as much as a 32-64-128 network
  # with a stride-2 conv1, and reaches better accuracy per epoch.
  config.model.conv1_stride = 1
  config.model.conv1_padding = 2
  config.model.pool_padding = 'SAME'
  config.model.fc_features = (1024, 1024)
  # The short schedule leaves the network short of fitting the training set
  # (train error with augmentation ~ test error); the paper's 0.5 held it
  # back: 92.25% test accuracy with 0.5, 92.55% with 0.3 at 16 epochs (README).
  config.model.dropout_rate = 0.3
  config.model.init = 'he'

  config.optimizer.nesterov = True
  config.schedule.name = 'one_cycle'
  config.schedule.base_lr = 0.05
  config.global_batch_size = 128
  config.eval_batch_size = 500
  # 20 epochs fit in the time 16 took before the towers became separate
  # arrays and the CPU kernels came: 92.78% (18 epochs of the same step:
  # 92.48%; 16 epochs of an older step: 92.31%; README).
  config.num_epochs = 20
  config.eval_every_epochs = 2.0
  # The paper's test: softmax averaged over ten patches (corners and centre
  # of the padded image, and their reflections) for the final figures;
  # centre only for the learning curves, 10x cheaper.
  config.dataset.eval_crops = 'ten'
  config.dataset.interim_eval_crops = 'center'
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  return config
