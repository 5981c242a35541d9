"""VGG, exactly torchvision's vgg16 (configuration "D", no BatchNorm), in Flax Linen.

Layout is NHWC (inputs already normalised floats). What matters for parity:
  * 3x3 convs pad ((1,1),(1,1)) explicitly; max-pools are 2x2/2 without padding;
  * AdaptiveAvgPool2d((7, 7)) with torch's exact bins for any input size
    (it is the identity only at 224 px);
  * torch flattens NCHW: we transpose the pooled map to NCHW before flattening,
    so fc6's torch weight ports with a plain transpose (no permutation).

Names: conv{block}_{k} for the convs, fc6 and fc7 for the hidden linears, `head` for
the classifier (the same name in every jsim model). VGG has no BatchNorm, so its
variables hold only 'params'.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jsim.models.layers import Conv, max_pool
from jsim.models.resnet import conv_kernel_init

# torchvision cfgs["D"]: ints are conv widths, "M" a 2x2/2 max-pool.
VGG16_CFG: tuple[int | str, ...] = (
  64,
  64,
  "M",
  128,
  128,
  "M",
  256,
  256,
  256,
  "M",
  512,
  512,
  512,
  "M",
  512,
  512,
  512,
  "M",
)
# torchvision's VGG._initialize_weights: Linear ~ N(0, 0.01), bias 0.
linear_kernel_init = nn.initializers.normal(stddev=0.01)


def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] averaging matrix of torch's adaptive average pool along one axis.

  Bin i spans [floor(i * in / out), ceil((i + 1) * in / out)): bins may overlap, and
  when in < out input rows are repeated.
  """
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil division
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """torch.nn.AdaptiveAvgPool2d on NHWC input, exact for any input size (float32 sums)."""
  h, w = x.shape[1], x.shape[2]
  if (h, w) == tuple(output_size):
    return x
  ph = jnp.asarray(adaptive_pool_matrix(h, output_size[0]))
  pw = jnp.asarray(adaptive_pool_matrix(w, output_size[1]))
  # Averaging weights like 1/3 are inexact in bfloat16: pool in float32.
  y = jnp.einsum("ih,jw,nhwc->nijc", ph, pw, x.astype(jnp.float32))
  return y.astype(x.dtype)


class VGG(nn.Module):
  """torchvision's VGG without BatchNorm; `VGG(cfg=VGG16_CFG)` is vgg16.

  Attributes:
    cfg: conv widths and "M" (max-pool) markers, as torchvision's cfgs.
    num_classes: width of the classification head.
    fc_width: width of fc6 and fc7 (4096 in torchvision) = the embedding width.
    pool_size: output side of the adaptive average pool (7 in torchvision).
    dropout_rate: dropout after fc6 and fc7 (train mode only; needs rngs={'dropout': key}).
    dtype: compute dtype (e.g. bfloat16 on GPU); parameters stay float32.
    conv_impl: how the convs and max-pools are lowered: auto | xla | matmul (jsim.models.layers).

  Call: `(logits, embedding) = model.apply(variables, x, train=...)` with x NHWC float;
  `embedding` is the head's input: fc7 after its ReLU (and, in train mode, its dropout).
  Both are float32.
  """

  cfg: Sequence[int | str] = VGG16_CFG
  num_classes: int = 1000
  fc_width: int = 4096
  pool_size: int = 7
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @property
  def embedding_dim(self) -> int:
    """Width of the embedding (the head's input), known without init."""
    return self.fc_width

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    block, k = 1, 1
    for v in self.cfg:
      if v == "M":
        x = max_pool(x, (2, 2), strides=(2, 2), padding="VALID", conv_impl=self.conv_impl)  # torch floors odd sizes too
        block, k = block + 1, 1
      else:
        x = Conv(
          int(v),
          (3, 3),
          padding=((1, 1), (1, 1)),
          dtype=self.dtype,
          param_dtype=jnp.float32,
          kernel_init=conv_kernel_init,
          bias_init=nn.initializers.zeros,
          conv_impl=self.conv_impl,
          name=f"conv{block}_{k}",
        )(x)
        x = nn.relu(x)
        k += 1
    x = adaptive_avg_pool(x, (self.pool_size, self.pool_size))
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch's NCHW flatten order
    for name in ("fc6", "fc7"):
      x = nn.Dense(
        self.fc_width,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=linear_kernel_init,
        bias_init=nn.initializers.zeros,
        name=name,
      )(x)
      x = nn.relu(x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    embedding = x
    logits = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=linear_kernel_init,
      bias_init=nn.initializers.zeros,
      name="head",
    )(embedding)
    return logits.astype(jnp.float32), embedding.astype(jnp.float32)


def vgg16(num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs: Any) -> VGG:
  """torchvision's vgg16 (cfg "D", no BatchNorm): 4096-d embedding."""
  return VGG(cfg=VGG16_CFG, num_classes=num_classes, dtype=dtype, **kwargs)


def vgg_tiny(num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs: Any) -> VGG:
  """The same VGG code with three narrow convs, two pools and 32-wide FCs: CPU tests."""
  kwargs.setdefault("cfg", (8, "M", 16, 16, "M"))
  kwargs.setdefault("fc_width", 32)
  return VGG(num_classes=num_classes, dtype=dtype, **kwargs)
