"""ONNX graphs built directly from jsim's Flax modules and their variables (the `onnx` package only).

    embed = embed_graph([Member(model, variables, mean, std, input_size)], image_size=64)
    prob = similarity_graph(params, feature="l1", embedding_dim=2048)
    onnx.save(embed, "embed.onnx")

`embed_graph`: uint8 images [N, S, S, 3] -> float32 embeddings [N, E], with the eval
preprocessing inside (uint8 / 255, the resize to the model's input size, the per-channel
normalisation: what `augment.preprocess` does). The resize is separable and linear, so
it is two MatMuls with matrices read off `augment.preprocess` itself (applied to basis
images): up- and antialiased downsampling are exactly jsim's, by construction. An
ensemble is one graph: every member from the same input, concatenated in order.

`similarity_graph`: (e1 [N, E], e2 [N, E]) -> P(same) [N], Ms with its pair feature;
`distance_graph`: the same signature for similarity.model=distance, sigmoid(scale d + bias).

A metric-learning MetricModel is one more registered builder: its backbone's graph,
then (head_dim > 0) the embedding head's Gemm and the L2 normalisation.

Why not a converter: jax2onnx 0.17.1 fails on jsim's ResNet (its flax max_pool patch
rejects the positional window argument: a TypeError at trace time; a converted graph also
had a residual Add that onnxruntime refused), it pins
orbax-checkpoint < 0.11.37 (jsim runs 0.12) and pulls equinox, dm-pix, huggingface-hub and
netron; jax.export gives StableHLO, not ONNX. jsim's architectures are few and known: the
graphs here are NCHW (onnxruntime's fast layout) with BatchNorm folded into the convs.

A backbone class gets its graph from a builder registered with `register_builder`;
every model in `jsim.models.available()` has one (a test checks).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jsim.models import distance as distance_lib, efficientnet_lite, metric_model, resnet, vgg
from jsim.models.similarity import parse_feature_kind

OPSET = 17
BATCH = "N"  # the symbolic (dynamic) batch dimension
IMAGES, EMBEDDINGS = "images", "embeddings"
E1, E2, P_SAME = "e1", "e2", "p_same"
BN_EPSILON = 1e-5  # jsim.models.resnet's BatchNorm epsilon (torch's)
COS_EPSILON = 1e-12  # jsim.models.similarity's floor of |e1| |e2| in the cosine


class Graph:
  """Collects nodes and initializers under unique names."""

  def __init__(self, prefix: str = ""):
    self.prefix = prefix
    self.nodes: list[onnx.NodeProto] = []
    self.initializers: list[onnx.TensorProto] = []
    self._count = 0

  def _name(self, hint: str) -> str:
    self._count += 1
    return f"{self.prefix}{hint}_{self._count}"

  def const(self, array: Any, hint: str = "c", dtype=np.float32) -> str:
    name = self._name(hint)
    self.initializers.append(numpy_helper.from_array(np.array(array, dtype, order="C"), name))
    return name

  def op(self, op_type: str, inputs: Sequence[str], hint: str | None = None, output: str | None = None, **attrs) -> str:
    out = output or self._name(hint or op_type.lower())
    self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self._name(op_type), **attrs))
    return out

  def model(
    self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], name: str, doc: str = ""
  ) -> onnx.ModelProto:
    g = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.initializers)
    m = helper.make_model(
      g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="jsim.export", doc_string=doc
    )
    m.ir_version = min(m.ir_version, 9)  # what onnxruntime >= 1.16 reads
    return m


# ----------------------------------------------------------------------------- preprocessing


def resize_matrix(image_size: int, input_size: int) -> np.ndarray:
  """[input_size, image_size] matrix R with preprocess(x) = R x R^T per channel (before normalising).

  Read off `augment.preprocess` itself: row k of the image set to 1 gives column k of R.
  """
  import jax.numpy as jnp
  from jsim.data import augment

  basis = np.zeros((image_size, image_size, image_size, 3), np.float32)
  basis[np.arange(image_size), np.arange(image_size)] = 1.0  # image k: row k is 1
  out = augment.preprocess(jnp.asarray(basis), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), input_size)
  return np.asarray(out)[:, :, 0, 0].T.astype(np.float32)  # out[k, i, j, c] = R[i, k]


def preprocess(
  g: Graph, images: str, mean: Sequence[float], std: Sequence[float], image_size: int, input_size: int
) -> str:
  """uint8 NHWC [N, S, S, 3] -> normalised float32 NCHW [N, 3, input_size, input_size], as augment.preprocess."""
  x = g.op("Transpose", [images], perm=[0, 3, 1, 2])
  x = g.op("Cast", [x], to=TensorProto.FLOAT)
  x = g.op("Div", [x, g.const(255.0, "u8_scale")])
  mean_c = g.const(np.reshape(mean, (1, 3, 1, 1)), "mean")
  std_c = g.const(np.reshape(std, (1, 3, 1, 1)), "std")

  def normalise(x):
    return g.op("Div", [g.op("Sub", [x, mean_c]), std_c])

  def resize(x):
    r = resize_matrix(image_size, input_size)
    x = g.op("MatMul", [x, g.const(r.T, "resize_cols")])  # [N, 3, S, s]
    return g.op("MatMul", [g.const(r, "resize_rows"), x])  # [N, 3, s, s]

  if input_size == image_size:
    return normalise(x)
  # jsim's order: sample then normalise when upsampling, normalise then shrink when downsampling.
  return normalise(resize(x)) if input_size > image_size else resize(normalise(x))


# ----------------------------------------------------------------------------- backbones


def _conv(
  g: Graph, x: str, kernel: np.ndarray, bias: np.ndarray | None, strides: int, pad, hint: str, groups: int = 1
) -> str:
  """pad: an int (all sides), or ONNX's [top, left, bottom, right]."""
  w = np.transpose(np.asarray(kernel, np.float32), (3, 2, 0, 1))  # HWIO -> OIHW
  inputs = [x, g.const(w, hint + "_w")]
  if bias is not None:
    inputs.append(g.const(bias, hint + "_b"))
  pads = [pad] * 4 if isinstance(pad, int) else list(pad)
  return g.op(
    "Conv", inputs, hint=hint, kernel_shape=list(w.shape[2:]), strides=[strides, strides], pads=pads, group=groups
  )


