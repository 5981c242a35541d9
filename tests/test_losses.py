"""jsim.losses against pytorch-metric-learning itself: same embeddings, labels, proxies -> same value and gradients."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsim import losses
from conftest import parametrize_fast_first

torch = pytest.importorskip("torch")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

B, D, C = 24, 8, 7


def _batch(seed=0, num_classes=C):
  rng = np.random.default_rng(seed)
  emb = rng.normal(size=(B, D)).astype(np.float32)
  labels = rng.integers(0, num_classes - 1, size=B).astype(np.int64)  # the last class has no image
  labels[0] = num_classes - 2  # one class with a single image at most... and others with several
  return emb, labels


def _torch_value_and_grad(fn, emb, *params):
  e = torch.tensor(emb, requires_grad=True)
  ps = [torch.tensor(p, requires_grad=True) for p in params]
  value = fn(e, *ps)
  value.backward()
  return value.item(), e.grad.numpy(), [p.grad.numpy() for p in ps]


def _jax_value_and_grad(loss, params, emb, labels):
  f = jax.jit(jax.value_and_grad(lambda p, e: loss.apply(p, e, jnp.asarray(labels, jnp.int32)), argnums=(0, 1)))
  value, (g_params, g_emb) = f(params, jnp.asarray(emb))
  return float(value), np.asarray(g_emb), g_params


def _close(a, b, what):
  np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=what)


PAIR_CASES = [
  ("contrastive", {}, lambda: pml_losses.ContrastiveLoss(), None),
  (
    "contrastive",
    {"pos_margin": 0.3, "neg_margin": 1.2},
    lambda: pml_losses.ContrastiveLoss(pos_margin=0.3, neg_margin=1.2),
    None,
  ),
  ("triplet", {}, lambda: pml_losses.TripletMarginLoss(), None),
  (
    "triplet",
    {"margin": 0.4, "miner": "batch_hard"},
    lambda: pml_losses.TripletMarginLoss(margin=0.4),
    lambda: pml_miners.BatchHardMiner(),
  ),
  (
    "triplet",
    {"margin": 0.3, "miner": "triplet_margin"},
    lambda: pml_losses.TripletMarginLoss(margin=0.3),
    lambda: pml_miners.TripletMarginMiner(),
  ),
  ("multi_similarity", {}, lambda: pml_losses.MultiSimilarityLoss(), None),
  (
    "multi_similarity",
    {"alpha": 1.0, "beta": 10.0, "base": 0.2},
    lambda: pml_losses.MultiSimilarityLoss(alpha=1.0, beta=10.0, base=0.2),
    None,
  ),
]


@pytest.mark.parametrize("name,kwargs,make_pml,make_miner", PAIR_CASES)
@parametrize_fast_first("seed", [0, 1])
def test_pair_losses_equal_pml(name, kwargs, make_pml, make_miner, seed):
  emb, labels = _batch(seed)
  pml, miner = make_pml(), (make_miner() if make_miner else None)
  t_labels = torch.tensor(labels)

  def ref(e):
    return pml(e, t_labels, miner(e, t_labels)) if miner else pml(e, t_labels)

  want, want_grad, _ = _torch_value_and_grad(ref, emb)
  loss = losses.build(name, **kwargs)
  got, got_grad, _ = _jax_value_and_grad(loss, loss.init(jax.random.key(0), C, D), emb, labels)
  assert want > 0
  _close(got, want, f"{name} {kwargs} value")
  _close(got_grad, want_grad, f"{name} {kwargs} gradient")


def test_triplet_miners_differ_and_no_triplet_is_zero():
  emb, labels = _batch(3)
  values = {
    m: float(losses.build("triplet", margin=0.3, miner=m).apply({}, emb, labels))
    for m in ("none", "batch_hard", "triplet_margin")
  }
  assert len(set(values.values())) == 3, values
  # One class only: no negative, no triplet, no pair of the negative kind -> 0 as in PML.
  same = np.zeros(B, np.int32)
  for name in ("triplet", "contrastive"):
    assert float(losses.build(name).apply({}, emb, same)) == pytest.approx(
      pml_losses.TripletMarginLoss()(torch.tensor(emb), torch.tensor(same)).item()
      if name == "triplet"
      else float(pml_losses.ContrastiveLoss()(torch.tensor(emb), torch.tensor(same))),
      abs=1e-6,
    )


PROXY_CASES = [
  ("proxy_anchor", {}, lambda: pml_losses.ProxyAnchorLoss(C, D), "proxies", False),
  (
    "proxy_anchor",
    {"margin": 0.2, "alpha": 16.0},
    lambda: pml_losses.ProxyAnchorLoss(C, D, margin=0.2, alpha=16),
    "proxies",
    False,
  ),
  ("normalized_softmax", {}, lambda: pml_losses.NormalizedSoftmaxLoss(C, D), "W", True),
  (
    "normalized_softmax",
    {"temperature": 0.5},
    lambda: pml_losses.NormalizedSoftmaxLoss(C, D, temperature=0.5),
    "W",
    True,
  ),
  ("arcface", {}, lambda: pml_losses.ArcFaceLoss(C, D), "W", True),
  ("arcface", {"margin": 10.0, "scale": 8.0}, lambda: pml_losses.ArcFaceLoss(C, D, margin=10.0, scale=8.0), "W", True),
]


@pytest.mark.parametrize("name,kwargs,make_pml,attr,transposed", PROXY_CASES)
@parametrize_fast_first("seed", [0, 1])
def test_proxy_losses_equal_pml(name, kwargs, make_pml, attr, transposed, seed):
  emb, labels = _batch(seed)
  loss = losses.build(name, **kwargs)
  params = loss.init(jax.random.key(seed), C, D)
  ((key, value),) = params.items()
  assert key == loss.param_name and value.shape == (C, D)
  pml = make_pml()
  torch_param = np.asarray(value).T.copy() if transposed else np.asarray(value)

  def ref(e, p):
    getattr(pml, attr).data = p  # the loss's own parameter, now a leaf we can differentiate
    setattr(pml, attr, torch.nn.Parameter(p))
    out = pml(e, torch.tensor(labels))
    ref.param = getattr(pml, attr)
    return out

  e = torch.tensor(emb, requires_grad=True)
  out = ref(e, torch.tensor(torch_param))
  out.backward()
  want, want_grad, want_pgrad = out.item(), e.grad.numpy(), ref.param.grad.numpy()
  got, got_grad, g_params = _jax_value_and_grad(loss, params, emb, labels)
  got_pgrad = np.asarray(g_params[key])
  _close(got, want, f"{name} {kwargs} value")
  _close(got_grad, want_grad, f"{name} {kwargs} embedding gradient")
  _close(got_pgrad.T if transposed else got_pgrad, want_pgrad, f"{name} {kwargs} {key} gradient")


def test_parameter_init_follows_pml():
  # proxies: kaiming_normal_(fan_out) of [C, D] = N(0, 2 / C); weights: N(0, 1).
  n_cls, dim = 50, 400
  proxies = np.asarray(losses.build("proxy_anchor").init(jax.random.key(0), n_cls, dim)["proxies"])
  weights = np.asarray(losses.build("arcface").init(jax.random.key(0), n_cls, dim)["weights"])
  assert proxies.std() == pytest.approx(math.sqrt(2.0 / n_cls), rel=0.03)
  assert weights.std() == pytest.approx(1.0, rel=0.03)
  torch.manual_seed(0)
  assert pml_losses.ProxyAnchorLoss(n_cls, dim).proxies.detach().numpy().std() == pytest.approx(
    math.sqrt(2.0 / n_cls), rel=0.03
  )
  assert losses.build("contrastive").init(jax.random.key(0), n_cls, dim) == {}


def _torch_ms(params, e1, e2):
  """The protocol's Ms written in torch from the same parameters (an independent implementation)."""
  x = (e1 - e2).abs()
  names = sorted(k for k in params if k.startswith("hidden")) + ["out"]
  for n in names:
    x = x @ torch.tensor(np.asarray(params[n]["kernel"])) + torch.tensor(np.asarray(params[n]["bias"]))
    if n != "out":
      x = torch.relu(x)
  return x


