"""The network of `alexnet_jax.model.AlexNet` in PyTorch, for speed comparisons only.

Built from the same `config.model`: the same layer shapes, towers, local
response normalisation (within each tower, the paper's or Caffe's alpha),
overlapping pooling (with TF-style 'SAME' padding where the config asks for
it), dropout and the paper's momentum rule. `load_flax_params` copies a Flax
parameter tree in, so both frameworks can be checked to compute the same
function.

Towers: grouped layers use one `nn.Conv2d(groups=towers)` by default, the
usual PyTorch formulation, which oneDNN runs as one primitive;
`tower_mode='split'` (two convolutions on channel slices plus a
concatenation) is there to compare (`--torch_towers=split` in
the benchmark); on the paper model they measured the same (18.6 vs 18.5 img/s).

Layout: `channels_last` (NHWC) by default: 20% faster than NCHW here.

PyTorch is a benchmark and test dependency only; the package never imports
this module.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


def _same_pads(size: int, window: int, stride: int) -> tuple[int, int]:
  """(low, high) padding of TF/XLA 'SAME' pooling along one dimension."""
  out = math.ceil(size / stride)
  total = max((out - 1) * stride + window - size, 0)
  return total // 2, total - total // 2


def _window_sum(x_BCHW, size: int, towers: int, reverse: bool = False):
  """Sum over channel windows `[c - size // 2, c + (size - 1) // 2]` per tower.

  Works on the (B, H, W, C) view, which is contiguous for channels_last
  tensors, so every slice runs over contiguous memory.
  """
  b, c, h, w = x_BCHW.shape
  lo, hi = size // 2, (size - 1) // 2
  if reverse:
    lo, hi = hi, lo
  n = c // towers
  x = x_BCHW.permute(0, 2, 3, 1).reshape(b, h, w, towers, n)
  xp = F.pad(x, (lo, hi))
  out = xp[..., 0:n]
  for i in range(1, size):
    out = out + xp[..., i:i + n]
  return out.reshape(b, h, w, c).permute(0, 3, 1, 2)


class _LRNFunction(torch.autograd.Function):
  """`alexnet_jax.ops.local_response_norm`'s algorithm: the backward reuses the denominator."""

  @staticmethod
  def forward(ctx, x, size, k, scale, beta, towers):
    denom = k + scale * _window_sum(x * x, size, towers)
    inv = denom.pow(-beta)
    ctx.save_for_backward(x, denom, inv)
    ctx.args = (size, scale, beta, towers)
    return x * inv

  @staticmethod
  def backward(ctx, g):
    x, denom, inv = ctx.saved_tensors
    size, scale, beta, towers = ctx.args
    t = g * x * inv / denom
    dx = g * inv - (2.0 * beta * scale) * x * _window_sum(t, size, towers, reverse=True)
    return dx, None, None, None, None, None


class TowerLRN(nn.Module):
  """Local response normalisation across channels, within each tower.

  impl='module': `torch.nn.LocalResponseNorm` per tower (its avg_pool3d over
  the channel axis is slow on CPU). impl='fast': the algorithm of alexnet_jax/ops.py
  (window sum of shifted slices, a backward pass that reuses the
  denominator), several times faster here; the benchmark's default, so that
  PyTorch is not held back by its stock module.
  """

  def __init__(self, size: int, k: float, alpha: float, beta: float,
               alpha_over_size: bool, towers: int, impl: str = 'fast'):
    super().__init__()
    if impl not in ('fast', 'module'):
      raise ValueError(f"impl={impl!r}; use 'fast' or 'module'")
    # torch.nn.LocalResponseNorm divides alpha by size (Caffe's convention).
    torch_alpha = alpha if alpha_over_size else alpha * size
    self.lrn = nn.LocalResponseNorm(size, alpha=torch_alpha, beta=beta, k=k)
    self.args = (size, float(k), torch_alpha / size, float(beta), towers)
    self.towers, self.impl = towers, impl

  def forward(self, x):
    if self.impl == 'fast':
      return _LRNFunction.apply(x, *self.args)
    if self.towers == 1:
      return self.lrn(x)
    return torch.cat([self.lrn(t) for t in x.chunk(self.towers, dim=1)], dim=1)