def _conv_bn(
  g: Graph,
  x: str,
  params: dict,
  stats: dict,
  conv: str,
  bn: str,
  strides: int,
  pad,
  groups: int = 1,
  epsilon: float = BN_EPSILON,
) -> str:
  """A bias-free conv followed by eval-mode BatchNorm, folded into one conv with a bias."""
  p, s = params[bn], stats[bn]
  scale = np.asarray(p["scale"], np.float64) / np.sqrt(np.asarray(s["var"], np.float64) + epsilon)
  kernel = np.asarray(params[conv]["kernel"], np.float64) * scale  # scales the output channels (O)
  bias = np.asarray(p["bias"], np.float64) - np.asarray(s["mean"], np.float64) * scale
  return _conv(g, x, kernel, bias, strides, pad, conv, groups)


def resnet_graph(g: Graph, x: str, model: resnet.ResNet, variables: dict, input_size: int) -> str:
  """NCHW float input -> [N, embedding_dim] (the global-average-pooled features), as ResNet.__call__."""
  params, stats = variables["params"], variables["batch_stats"]
  x = g.op("Relu", [_conv_bn(g, x, params, stats, "conv1", "bn1", 2, 3)])
  x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])  # padding ignored = -inf
  for s, n_blocks in enumerate(model.stage_sizes):
    for b in range(n_blocks):
      name = f"layer{s + 1}_{b}"
      bp, bs = params[name], stats[name]
      strides = 2 if s > 0 and b == 0 else 1
      y = g.op("Relu", [_conv_bn(g, x, bp, bs, "conv1", "bn1", 1, 0)])
      y = g.op("Relu", [_conv_bn(g, y, bp, bs, "conv2", "bn2", strides, 1)])
      y = _conv_bn(g, y, bp, bs, "conv3", "bn3", 1, 0)
      shortcut = x
      if "downsample_conv" in bp:  # present exactly where the model projects the shortcut
        shortcut = _conv_bn(g, x, bp, bs, "downsample_conv", "downsample_bn", strides, 0)
      x = g.op("Relu", [g.op("Add", [y, shortcut])])
  return g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)


