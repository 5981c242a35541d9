"""torchvision weights -> Flax variables of jsim's ResNet50 / VGG16.

An explicit key table maps each torch state_dict entry to one Flax leaf. The port
fails loudly (ValueError naming the key) on a missing or unexpected torch key or on
a shape mismatch, and checks that every leaf of the Flax model is filled.

Conversions: conv weight OIHW -> HWIO (`transpose(2, 3, 1, 0)`); linear weight
[out, in] -> kernel [in, out] (`.T`); BatchNorm weight/bias/running_mean/running_var
-> params scale/bias, batch_stats mean/var (num_batches_tracked is dropped). VGG's fc6
needs no permutation: the Flax VGG transposes to NCHW before flattening, as torch does.

torch / torchvision are optional: they are imported here, lazily, and only when needed.
"""

from __future__ import annotations

import importlib
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jsim.models import resnet, vgg

# (torch key, Flax collection, path inside the collection, conversion)
Row = tuple[str, str, tuple[str, ...], str]

_CONVERT: dict[str, Callable[[np.ndarray], np.ndarray]] = {
  "conv": lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
  "linear": lambda w: np.ascontiguousarray(w.T),  # [out, in] -> [in, out]
  "copy": lambda w: w,
}


def _bn_rows(torch_prefix: str, flax_path: tuple[str, ...]) -> list[Row]:
  return [
    (f"{torch_prefix}.weight", "params", flax_path + ("scale",), "copy"),
    (f"{torch_prefix}.bias", "params", flax_path + ("bias",), "copy"),
    (f"{torch_prefix}.running_mean", "batch_stats", flax_path + ("mean",), "copy"),
    (f"{torch_prefix}.running_var", "batch_stats", flax_path + ("var",), "copy"),
  ]


def resnet_key_table(stage_sizes: tuple[int, ...] = (3, 4, 6, 3)) -> list[Row]:
  """torchvision ResNet (bottleneck) state_dict keys -> jsim.models.resnet.ResNet leaves."""
  rows: list[Row] = [("conv1.weight", "params", ("conv1", "kernel"), "conv")]
  rows += _bn_rows("bn1", ("bn1",))
  for s, n_blocks in enumerate(stage_sizes, start=1):
    for b in range(n_blocks):
      t, f = f"layer{s}.{b}", (f"layer{s}_{b}",)
      for k in (1, 2, 3):
        rows.append((f"{t}.conv{k}.weight", "params", f + (f"conv{k}", "kernel"), "conv"))
        rows += _bn_rows(f"{t}.bn{k}", f + (f"bn{k}",))
      if b == 0:  # the first block of every stage changes width (and stride): projection shortcut
        rows.append((f"{t}.downsample.0.weight", "params", f + ("downsample_conv", "kernel"), "conv"))
        rows += _bn_rows(f"{t}.downsample.1", f + ("downsample_bn",))
  rows += [("fc.weight", "params", ("head", "kernel"), "linear"), ("fc.bias", "params", ("head", "bias"), "copy")]
  return rows


def vgg_key_table(cfg: tuple[int | str, ...] = vgg.VGG16_CFG) -> list[Row]:
  """torchvision VGG (no BatchNorm) state_dict keys -> jsim.models.vgg.VGG leaves."""
  rows: list[Row] = []
  idx, block, k = 0, 1, 1  # idx: position in torch's `features` Sequential
  for v in cfg:
    if v == "M":
      idx, block, k = idx + 1, block + 1, 1
    else:
      name = f"conv{block}_{k}"
      rows += [
        (f"features.{idx}.weight", "params", (name, "kernel"), "conv"),
        (f"features.{idx}.bias", "params", (name, "bias"), "copy"),
      ]
      idx, k = idx + 2, k + 1  # Conv2d, ReLU
  # classifier: Linear(0) ReLU Dropout Linear(3) ReLU Dropout Linear(6)
  for i, name in ((0, "fc6"), (3, "fc7"), (6, "head")):
    rows += [
      (f"classifier.{i}.weight", "params", (name, "kernel"), "linear"),
      (f"classifier.{i}.bias", "params", (name, "bias"), "copy"),
    ]
  return rows


# arch -> (Flax model factory, key table, torch name of the head's weight)
_ARCHS: dict[str, tuple[Callable[..., Any], Callable[[], list[Row]], str]] = {
  "resnet50": (resnet.resnet50, resnet_key_table, "fc.weight"),
  "vgg16": (vgg.vgg16, vgg_key_table, "classifier.6.weight"),
}