class TowerConv(nn.Module):
  """A convolution whose output channels form `towers` towers.

  tower_mode='groups': one `nn.Conv2d(groups=towers)` for grouped layers.
  tower_mode='split': one convolution per tower on its channel slice, then
  concatenation.
  """

  def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int,
               padding: int, towers: int, grouped: bool, tower_mode: str):
    super().__init__()
    self.groups = towers if grouped else 1
    self.split = tower_mode == 'split' and self.groups > 1
    if self.split:
      self.convs = nn.ModuleList(
          nn.Conv2d(in_ch // self.groups, out_ch // self.groups, kernel,
                    stride=stride, padding=padding) for _ in range(self.groups))
    else:
      self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride,
                            padding=padding, groups=self.groups)

  def forward(self, x):
    if not self.split:
      return self.conv(x)
    xs = x.chunk(self.groups, dim=1)
    return torch.cat([c(xi) for c, xi in zip(self.convs, xs)], dim=1)

  def load(self, kernel_HWIO: np.ndarray, bias: np.ndarray) -> None:
    w = torch.from_numpy(np.ascontiguousarray(kernel_HWIO.transpose(3, 2, 0, 1)))
    b = torch.from_numpy(np.array(bias))
    with torch.no_grad():
      if not self.split:
        self.conv.weight.copy_(w)
        self.conv.bias.copy_(b)
        return
      for c, wi, bi in zip(self.convs, w.chunk(self.groups, 0), b.chunk(self.groups, 0)):
        c.weight.copy_(wi)
        c.bias.copy_(bi)


class TorchAlexNet(nn.Module):
  """AlexNet from a `config.model` ConfigDict; NCHW inputs, logits out."""

  def __init__(self, model_config, num_classes: int, in_channels: int,
               image_size: int, tower_mode: str = 'groups', lrn_impl: str = 'fast'):
    super().__init__()
    m = model_config
    self.towers = m.towers
    self.pool_window, self.pool_stride = m.pool_window, m.pool_stride
    self.pool_same = m.pool_padding == 'SAME'
    chans = (in_channels,) + tuple(m.features)
    grouped = (False, True, False, True, True)
    convs = []
    for i in range(5):
      k = m.kernel_sizes[i]
      convs.append(TowerConv(
          chans[i], chans[i + 1], k, stride=m.conv1_stride if i == 0 else 1,
          padding=m.conv1_padding if i == 0 else k // 2, towers=m.towers,
          grouped=grouped[i], tower_mode=tower_mode))
    self.convs = nn.ModuleList(convs)
    self.lrn = (TowerLRN(m.lrn.size, m.lrn.k, m.lrn.alpha, m.lrn.beta,
                         m.lrn.alpha_over_size, m.towers, lrn_impl)
                if m.lrn.enabled else nn.Identity())
    side = (image_size + 2 * m.conv1_padding - m.kernel_sizes[0]) // m.conv1_stride + 1
    self._pool_pads = []
    for _ in range(3):
      pads = (_same_pads(side, self.pool_window, self.pool_stride)
              if self.pool_same else (0, 0))
      self._pool_pads.append(pads)
      side = (side + sum(pads) - self.pool_window) // self.pool_stride + 1
    self.flat_shape = (m.features[-1], side, side)  # C, H, W after the last pool
    widths = (int(np.prod(self.flat_shape)),) + tuple(m.fc_features) + (num_classes,)
    self.fcs = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
    self.dropout = nn.Dropout(m.dropout_rate)

  def _pool(self, x, i):
    lo, hi = self._pool_pads[i]
    if lo or hi:
      x = F.pad(x, (lo, hi, lo, hi), value=-math.inf)
    return F.max_pool2d(x, self.pool_window, self.pool_stride)

  def forward(self, x_BCHW):
    c = self.convs
    x = self._pool(self.lrn(F.relu(c[0](x_BCHW))), 0)
    x = self._pool(self.lrn(F.relu(c[1](x))), 1)
    x = F.relu(c[2](x))
    x = F.relu(c[3](x))
    x = self._pool(F.relu(c[4](x)), 2)
    x = torch.flatten(x, 1)
    for fc in self.fcs[:-1]:
      x = self.dropout(F.relu(fc(x)))
    return self.fcs[-1](x)

  def load_flax_params(self, params: dict[str, Any]) -> None:
    """Copies a Flax `AlexNet` parameter tree (HWIO kernels, NHWC flattening)."""
    for i, conv in enumerate(self.convs):
      p = params[f'conv{i + 1}']
      conv.load(np.asarray(p['kernel']), np.asarray(p['bias']))
    c, h, w = self.flat_shape
    with torch.no_grad():
      for i, fc in enumerate(self.fcs):
        p = params[f'fc{i + 6}']
        kernel = np.asarray(p['kernel'])
        if i == 0:  # Flax flattens (h, w, c); torch flattens (c, h, w).
          kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1)
        fc.weight.copy_(torch.from_numpy(np.ascontiguousarray(kernel.T)))
        fc.bias.copy_(torch.from_numpy(np.array(p['bias'])))