def efficientnet_lite_graph(
  g: Graph, x: str, model: efficientnet_lite.EfficientNetLite, variables: dict, input_size: int
) -> str:
  """NCHW float input -> [N, 1280] (the pooled top features), as EfficientNetLite.__call__ in eval mode.

  TF-same padding is static here (the input size is known): ONNX's pads [top, left, bottom, right]."""
  params, stats = variables["params"], variables["batch_stats"]
  side = input_size

  def conv_bn(x, p, s, name, kernel, stride, groups, act):
    nonlocal side
    lo, hi = efficientnet_lite.same_padding(side, kernel, stride)
    side = -(-side // stride)
    y = _conv_bn(
      g, x, p, s, f"{name}_conv", f"{name}_bn", stride, [lo, lo, hi, hi], groups, efficientnet_lite.BN_EPSILON
    )
    return g.op("Clip", [y, g.const(0.0, "zero"), g.const(6.0, "six")]) if act else y  # ReLU6

  x = conv_bn(x, params, stats, "stem", 3, 2, 1, True)
  for s, (repeats, kernel, stride, expand, _, cout) in enumerate(
    efficientnet_lite.stage_specs(model.width, model.depth), start=1
  ):
    for b in range(repeats):
      bp, bs = params[f"stage{s}_{b}"], stats[f"stage{s}_{b}"]
      cin = int(bp["project_conv"]["kernel"].shape[2]) // expand
      mid = cin * expand
      y = conv_bn(x, bp, bs, "expand", 1, 1, 1, True) if expand != 1 else x
      y = conv_bn(y, bp, bs, "depthwise", kernel, stride if b == 0 else 1, mid, True)
      y = conv_bn(y, bp, bs, "project", 1, 1, 1, False)
      x = g.op("Add", [y, x]) if (stride if b == 0 else 1) == 1 and cin == cout else y
  x = conv_bn(x, params, stats, "top", 1, 1, 1, True)
  return g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)


def vgg_graph(g: Graph, x: str, model: vgg.VGG, variables: dict, input_size: int) -> str:
  """NCHW float input -> [N, fc_width] (fc7 after its ReLU), as VGG.__call__ in eval mode."""
  params = variables["params"]
  block, k, side = 1, 1, input_size
  for v in model.cfg:
    if v == "M":
      x = g.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])  # floors odd sizes, as torch and Flax
      block, k, side = block + 1, 1, side // 2
    else:
      name = f"conv{block}_{k}"
      x = g.op("Relu", [_conv(g, x, params[name]["kernel"], params[name]["bias"], 1, 1, name)])
      k += 1
  if side != model.pool_size:  # torch's adaptive average pool, as vgg.adaptive_avg_pool (identity at 224 px)
    pool = vgg.adaptive_pool_matrix(side, model.pool_size)
    x = g.op("MatMul", [x, g.const(pool.T, "pool_cols")])
    x = g.op("MatMul", [g.const(pool, "pool_rows"), x])
  x = g.op("Flatten", [x], axis=1)  # NCHW order, as jsim flattens
  for name in ("fc6", "fc7"):
    x = g.op(
      "Relu",
      [
        g.op(
          "Gemm",
          [x, g.const(params[name]["kernel"], name + "_w"), g.const(params[name]["bias"], name + "_b")],
          hint=name,
        )
      ],
    )
  return x


