"""jsim.export: the ONNX graphs, run by onnxruntime, against jsim's own Flax outputs.

Every registered backbone (random weights, BatchNorm statistics from real train-mode
batches so that no layer is dead), at an input size equal to, above and below the
image size (the three resize paths of augment.preprocess), several batch sizes through
one session (dynamic batch), the similarity net for every pair feature, and an ensemble;
for metric learning, a MetricModel with and without its embedding head (and a loss with
parameters in its tree) and the calibrated distance scorer (l2, cosine).
Tolerance: 1e-4 relative elementwise, with an absolute floor of 1e-5 of the output's scale
(for the elements near zero that ReLU and averaging produce).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from jsim import losses, models  # noqa: E402
from jsim.data import augment  # noqa: E402
from jsim.export import graph  # noqa: E402
from jsim.models import distance  # noqa: E402
from jsim.models.metric_model import MetricModel  # noqa: E402
from jsim.models.similarity import SimilarityMLP, make_prob_fn  # noqa: E402
from conftest import parametrize_fast_first  # noqa: E402

MEAN, STD = (0.48, 0.46, 0.41), (0.23, 0.22, 0.26)


def assert_close(out: np.ndarray, ref: np.ndarray) -> None:
  assert out.shape == ref.shape and out.dtype == np.float32
  scale = float(np.abs(ref).max())
  assert scale > 0 and np.count_nonzero(ref) > ref.size // 20, "a degenerate reference proves nothing"
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * scale)


def random_variables(model, input_size: int, seed: int = 0) -> dict:
  """Random weights; BatchNorm running statistics from a few train-mode batches (realistic, not 0/1)."""
  key = jax.random.key(seed)
  x = jnp.zeros((1, input_size, input_size, 3))
  v = jax.jit(lambda key, x: model.init({"params": key, "dropout": key}, x, train=False))(key, x)
  if "batch_stats" in v:

    @jax.jit
    def update(v, x):
      _, new = model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": key})
      return {**v, **new}

    for i in range(12):
      v = update(v, jax.random.normal(jax.random.fold_in(key, i), (4, input_size, input_size, 3)))
  return jax.tree.map(np.asarray, v)


def jsim_embeddings(model, variables, images: np.ndarray, input_size: int, mean=MEAN, std=STD) -> np.ndarray:
  """model's embeddings of uint8 images, as jsim computes them (jitted: op by op, every layer's operations would
  be compiled one at a time, seconds a model)."""
  x = augment.preprocess(jnp.asarray(images), mean, std, input_size)
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False)[1])(variables, x))


def session(model_proto):
  return ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


TINY = [name for name in models.available() if name.endswith("_tiny")]


def test_every_registered_backbone_has_a_graph():
  for name in models.available():
    graph.builder_for(models.build(name, num_classes=3))


@pytest.mark.parametrize("input_size", [32, 48, 24], ids=["same", "upsampled", "downsampled"])
@pytest.mark.parametrize("name", TINY)
@pytest.mark.slow
def test_tiny_backbone_embeddings_match_jsim(name, input_size):
  model = models.build(name, num_classes=5)
  variables = random_variables(model, input_size)
  sess = session(graph.embed_graph([graph.Member(model, variables, MEAN, STD, input_size)], image_size=32))
  assert sess.get_inputs()[0].shape == ["N", 32, 32, 3]
  for n in (1, 5):  # one session, two batch sizes
    x = images(n, 32, seed=n)
    assert_close(sess.run(None, {"images": x})[0], jsim_embeddings(model, variables, x, input_size))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_full_size_backbones_at_64_px(name):
  model = models.build(name, num_classes=4)
  variables = random_variables(model, 64)
  sess = session(graph.embed_graph([graph.Member(model, variables, MEAN, STD, 64)], image_size=64))
  x = images(2, 64)
  assert_close(sess.run(None, {"images": x})[0], jsim_embeddings(model, variables, x, 64))


@pytest.mark.slow
def test_vgg_at_the_size_where_its_adaptive_pool_is_the_identity():
  model = models.build("vgg_tiny", num_classes=3)  # two pools: 28 px -> 7 x 7, as vgg16 at 224 px
  variables = random_variables(model, 28)
  sess = session(graph.embed_graph([graph.Member(model, variables, MEAN, STD, 28)], image_size=28))
  x = images(2, 28)
  assert_close(sess.run(None, {"images": x})[0], jsim_embeddings(model, variables, x, 28))


def test_resize_matrix_is_the_preprocess_resize():
  """Upsampling 4 -> 6 px by hand: half-pixel centres, clamped at the borders (torch's align_corners=False)."""
  r = graph.resize_matrix(4, 6)
  expected = np.zeros((6, 4), np.float32)
  for i in range(6):
    c = min(max((i + 0.5) * 4 / 6 - 0.5, 0.0), 3.0)
    lo = int(np.floor(c))
    expected[i, lo] += 1 - (c - lo)
    if c > lo:
      expected[i, lo + 1] += c - lo
  np.testing.assert_allclose(r, expected, atol=1e-6)
  np.testing.assert_allclose(graph.resize_matrix(8, 4).sum(axis=1), 1.0, atol=1e-6)  # antialiased rows average


@pytest.mark.slow
def test_ensemble_concatenates_members_with_their_own_preprocessing():
  a = models.build("resnet_tiny", num_classes=5)
  b = models.build("vgg_tiny", num_classes=5)
  va, vb = random_variables(a, 32, seed=1), random_variables(b, 40, seed=2)
  members = [graph.Member(a, va, MEAN, STD, 32), graph.Member(b, vb, STD, MEAN, 40)]
  proto = graph.embed_graph(members, image_size=32)
  onnx.checker.check_model(proto, full_check=True)  # a valid ONNX model, shapes inferred, not only one ORT runs
  sess = session(proto)
  x = images(3, 32)
  ref_b = jsim_embeddings(b, vb, x, 40, mean=STD, std=MEAN)
  out = sess.run(None, {"images": x})[0]
  assert out.shape == (3, a.embedding_dim + b.embedding_dim)
  assert_close(out[:, : a.embedding_dim], jsim_embeddings(a, va, x, 32))
  assert_close(out[:, a.embedding_dim :], ref_b)


@parametrize_fast_first("feature", ["l1", "sq", "prod", "cos", "l2", "l1+prod"])
def test_similarity_graph_matches_ms(feature):
  dim = 16
  model = SimilarityMLP(feature=feature)
  rng = np.random.default_rng(0)
  e1 = rng.normal(size=(7, dim)).astype(np.float32)
  e2 = e1 + rng.normal(scale=0.7, size=(7, dim)).astype(np.float32)
  e2[0] = e1[0]  # identical embeddings: the distances' zero
  params = model.init(jax.random.key(3), e1, e2, train=False)["params"]
  proto = graph.similarity_graph(params, feature, dim)
  onnx.checker.check_model(proto, full_check=True)
  sess = session(proto)
  out = sess.run(None, {"e1": e1, "e2": e2})[0]
  ref = np.asarray(make_prob_fn(model)(params, e1, e2))
  assert out.shape == (7,)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(sess.run(None, {"e1": e2[:2], "e2": e1[:2]})[0], ref[:2], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("head_dim", [0, 8], ids=["backbone_embedding", "head_normalised"])
@pytest.mark.slow
def test_metric_model_embeddings_match_jsim(head_dim):
  model = MetricModel(
    backbone=models.build("resnet_tiny", num_classes=5),
    head_dim=head_dim,
    loss=losses.build("proxy_anchor"),
    num_classes=5,
  )
  variables = random_variables(model, 24)
  assert "loss" in variables["params"]  # the proxies are in the tree the graph is built from, and take no part
  proto = graph.embed_graph([graph.Member(model, variables, MEAN, STD, 24)], image_size=32)
  onnx.checker.check_model(proto, full_check=True)
  sess = session(proto)
  for n in (1, 4):
    x = images(n, 32, seed=n)
    out, ref = sess.run(None, {"images": x})[0], jsim_embeddings(model, variables, x, 24)
    assert out.shape == (n, model.embedding_dim)
    assert_close(out, ref)
  if head_dim:
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("kind", distance.DISTANCES)
def test_distance_graph_matches_the_calibrated_distance(kind):
  dim = 8
  rng = np.random.default_rng(1)
  e1 = rng.normal(size=(9, dim)).astype(np.float32)
  e2 = e1 + rng.normal(scale=0.8, size=(9, dim)).astype(np.float32)
  e2[0] = e1[0]  # identical embeddings: distance 0
  e2[1] = -e1[1]  # opposite: cosine distance 2
  # A calibration fitted as stage 2 fits it: distances of similar pairs smaller than dissimilar ones.
  d = np.asarray(distance.pair_distance(jnp.asarray(e1), jnp.asarray(e2), kind))
  same = d < np.median(d)
  same[[0, -1]] = ~same[[0, -1]]  # not separable: finite scale
  scale, bias = distance.fit_logistic(d, same)
  params = distance.params_of({"scale": scale, "bias": bias})
  proto = graph.distance_graph(params, kind, dim)
  onnx.checker.check_model(proto, full_check=True)
  sess = session(proto)
  out = sess.run(None, {"e1": e1, "e2": e2})[0]
  ref = np.asarray(distance.make_prob_fn(kind)(params, e1, e2))
  assert out.shape == (9,) and out.dtype == np.float32
  assert np.ptp(ref) > 0.5, "a degenerate calibration proves nothing"
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(sess.run(None, {"e1": e2[:3], "e2": e1[:3]})[0], ref[:3], rtol=1e-4, atol=1e-6)