class PaperMomentum(torch.optim.Optimizer):
  """Section 5's rule, as `optim.paper_momentum`, with a constant lr.

  v <- m v - lr (g + wd w);  w <- w + v  (Nesterov: w <- w + m v - lr (g + wd w)).
  `torch.optim.SGD` keeps lr outside the velocity instead (its buffer is
  -v / lr); with a constant lr the two are the same update. Weight decay goes
  to the tensors of the `decay` group only (kernels, as `optim.kernels_only`).
  The step is written with PyTorch's multi-tensor `_foreach` kernels, the
  fast path of torch.optim.
  """

  def __init__(self, decay_params, other_params, lr: float, momentum: float,
               weight_decay: float, nesterov: bool = False):
    groups = [{'params': list(decay_params), 'weight_decay': weight_decay},
              {'params': list(other_params), 'weight_decay': 0.0}]
    super().__init__(groups, {'lr': lr, 'momentum': momentum, 'nesterov': nesterov})

  @torch.no_grad()
  def step(self, closure=None):
    del closure
    for group in self.param_groups:
      ws = [p for p in group['params'] if p.grad is not None]
      if not ws:
        continue
      lr, m = group['lr'], group['momentum']
      vs = [self.state[p].setdefault('velocity', torch.zeros_like(p)) for p in ws]
      delta = torch._foreach_mul([p.grad for p in ws], lr)  # pylint: disable=protected-access
      if group['weight_decay']:
        torch._foreach_add_(delta, ws, alpha=lr * group['weight_decay'])  # pylint: disable=protected-access
      torch._foreach_mul_(vs, m)  # pylint: disable=protected-access
      torch._foreach_sub_(vs, delta)  # pylint: disable=protected-access
      if group['nesterov']:
        torch._foreach_add_(ws, torch._foreach_mul(vs, m))  # pylint: disable=protected-access
        torch._foreach_sub_(ws, delta)  # pylint: disable=protected-access
      else:
        torch._foreach_add_(ws, vs)  # pylint: disable=protected-access


def setup_cpu_threads(num_threads: int = 0) -> int:
  """Uses every core for intra-op work (as XLA does); returns the count."""
  n = num_threads or os.cpu_count() or 1
  torch.set_num_threads(n)
  return n


def create(config, tower_mode: str = 'groups', channels_last: bool = True,
           lrn_impl: str = 'fast') -> tuple[TorchAlexNet, PaperMomentum]:
  """The network and its optimiser for a full run config."""
  d = config.dataset
  net = TorchAlexNet(config.model, d.num_classes, len(d.mean), d.image_size,
                     tower_mode=tower_mode, lrn_impl=lrn_impl)
  if channels_last:
    net = net.to(memory_format=torch.channels_last)
  o = config.optimizer
  decay = [p for n, p in net.named_parameters() if not n.endswith('bias')]
  other = [p for n, p in net.named_parameters() if n.endswith('bias')]
  if o.decay_biases:
    decay, other = decay + other, []
  opt = PaperMomentum(decay, other, lr=config.schedule.base_lr, momentum=o.momentum,
                      weight_decay=o.weight_decay, nesterov=o.nesterov)
  return net, opt


def make_train_step(net: TorchAlexNet, opt: PaperMomentum):
  """A step on (images_BCHW, labels); returns loss and top-1 error tensors.

  Like the JAX step it computes the loss and the error but does not read them
  back to Python, so nothing waits on a value between steps.
  """

  def step(images, labels):
    net.train()
    opt.zero_grad(set_to_none=True)
    logits = net(images)
    loss = F.cross_entropy(logits, labels)
    loss.backward()
    opt.step()
    with torch.no_grad():
      error = (logits.argmax(-1) != labels).float().mean()
    return loss.detach(), error

  return step