def from_torchvision(arch: str, weights: Any, num_classes: int = 180, seed: int = 0) -> dict:
  """Flax variables of jsim's `arch` ('resnet50' or 'vgg16') from torchvision weights.

  Args:
    arch: 'resnet50' or 'vgg16'.
    weights: a torch state_dict (mapping name -> torch tensor or numpy array); or a
      path to a .pth/.pt file holding one (read with torch.load(weights_only=True));
      or a torchvision weights name such as 'IMAGENET1K_V1', 'IMAGENET1K_V2',
      'DEFAULT' (or 'ResNet50_Weights.IMAGENET1K_V2'), fetched with torchvision's own
      API (its cache, else a download).
    num_classes: width of the head of the Flax model the variables are for.
    seed: seeds the fresh head.

  Returns:
    {'params': ..., 'batch_stats': ...} (VGG: {'params': ...} only) as nested dicts of
    float32 numpy arrays, with exactly the tree of `jsim.models.build(arch, num_classes).init`.
    The torch head is kept when it already has `num_classes` outputs (e.g. ImageNet's
    1000-way head with num_classes=1000); otherwise it is replaced by a fresh one drawn
    like torch's nn.Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from `seed`.

  Raises:
    ValueError: unknown arch or weights name; missing, unexpected or mis-shaped keys.
    FileNotFoundError: a weights path that does not exist.
    ConnectionError: a weights name that is neither cached nor downloadable.
  """
  if arch not in _ARCHS:
    raise ValueError(f"from_torchvision: unknown arch {arch!r}; supported: {', '.join(sorted(_ARCHS))}")
  factory, key_table, head_key = _ARCHS[arch]
  state = _load_state_dict(arch, weights)
  return port(
    state, key_table(), factory(num_classes=num_classes), head_key, num_classes, seed, f"from_torchvision({arch!r})"
  )


def port(state: Mapping, rows: list[Row], model: Any, head_key: str, num_classes: int, seed: int, who: str) -> dict:
  """Flax variables of `model` from a torch state_dict (numpy float32 values), by the key table `rows`.

  Every torch key must be in the table and every table key in `state`; each value must have its
  leaf's shape after conversion; every leaf of `model` must be filled. The head (torch key
  `head_key`, the Flax module `head`) is kept when it has `num_classes` outputs, else drawn fresh
  from `seed` like torch's nn.Linear default. ValueError (naming `who` and the key) otherwise.
  """
  expected = _expected_shapes(model)
  table_keys = {r[0] for r in rows}
  missing = [r[0] for r in rows if r[0] not in state]
  unexpected = sorted(k for k in state if k not in table_keys)
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing {len(missing)} key(s): {_head(missing)}")
    if unexpected:
      parts.append(f"unexpected {len(unexpected)} key(s): {_head(unexpected)}")
    raise ValueError(f"{who}: the state_dict does not match the model: " + "; ".join(parts))

  head_prefix = head_key.rsplit(".", 1)[0]
  keep_head = state[head_key].ndim == 2 and state[head_key].shape[0] == num_classes
  variables: dict[str, dict] = {}
  for torch_key, collection, path, kind in rows:
    if not keep_head and torch_key.rsplit(".", 1)[0] == head_prefix:
      continue  # replaced below; its input width is still checked there
    value = state[torch_key]
    want = expected.get((collection, path))
    ndim = {"conv": 4, "linear": 2}.get(kind)
    got = _CONVERT[kind](value) if ndim is None or value.ndim == ndim else value
    if want is None or got.shape != want:
      raise ValueError(
        f"{who}: {torch_key} has shape {tuple(value.shape)}, "
        f"but {collection}/{'/'.join(path)} needs {want} ({kind} conversion)"
      )
    _set(variables, (collection,) + path, got)

  if not keep_head:
    kernel_shape = expected[("params", ("head", "kernel"))]
    fan_in = kernel_shape[0]
    if state[head_key].ndim != 2 or state[head_key].shape[1] != fan_in:
      raise ValueError(f"{who}: {head_key} has shape {tuple(state[head_key].shape)}, expected [n, {fan_in}]")
    k_kernel, k_bias = jax.random.split(jax.random.PRNGKey(seed))
    _set(
      variables,
      ("params", "head", "kernel"),
      np.asarray(resnet.torch_linear_kernel_init(k_kernel, kernel_shape, jnp.float32)),
    )
    _set(
      variables,
      ("params", "head", "bias"),
      np.asarray(resnet.torch_linear_bias_init(fan_in)(k_bias, (num_classes,), jnp.float32)),
    )

  filled = {(c, p) for c, p in _leaf_paths(variables)}
  unfilled = sorted("/".join((c,) + p) for c, p in expected if (c, p) not in filled)
  if unfilled:  # the key table and the Flax model disagree: a bug here, not in the weights
    raise ValueError(f"{who}: Flax leaves left unfilled: {_head(unfilled)}")
  return variables


def _head(names: list[str], n: int = 5) -> str:
  return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _leaf_paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[str, tuple[str, ...]]]:
  out = []
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out += _leaf_paths(v, prefix + (k,))
    else:
      out.append((prefix[0], prefix[1:] + (k,)))
  return out


def _expected_shapes(model: Any) -> dict[tuple[str, tuple[str, ...]], tuple[int, ...]]:
  """(collection, path) -> shape of every leaf of model.init, by abstract evaluation only."""
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init({"params": jax.random.PRNGKey(0)}, x, train=False), x)
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = tuple(str(k.key) for k in kp)
    out[(names[0], names[1:])] = tuple(leaf.shape)
  return out