def l2_normalize(g: Graph, x: str) -> str:
  """metric_model.l2_normalize: x / max(||x||, 1e-12) over the last axis."""
  return g.op("Div", [x, g.op("Max", [_norm(g, x), g.const(metric_model.NORMALIZE_EPS, "eps")])])


def metric_model_graph(g: Graph, x: str, model: metric_model.MetricModel, variables: dict, input_size: int) -> str:
  """NCHW float input -> [N, embedding_dim], as MetricModel.__call__: the backbone's embedding,
  or its projection by the embedding head, L2-normalised (the loss's parameters take no part)."""
  backbone_vars = {k: v["backbone"] for k, v in variables.items() if "backbone" in v}
  e = builder_for(model.backbone)(g, x, model.backbone, backbone_vars, input_size)
  if not model.head_dim:
    return e
  head = variables["params"]["embedding_head"]
  e = g.op("Gemm", [e, g.const(head["kernel"], "head_w"), g.const(head["bias"], "head_b")], hint="embedding_head")
  return l2_normalize(g, e)


Builder = Callable[[Graph, str, Any, dict, int], str]
_BUILDERS: dict[type, Builder] = {
  resnet.ResNet: resnet_graph,
  vgg.VGG: vgg_graph,
  efficientnet_lite.EfficientNetLite: efficientnet_lite_graph,
  metric_model.MetricModel: metric_model_graph,
}


def register_builder(module_type: type, builder: Builder) -> None:
  """Registers `builder(graph, nchw_input, model, variables, input_size) -> embedding name` for a backbone class."""
  _BUILDERS[module_type] = builder


def builder_for(model: Any) -> Builder:
  for cls in type(model).__mro__:
    if cls in _BUILDERS:
      return _BUILDERS[cls]
  raise ValueError(
    f"no ONNX graph for backbone {type(model).__name__}; register one with jsim.export.graph.register_builder"
  )


@dataclasses.dataclass(frozen=True)
class Member:
  """One backbone of an embed graph: its module, variables and eval preprocessing."""

  model: Any
  variables: dict
  mean: Sequence[float]
  std: Sequence[float]
  input_size: int


def _to_numpy(tree):
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def embed_graph(members: Sequence[Member], image_size: int, doc: str = "") -> onnx.ModelProto:
  """uint8 [N, image_size, image_size, 3] -> float32 [N, sum of embedding widths]."""
  if not members:
    raise ValueError("embed_graph needs at least one backbone")
  g = Graph()
  outs = []
  for i, m in enumerate(members):
    g.prefix = f"m{i}/" if len(members) > 1 else ""
    x = preprocess(g, IMAGES, m.mean, m.std, image_size, int(m.input_size))
    outs.append(builder_for(m.model)(g, x, m.model, _to_numpy(m.variables), int(m.input_size)))
  g.prefix = ""
  dim = sum(int(m.model.embedding_dim) for m in members)
  if len(outs) == 1:
    g.op("Identity", outs, output=EMBEDDINGS)
  else:
    g.op("Concat", outs, output=EMBEDDINGS, axis=1)
  return g.model(
    [helper.make_tensor_value_info(IMAGES, TensorProto.UINT8, [BATCH, image_size, image_size, 3])],
    [helper.make_tensor_value_info(EMBEDDINGS, TensorProto.FLOAT, [BATCH, dim])],
    "jsim_embed",
    doc,
  )


# ----------------------------------------------------------------------------- the similarity net


def _norm(g: Graph, x: str) -> str:
  return g.op("Sqrt", [g.op("ReduceSum", [g.op("Mul", [x, x]), g.const([-1], "axes", np.int64)], keepdims=1)])


