"""The paper's ablations, re-run on the Fashion-MNIST configuration, 3 seeds each.

  python -m alexnet_jax.sweep run configs/sweeps/paper_ablations.py --root=runs/ablations --parallel=2
  python -m alexnet_jax.sweep report runs/ablations

Against the baseline (configs/fashion_mnist.py: two towers, LRN with alpha
as printed, overlapping 3x3/2 pooling, dropout):
  - no LRN (section 3.3: -1.4 / -1.2 top-1 / top-5 points with it);
  - LRN with alpha / n, the convention of Caffe and of cuda-convnet, which
    divide the configured scale by the window size;
  - non-overlapping 2x2/2 pooling (3.4: -0.4 / -0.3 points for overlapping);
  - one tower with half the kernels of each convolution but the last
    (3.2: -1.7 / -1.2 points for two towers; the paper's one-GPU net kept
    the last convolution, and the fully connected layers, at full size);
  - no dropout (4.2: "substantial overfitting" without it).
The recipe is shortened to 6 epochs (the demo trains 20: same one-cycle
shape, compressed) so that the 18 runs fit in about 80 minutes on a 2-core
CPU, two at a time; evaluations every epoch give the curves.
"""

BASE_CONFIG = 'configs/fashion_mnist.py'


def get_hyper(h):
  variants = h.chainit([
      [{}],  # the baseline
      h.sweep('config.model.lrn.enabled', [False]),
      h.sweep('config.model.lrn.alpha_over_size', [True]),
      h.sweep('config.model.pool_window', [2]),
      h.zipit([h.sweep('config.model.towers', [1]),
               h.sweep('config.model.features', [(8, 16, 64, 64, 128)])]),
      h.sweep('config.model.dropout_rate', [0.0]),
  ])
  recipe = h.product([h.sweep('config.num_epochs', [6]),
                      h.sweep('config.eval_every_epochs', [1.0])])
  # Seeds outermost: an interrupted study holds every variant of its first seeds.
  return h.product([h.sweep('config.seed', [0, 1, 2]), variants, recipe])