def test_pair_ms_equals_torch_ms_on_every_pair():
  emb, labels = _batch(2)
  dim = D
  loss = losses.build("pair_ms", dropout=0.0)
  params = loss.init(jax.random.key(1), C, dim)
  e = torch.tensor(emb, requires_grad=True)
  i, j = np.triu_indices(B, k=1)
  logits = _torch_ms(params["ms"], e[i], e[j])
  same = torch.tensor(labels[i] == labels[j])
  ce = torch.nn.functional.cross_entropy(logits, same.long(), reduction="none")
  want = 0.5 * (ce[same].mean() + ce[~same].mean())
  want.backward()
  got, got_grad, _ = _jax_value_and_grad(loss, params, emb, labels)
  _close(got, want.item(), "pair_ms value")
  _close(got_grad, e.grad.numpy(), "pair_ms gradient")
  # Dropout acts only with an rng, and then changes the value.
  with_rng = float(losses.build("pair_ms", dropout=0.5).apply(params, emb, labels, rng=jax.random.key(0)))
  assert with_rng != pytest.approx(got)


def test_registry_and_errors():
  assert losses.available() == sorted(
    ["arcface", "contrastive", "multi_similarity", "normalized_softmax", "pair_ms", "proxy_anchor", "triplet"]
  )
  with pytest.raises(ValueError, match="unknown loss 'nope'.*available: arcface"):
    losses.build("nope")
  with pytest.raises(ValueError, match="no hyperparameter 'gamma'.*alpha, beta, base"):
    losses.build("multi_similarity", gamma=1.0)
  with pytest.raises(ValueError, match="miner='hardest'"):
    losses.build("triplet", miner="hardest")
  with pytest.raises(ValueError, match="unknown pair feature kind"):
    losses.build("pair_ms", feature="l3")


