"""The paper's recipe: AlexNet on ILSVRC-2012 (Krizhevsky et al., 2012).

  python -m alexnet_jax.main --config=configs/paper.py --workdir=runs/paper

Two towers (the two-GPU split), 227x227 crops, batch 128, momentum 0.9,
weight decay 0.0005 with the paper's update rule, lr 0.01 divided by 10 when
the validation error stops improving (at most three times), 90 epochs.
The paper reports 40.7% top-1 / 18.2% top-5 error on the ILSVRC-2012
validation set for one network with 10-patch testing (table 2; 37.5% / 17.0%
in table 1 are on the ILSVRC-2010 test set). Needs `imagenet2012` prepared by
tfds.

Variants: `--config.model.towers=1` for the single-tower network;
`--config.schedule.name=steps` for a fixed step schedule (epochs 30, 60, 80).
"""

from alexnet_jax import config_lib


def get_config():
  return config_lib.base_config()
