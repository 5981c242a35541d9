"""Backbones looked up by name, and the torchvision weight port.

    model = jsim.models.build("resnet50", num_classes=180, dtype=jnp.bfloat16)
    variables = model.init({"params": key, "dropout": key2}, x, train=False)
    logits, embedding = model.apply(variables, x, train=False)
    (logits, embedding), updates = model.apply(
        variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key3})

Every backbone takes NHWC float input and returns float32 (logits, embedding), where
the embedding is the input of the last layer (`head`); `model.embedding_dim` (or
`embedding_dim(name)`) gives its width without init. Adding a model means adding one
file with a factory `f(num_classes, dtype, **kwargs) -> nn.Module` and one `register`
call below.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from jsim.models import efficientnet_lite, resnet, vgg
from jsim.models.layers import CONV_IMPLS
from jsim.models.pretrained_port import from_pretrained
from jsim.models.torchvision_port import from_torchvision

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# config.model.dtype: auto (bf16 on accelerators, float32 on CPU) | float32 | bfloat16.
DTYPES = ("auto", "float32", "bfloat16")
# config.model.init: torchvision's ImageNet weights (model.weights), the ImageNet weights of an installed
# package (jsim.models.pretrained_port: efficientnet_lite0/1/2), or a seeded random init.
INITS = ("torchvision", "pretrained", "random")


def register(name: str, factory: Callable[..., nn.Module]) -> None:
  """Registers `factory(num_classes=..., dtype=..., **kwargs) -> nn.Module` under `name`."""
  if name in _REGISTRY:
    raise ValueError(f"model {name!r} is already registered")
  _REGISTRY[name] = factory


def available() -> list[str]:
  """Names accepted by `build`, sorted."""
  return sorted(_REGISTRY)


def build(name: str, num_classes: int = 180, dtype: Any = jnp.float32, **kwargs: Any) -> nn.Module:
  """The backbone `name` with a `num_classes`-way head, computing in `dtype` (params float32).

  Extra keyword arguments override the model's fields (e.g. dropout_rate=0.3 for VGG).
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
  return _REGISTRY[name](num_classes=num_classes, dtype=dtype, **kwargs)


def compute_dtype(name: str):
  """The compute dtype of config.model.dtype (one of DTYPES)."""
  if name == "auto":
    from jsim import parallel

    return parallel.default_compute_dtype()
  return jnp.dtype(name)


def embedding_dim(name: str, **kwargs: Any) -> int:
  """Width of the embedding of model `name` (the input of its head), without init."""
  return build(name, **kwargs).embedding_dim


register("resnet50", resnet.resnet50)
register("resnet_tiny", resnet.resnet_tiny)
register("vgg16", vgg.vgg16)
register("vgg_tiny", vgg.vgg_tiny)
register("efficientnet_lite0", efficientnet_lite.efficientnet_lite0)
register("efficientnet_lite1", efficientnet_lite.efficientnet_lite1)
register("efficientnet_lite2", efficientnet_lite.efficientnet_lite2)
register("efficientnet_lite_tiny", efficientnet_lite.efficientnet_lite_tiny)

__all__ = [
  "CONV_IMPLS",
  "DTYPES",
  "INITS",
  "available",
  "build",
  "compute_dtype",
  "embedding_dim",
  "from_pretrained",
  "from_torchvision",
  "register",
]