def pair_features(g: Graph, e1: str, e2: str, kind: str) -> str:
  """The graph of jsim.models.similarity.pair_features: [N, D] x 2 -> [N, F]."""
  parts = []
  for p in parse_feature_kind(kind):
    if p == "l1":
      parts.append(g.op("Abs", [g.op("Sub", [e1, e2])]))
    elif p == "sq":
      d = g.op("Sub", [e1, e2])
      parts.append(g.op("Mul", [d, d]))
    elif p == "prod":
      parts.append(g.op("Mul", [e1, e2]))
    elif p == "l2":
      parts.append(_norm(g, g.op("Sub", [e1, e2])))
    elif p == "cos":
      dot = g.op("ReduceSum", [g.op("Mul", [e1, e2]), g.const([-1], "axes", np.int64)], keepdims=1)
      denom = g.op("Max", [g.op("Mul", [_norm(g, e1), _norm(g, e2)]), g.const(COS_EPSILON, "eps")])
      parts.append(g.op("Div", [dot, denom]))
  return parts[0] if len(parts) == 1 else g.op("Concat", parts, axis=-1)


def similarity_graph(params: dict, feature: str, embedding_dim: int, doc: str = "") -> onnx.ModelProto:
  """(e1, e2) float32 [N, D] -> P(same) float32 [N]: SimilarityMLP in eval mode, then softmax[..., 1]."""
  params = _to_numpy(params)
  g = Graph()
  x = pair_features(g, E1, E2, feature)
  hidden = sorted((k for k in params if k.startswith("hidden")), key=lambda k: int(k[len("hidden") :]))
  for name in hidden + ["out"]:
    x = g.op(
      "Gemm", [x, g.const(params[name]["kernel"], name + "_w"), g.const(params[name]["bias"], name + "_b")], hint=name
    )
    if name != "out":
      x = g.op("Relu", [x])
  probs = g.op("Softmax", [x], axis=-1)
  g.op("Gather", [probs, g.const(1, "same", np.int64)], output=P_SAME, axis=1)
  return _pair_model(g, embedding_dim, doc)


def _pair_model(g: Graph, embedding_dim: int, doc: str) -> onnx.ModelProto:
  """The model of a graph from E1, E2 [N, embedding_dim] to P_SAME [N]."""
  spec = [BATCH, embedding_dim]
  return g.model(
    [
      helper.make_tensor_value_info(E1, TensorProto.FLOAT, spec),
      helper.make_tensor_value_info(E2, TensorProto.FLOAT, spec),
    ],
    [helper.make_tensor_value_info(P_SAME, TensorProto.FLOAT, [BATCH])],
    "jsim_similarity",
    doc,
  )


def pair_distance(g: Graph, e1: str, e2: str, kind: str) -> str:
  """The graph of jsim.models.distance.pair_distance: [N, D] x 2 -> [N, 1]."""
  if kind == "l2":
    return _norm(g, g.op("Sub", [e1, e2]))  # (a sum of squares is >= 0: jsim's max(., 0) is the identity)
  if kind == "cosine":
    eps = g.const(metric_model.NORMALIZE_EPS, "eps")
    dot = g.op("ReduceSum", [g.op("Mul", [e1, e2]), g.const([-1], "axes", np.int64)], keepdims=1)
    denom = g.op("Mul", [g.op("Max", [_norm(g, e1), eps]), g.op("Max", [_norm(g, e2), eps])])
    return g.op("Sub", [g.const(1.0, "one"), g.op("Div", [dot, denom])])
  raise ValueError(f"similarity.distance={kind!r}: expected one of {', '.join(distance_lib.DISTANCES)}")


def distance_graph(params: dict, distance: str, embedding_dim: int, doc: str = "") -> onnx.ModelProto:
  """(e1, e2) float32 [N, D] -> P(same) float32 [N]: sigmoid(scale * distance + bias), as distance.make_prob_fn."""
  g = Graph()
  d = pair_distance(g, E1, E2, distance)
  z = g.op("Add", [g.op("Mul", [d, g.const(params["scale"], "scale")]), g.const(params["bias"], "bias")])
  g.op("Squeeze", [g.op("Sigmoid", [z]), g.const([1], "axes", np.int64)], output=P_SAME)
  return _pair_model(g, embedding_dim, doc)