def _load_state_dict(arch: str, weights: Any) -> dict[str, np.ndarray]:
  """Any accepted `weights` -> {torch key: float32 numpy array}, num_batches_tracked dropped."""
  if isinstance(weights, Mapping):
    state = weights
  elif isinstance(weights, (str, os.PathLike)):
    s = os.fspath(weights)
    if is_weights_path(s):
      state = _load_file(s)
    else:
      state = _load_named(arch, s)
  else:
    raise TypeError(
      f"from_torchvision: weights must be a state_dict, a path or a weights name, got {type(weights).__name__}"
    )
  # Tolerate the two usual wrappers: {'state_dict': ...} checkpoints and DataParallel's 'module.'.
  if "state_dict" in state and isinstance(state["state_dict"], Mapping):
    state = state["state_dict"]
  if state and all(k.startswith("module.") for k in state):
    state = {k[len("module.") :]: v for k, v in state.items()}
  out = {}
  for k, v in state.items():
    if k.endswith("num_batches_tracked"):
      continue
    if hasattr(v, "detach"):  # a torch tensor (torch is already imported by whoever made it)
      v = v.detach().cpu().float().numpy()
    # A copy: .numpy() (and asarray of a float32 array) shares memory with the caller's
    # tensors, which in-place edits or a torch train-mode forward (BN running stats) change.
    out[k] = np.array(v, dtype=np.float32, copy=True)
  return out


def _load_file(path: str) -> Mapping:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"from_torchvision: weights file not found: {path}")
  torch = _import("torch")
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001  (pickles of whole modules, truncated files, ...)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(
      f"from_torchvision: cannot read {path} as a state_dict with torch.load(weights_only=True): {first}"
    ) from e
  if not isinstance(state, Mapping):
    raise ValueError(f"from_torchvision: {path} holds a {type(state).__name__}, not a state_dict")
  return state


def _load_named(arch: str, name: str) -> Mapping:
  torchvision = _import("torchvision")
  enum = torchvision.models.get_model_weights(arch)
  member = name.split(".", 1)[1] if name.startswith(enum.__name__ + ".") else name
  if member not in enum.__members__:
    raise ValueError(
      f"from_torchvision: unknown weights {name!r} for {arch}; "
      f"available: {', '.join(enum.__members__)} (or a path to a .pth file)"
    )
  w = enum[member]
  try:
    return w.get_state_dict(progress=False)
  except OSError as e:  # urllib.error.URLError, socket timeouts, refused connections
    torch = _import("torch")
    file_name = w.url.rsplit("/", 1)[-1]
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    raise ConnectionError(
      f"from_torchvision: cannot download {enum.__name__}.{w.name} from {w.url} ({e}); without a "
      f"network, fetch {file_name} elsewhere and add --config.model.weights=/path/to/{file_name} "
      f"(or put the file in {cache})"
    ) from e


def is_weights_path(weights: str) -> bool:
  """Whether model.weights names a file (else a torchvision weights name such as IMAGENET1K_V1)."""
  return os.path.exists(weights) or not re.fullmatch(r"\w+(\.\w+)?", weights) or weights.endswith((".pth", ".pt"))


def missing_packages(weights: str) -> list[str]:
  """The packages that reading `weights` needs and that are not installed (found without importing them)."""
  import importlib.util

  needed = ["torch"] if is_weights_path(weights) else ["torch", "torchvision"]
  return [m for m in needed if importlib.util.find_spec(m) is None]


def weights_status(arch: str, weights: str) -> tuple[str, int]:
  """What stage 1 will read for model.init='torchvision': (a phrase, bytes it will download).

  'a weights file of 98 MB', or torchvision's file in its cache, or the download it needs;
  ValueError for an unknown name, FileNotFoundError for a missing file.
  """
  if is_weights_path(weights):
    if not os.path.isfile(weights):
      raise FileNotFoundError(
        f"model.weights={weights}: no such file (a .pth state_dict, or a name such as IMAGENET1K_V1)"
      )
    return f"{weights} ({os.path.getsize(weights) / 1e6:.0f} MB)", 0
  torchvision, torch = _import("torchvision"), _import("torch")
  enum = torchvision.models.get_model_weights(arch)
  member = weights.split(".", 1)[1] if weights.startswith(enum.__name__ + ".") else weights
  if member not in enum.__members__:
    raise ValueError(
      f"model.weights={weights!r}: torchvision has no such weights for {arch}; "
      f"available: {', '.join(enum.__members__)} (or a path to a .pth file)"
    )
  w = enum[member]
  path = os.path.join(torch.hub.get_dir(), "checkpoints", w.url.rsplit("/", 1)[-1])
  if os.path.isfile(path):
    return f"torchvision's {enum.__name__}.{w.name}, in its cache ({path})", 0
  size = int(float(w.meta.get("_file_size", 0)) * 2**20)
  return (
    f"torchvision's {enum.__name__}.{w.name}: not in its cache, stage 1 downloads it from {w.url} "
    f"({size / 1e6:.0f} MB) into {os.path.dirname(path)}",
    size,
  )


def _import(module: str) -> Any:
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f"from_torchvision needs {module}: pip install 'jsim[torch]'") from e
