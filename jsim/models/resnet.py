"""ResNet with bottleneck blocks, exactly torchvision's ResNet50 (v1.5), in Flax Linen.

Layout is NHWC (inputs already normalised floats). Differences from the usual Flax
example that matter for a weight port and for parity with torchvision:
  * the stride of a downsampling block sits on its 3x3 conv (v1.5), not the 1x1;
  * padding is explicit, as torch pads: ((3,3),(3,3)) on the 7x7 stem,
    ((1,1),(1,1)) on every 3x3 conv and on the 3x3/2 max-pool (padded with -inf).
    'SAME' would pad (2,3) on the stride-2 stem and shift every output;
  * BatchNorm momentum 0.9 (== torch momentum 0.1), epsilon 1e-5.

One known difference: in train mode torch updates running_var with the unbiased batch
variance (n / (n - 1) times Flax's biased one); with n = batch * H * W per channel this is
a < 0.1 % difference at batch 64, and the normalisation itself is identical.

Submodule names mirror torchvision's (conv1, bn1, layer{s}_{b}/conv{k}, bn{k},
downsample_conv, downsample_bn) so that the port's key table reads line by line;
the classifier is called `head` in every jsim model.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jsim.models.layers import Conv, max_pool

EXPANSION = 4  # bottleneck output width = EXPANSION * its inner width

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu') on every conv.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch nn.Linear default: kaiming_uniform_(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """torch nn.Linear's default bias initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Bottleneck(nn.Module):
  """torchvision's Bottleneck: 1x1 -> 3x3 (strided) -> 1x1 (x4 width), plus the shortcut."""

  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(
      Conv,
      use_bias=False,
      padding=((0, 0), (0, 0)),
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=conv_kernel_init,
      conv_impl=self.conv_impl,
    )
    norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32
    )
    out_features = self.features * EXPANSION

    y = conv(self.features, (1, 1), name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = conv(self.features, (3, 3), strides=(self.strides, self.strides), padding=((1, 1), (1, 1)), name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = conv(out_features, (1, 1), name="conv3")(y)
    y = norm(name="bn3")(y)

    shortcut = x
    # Same rule as torchvision's _make_layer: project when the shape changes.
    if self.strides != 1 or x.shape[-1] != out_features:
      shortcut = conv(out_features, (1, 1), strides=(self.strides, self.strides), name="downsample_conv")(x)
      shortcut = norm(name="downsample_bn")(shortcut)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """Bottleneck ResNet; `ResNet(stage_sizes=(3, 4, 6, 3))` is torchvision's resnet50.

  Attributes:
    stage_sizes: number of bottleneck blocks in each stage (layer1..layerN).
    num_classes: width of the classification head.
    width: stem width and inner width of the first stage (64 in torchvision);
      stage s has inner width width * 2**s and output width 4x that.
    dtype: compute dtype (e.g. bfloat16 on GPU); parameters stay float32.
    conv_impl: how the convs and max-pools are lowered: auto | xla | matmul (jsim.models.layers).

  Call: `(logits, embedding) = model.apply(variables, x, train=...)` with x NHWC float;
  `embedding` is the global-average-pooled feature (the head's input), both float32.
  """

  stage_sizes: Sequence[int]
  num_classes: int = 1000
  width: int = 64
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @property
  def embedding_dim(self) -> int:
    """Width of the embedding (the head's input), known without init."""
    return self.width * 2 ** (len(self.stage_sizes) - 1) * EXPANSION

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    x = Conv(
      self.width,
      (7, 7),
      strides=(2, 2),
      padding=((3, 3), (3, 3)),
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=conv_kernel_init,
      conv_impl=self.conv_impl,
      name="conv1",
    )(x)
    x = nn.BatchNorm(
      use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32, name="bn1"
    )(x)
    x = nn.relu(x)
    x = max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), conv_impl=self.conv_impl)  # pads with -inf
    for s, n_blocks in enumerate(self.stage_sizes):
      for b in range(n_blocks):
        strides = 2 if s > 0 and b == 0 else 1
        x = Bottleneck(
          self.width * 2**s, strides=strides, dtype=self.dtype, conv_impl=self.conv_impl, name=f"layer{s + 1}_{b}"
        )(x, train=train)
    embedding = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d((1, 1)) + flatten
    logits = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=torch_linear_kernel_init,
      bias_init=torch_linear_bias_init(embedding.shape[-1]),
      name="head",
    )(embedding)
    return logits.astype(jnp.float32), embedding.astype(jnp.float32)


def resnet50(num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs: Any) -> ResNet:
  """torchvision's resnet50 (v1.5): stages (3, 4, 6, 3), width 64, 2048-d embedding."""
  return ResNet(stage_sizes=(3, 4, 6, 3), num_classes=num_classes, dtype=dtype, **kwargs)


def resnet_tiny(num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs: Any) -> ResNet:
  """The same bottleneck code, one block per stage and width 8 (256-d embedding): CPU tests."""
  kwargs.setdefault("stage_sizes", (1, 1, 1, 1))
  kwargs.setdefault("width", 8)
  return ResNet(num_classes=num_classes, dtype=dtype, **kwargs)
