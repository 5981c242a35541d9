"""torchvision -> Flax port: parity with torchvision itself, the key table's checks, loading paths."""

from __future__ import annotations

import math
import socket
import urllib.error

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import jsim.models as models  # noqa: E402

SIZES = (224, 96)  # at 96 px VGG's adaptive pool maps 3x3 -> 7x7 (not the identity)


def _randomise_batchnorm(model: torch.nn.Module, seed: int) -> None:
  """Random running statistics and affine parameters, so the port of every BN field matters."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5, generator=g)
        m.running_var.uniform_(0.5, 2.0, generator=g)
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.uniform_(-0.5, 0.5, generator=g)


@pytest.fixture(scope="module")
def reference():
  """arch -> (torch model, eval mode, random weights and BN stats; {size: (x NHWC, logits, embedding)})."""
  torch.manual_seed(0)
  out = {}
  for arch in ("resnet50", "vgg16"):
    tm = getattr(torchvision.models, arch)(weights=None).eval()
    _randomise_batchnorm(tm, seed=1)
    last = tm.fc if arch == "resnet50" else tm.classifier[6]
    seen = {}
    hook = last.register_forward_hook(lambda m, inputs, output: seen.__setitem__("emb", inputs[0]))
    g = torch.Generator().manual_seed(2)
    runs = {}
    for size in SIZES:
      x = torch.randn(2, 3, size, size, generator=g)
      with torch.no_grad():
        logits = tm(x)
      runs[size] = (x.numpy().transpose(0, 2, 3, 1), logits.numpy(), seen["emb"].numpy())
    hook.remove()
    out[arch] = (tm, runs)
  return out


def _close(got, ref):
  np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("arch", ["resnet50", "vgg16"])
def test_logits_and_embeddings_match_torchvision(reference, arch):
  tm, runs = reference[arch]
  variables = models.from_torchvision(arch, tm.state_dict(), num_classes=1000)
  model = models.build(arch, num_classes=1000)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  for size in SIZES:
    x, ref_logits, ref_emb = runs[size]
    logits, emb = apply(variables, jnp.asarray(x))
    _close(logits, ref_logits)
    _close(emb, ref_emb)

  # 180 classes: same backbone, a fresh seeded head drawn like torch's nn.Linear default.
  v180 = models.from_torchvision(arch, tm.state_dict(), num_classes=180, seed=3)
  same = jax.tree_util.tree_map(
    np.array_equal,
    {**v180, "params": {**v180["params"], "head": None}},
    {**variables, "params": {**variables["params"], "head": None}},
  )
  assert all(jax.tree_util.tree_leaves(same))
  head = v180["params"]["head"]
  fan_in = model.embedding_dim
  assert head["kernel"].shape == (fan_in, 180) and head["bias"].shape == (180,)
  bound = 1 / math.sqrt(fan_in)
  assert np.abs(head["kernel"]).max() <= bound and np.abs(head["kernel"]).max() > 0.99 * bound
  assert np.abs(head["bias"]).max() <= bound
  for seed, same_head in ((3, True), (4, False)):  # seeded: reproducible, and the seed matters
    again = models.from_torchvision(arch, tm.state_dict(), num_classes=180, seed=seed)["params"]["head"]
    assert np.array_equal(again["kernel"], head["kernel"]) == same_head
  x, _, ref_emb = runs[SIZES[-1]]
  model180 = models.build(arch, num_classes=180)
  logits, emb = jax.jit(lambda v, x: model180.apply(v, x, train=False))(v180, jnp.asarray(x))
  _close(emb, ref_emb)
  np.testing.assert_allclose(logits, emb @ head["kernel"] + head["bias"], rtol=1e-4, atol=1e-4)


def test_ported_tree_is_exactly_the_init_tree(reference):
  ported = {}
  for arch, (tm, _) in reference.items():
    ported[arch] = v = models.from_torchvision(arch, tm.state_dict(), num_classes=180)
    model = models.build(arch, num_classes=180)
    shapes = jax.eval_shape(
      lambda x: model.init({"params": jax.random.PRNGKey(0)}, x, train=False),
      jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )
    assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(shapes)
    for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(shapes)):
      assert a.shape == b.shape and a.dtype == np.float32
  # Conversion conventions on a few leaves: OIHW -> HWIO, [out, in] -> [in, out], BN stats.
  tm = reference["vgg16"][0]
  vp = ported["vgg16"]["params"]
  np.testing.assert_array_equal(vp["fc7"]["kernel"], tm.classifier[3].weight.detach().numpy().T)
  np.testing.assert_array_equal(vp["conv5_3"]["bias"], tm.features[28].bias.detach().numpy())
  sd = reference["resnet50"][0].state_dict()
  got = ported["resnet50"]
  np.testing.assert_array_equal(
    got["params"]["layer2_0"]["conv2"]["kernel"], sd["layer2.0.conv2.weight"].numpy().transpose(2, 3, 1, 0)
  )
  np.testing.assert_array_equal(got["batch_stats"]["layer3_5"]["bn3"]["var"], sd["layer3.5.bn3.running_var"].numpy())
  np.testing.assert_array_equal(
    got["params"]["layer4_0"]["downsample_bn"]["scale"], sd["layer4.0.downsample.1.weight"].numpy()
  )


def test_ported_arrays_are_copies(reference):
  # Converting must not alias the caller's tensors: editing them in place, or a train-mode
  # forward (which updates BN running statistics in place), leaves the Flax variables as they were.
  import copy

  tm = copy.deepcopy(reference["resnet50"][0])
  variables = models.from_torchvision("resnet50", tm.state_dict(), num_classes=180)
  numpy_sd = {k: v.numpy().copy() for k, v in tm.state_dict().items()}
  from_numpy = models.from_torchvision("resnet50", numpy_sd, num_classes=180)
  before = jax.tree_util.tree_map(np.copy, variables)
  tm.train()
  with torch.no_grad():
    tm(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 3 + 1)
    tm.bn1.weight.mul_(2.0)
    tm.layer1[0].bn2.bias.sub_(1.0)
    for v in numpy_sd.values():
      v += 1
  assert not np.allclose(tm.bn1.running_var.numpy(), before["batch_stats"]["bn1"]["var"])  # the forward did change it
  for a, b in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(before)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree_util.tree_leaves(from_numpy), jax.tree_util.tree_leaves(before)):
    np.testing.assert_array_equal(a, b)


def test_pth_file_round_trip(reference, tmp_path):
  sd = reference["resnet50"][0].state_dict()
  path = tmp_path / "resnet50.pth"
  torch.save(sd, path)
  from_file = models.from_torchvision("resnet50", path, num_classes=180)
  from_str = models.from_torchvision("resnet50", str(path), num_classes=180)
  direct = models.from_torchvision("resnet50", {k: v.numpy() for k, v in sd.items()}, num_classes=180)
  for a, b, c in zip(*(jax.tree_util.tree_leaves(t) for t in (from_file, from_str, direct))):
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)
  # A DataParallel checkpoint ('module.' prefix) loads the same.
  wrapped = tmp_path / "dp.pth"
  torch.save({"module." + k: v for k, v in sd.items()}, wrapped)
  np.testing.assert_array_equal(
    models.from_torchvision("resnet50", wrapped)["params"]["bn1"]["scale"], sd["bn1.weight"].numpy()
  )


def test_bad_weights_give_clear_errors(reference, tmp_path):
  sd = dict(reference["resnet50"][0].state_dict())
  missing = {k: v for k, v in sd.items() if k != "layer3.2.bn2.running_var"}
  with pytest.raises(ValueError, match=r"missing 1 key\(s\): layer3\.2\.bn2\.running_var"):
    models.from_torchvision("resnet50", missing)
  with pytest.raises(ValueError, match=r"unexpected 1 key\(s\): extra\.weight"):
    models.from_torchvision("resnet50", {**sd, "extra.weight": torch.zeros(3)})
  bad = {**sd, "layer1.0.conv2.weight": torch.zeros(64, 64, 1, 1)}
  with pytest.raises(
    ValueError,
    match=r"layer1\.0\.conv2\.weight has shape \(64, 64, 1, 1\).*"
    r"params/layer1_0/conv2/kernel needs \(3, 3, 64, 64\)",
  ):
    models.from_torchvision("resnet50", bad)
  with pytest.raises(ValueError, match=r"fc\.weight has shape \(1000, 100\)"):
    models.from_torchvision("resnet50", {**sd, "fc.weight": torch.zeros(1000, 100)}, num_classes=1000)
  # A VGG state_dict is not a ResNet one.
  with pytest.raises(ValueError, match="missing .* unexpected"):
    models.from_torchvision("resnet50", reference["vgg16"][0].state_dict())
  with pytest.raises(ValueError, match="unknown arch 'resnet18'"):
    models.from_torchvision("resnet18", sd)
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    models.from_torchvision("resnet50", tmp_path / "nope.pth")
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a checkpoint")
  with pytest.raises(ValueError, match="cannot read .*junk.pth"):
    models.from_torchvision("resnet50", junk)
  with pytest.raises(ValueError, match=r"unknown weights 'IMAGENET1K_V9'.*IMAGENET1K_V1, IMAGENET1K_V2"):
    models.from_torchvision("resnet50", "IMAGENET1K_V9")


def _network_reachable() -> bool:
  try:
    socket.setdefaulttimeout(3)
    socket.create_connection(("download.pytorch.org", 443)).close()
    return True
  except OSError:
    return False
  finally:
    socket.setdefaulttimeout(None)


def test_named_weights_without_network_say_how_to_pass_a_file(monkeypatch, tmp_path):
  monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: the name must be downloaded
  if _network_reachable():  # never download 100 MB in a test: make the download fail instead

    def offline(*args, **kwargs):
      raise urllib.error.URLError("no network (simulated)")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
  with pytest.raises(
    ConnectionError,
    match=r"cannot download ResNet50_Weights\.IMAGENET1K_V2 .*"
    r"add --config\.model\.weights=/path/to/resnet50-\w+\.pth",
  ):
    models.from_torchvision("resnet50", "DEFAULT")  # DEFAULT is V2 for resnet50


def test_named_weights_come_from_torchvision_cache(reference, monkeypatch, tmp_path):
  # torchvision's own API finds a cached file by the weights' URL: no network needed.
  monkeypatch.setenv("TORCH_HOME", str(tmp_path))
  sd = reference["resnet50"][0].state_dict()
  url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
  (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
  torch.save(sd, tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1])
  got = models.from_torchvision("resnet50", "ResNet50_Weights.IMAGENET1K_V1", num_classes=1000)
  # The 1000-way head is kept for num_classes=1000.
  np.testing.assert_array_equal(got["params"]["head"]["kernel"], sd["fc.weight"].numpy().T)
  np.testing.assert_array_equal(got["batch_stats"]["bn1"]["mean"], sd["bn1.running_mean"].numpy())


def test_weights_status_says_cached_download_or_file(reference, monkeypatch, tmp_path):
  """What the dry run says of model.weights: in torchvision's cache, to be downloaded (and how much), or a file."""
  from jsim.models import torchvision_port

  monkeypatch.setenv("TORCH_HOME", str(tmp_path))
  text, size = torchvision_port.weights_status("vgg16", "IMAGENET1K_V1")
  assert "not in its cache, stage 1 downloads it from https://download.pytorch.org/models/vgg16-" in text
  assert "(553 MB)" in text and size == int(527.796 * 2**20)
  url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
  cached = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
  cached.parent.mkdir(parents=True)
  torch.save(reference["resnet50"][0].state_dict(), cached)
  assert torchvision_port.weights_status("resnet50", "IMAGENET1K_V1") == (
    f"torchvision's ResNet50_Weights.IMAGENET1K_V1, in its cache ({cached})",
    0,
  )
  assert torchvision_port.weights_status("resnet50", str(cached))[1] == 0
  with pytest.raises(FileNotFoundError, match="model.weights=/no/such.pth: no such file"):
    torchvision_port.weights_status("resnet50", "/no/such.pth")
  with pytest.raises(ValueError, match="model.weights='IMAGENET1K_V9': torchvision has no such weights for resnet50"):
    torchvision_port.weights_status("resnet50", "IMAGENET1K_V9")


def test_a_missing_torchvision_is_refused_before_the_run(monkeypatch):
  """model.init=torchvision without torchvision installed: one line naming the extra, before anything runs."""
  import importlib.util

  from jsim import configs, validate

  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else real(name, *a))
  config = configs.base_config()
  config.stage = "classifier"
  with pytest.raises(ValueError, match=r"needs torchvision, which is not installed: pip install 'jsim\[torch\]'"):
    validate.check_config(config)
  config.stage = "evaluate"  # (stages that do not read the weights do not need it)
  validate.check_config(config)