@pytest.mark.slow
def test_identical_embeddings_give_finite_gradients():
  emb = np.ones((6, D), np.float32)
  labels = np.array([0, 0, 1, 1, 2, 2])
  for name in losses.available():
    loss = losses.build(name)
    params = loss.init(jax.random.key(0), 3, D)
    _, g, _ = _jax_value_and_grad(loss, params, emb, labels)
    assert np.all(np.isfinite(g)), name


def test_cross_entropy_is_torchs_on_the_heads_logits():
  """cross_entropy's parameters are the classifier head: apply (from the head) and batch_losses (from the
  logits the backbone's head made, as stage 1's step calls it) both equal torch's CrossEntropyLoss."""
  emb, labels = _batch(3)
  rng = np.random.default_rng(3)
  head = {"kernel": rng.normal(size=(D, C)).astype(np.float32), "bias": rng.normal(size=C).astype(np.float32)}
  loss = losses.build("cross_entropy")
  assert loss.classifies and "cross_entropy" not in losses.available()
  assert loss.params_in({"head": head, "conv1": {}}) is head

  def torch_ce(e, w, b):
    return torch.nn.functional.cross_entropy(e @ w + b, torch.tensor(labels))

  want, want_grad, (want_w, _) = _torch_value_and_grad(torch_ce, emb, head["kernel"], head["bias"])
  got, got_grad, got_pgrad = _jax_value_and_grad(loss, head, emb, labels)
  _close(got, want, "cross_entropy value")
  _close(got_grad, want_grad, "cross_entropy embedding gradient")
  _close(got_pgrad["kernel"], want_w, "cross_entropy head gradient")
  logits = jnp.asarray(emb) @ head["kernel"] + head["bias"]
  value, per_image = loss.batch_losses(head, logits, emb, jnp.asarray(labels))
  _close(float(value), want, "cross_entropy from logits")
  assert per_image.shape == (B,)
  correct = loss.batch_correct(logits, emb, jnp.asarray(labels))
  np.testing.assert_array_equal(np.asarray(correct), np.argmax(np.asarray(logits), -1) == labels)
