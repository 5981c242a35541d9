"""jsim.losses.miners against pytorch-metric-learning's miners on the same inputs: the same pairs and
triplets, and every pair/triplet loss with a miner equal to PML's loss(e, labels, miner(e, labels))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsim import losses
from jsim.losses import miners
from conftest import parametrize_fast_first

torch = pytest.importorskip("torch")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

B, D = 24, 8


def _batch(seed, num_classes=6):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, size=B)
  labels[0] = num_classes  # an anchor without a positive
  centres = rng.normal(size=(num_classes + 1, D))
  emb = (centres[labels] + 1.2 * rng.normal(size=(B, D))).astype(np.float32)  # some structure: miners choose
  return emb, labels


MINERS = [
  ("multi_similarity", {}, lambda: pml_miners.MultiSimilarityMiner()),
  ("multi_similarity", {"epsilon": 0.3}, lambda: pml_miners.MultiSimilarityMiner(epsilon=0.3)),
  ("batch_hard", {}, lambda: pml_miners.BatchHardMiner()),
  ("pair_margin", {}, lambda: pml_miners.PairMarginMiner()),
  (
    "pair_margin",
    {"pos_margin": 0.5, "neg_margin": 1.1},
    lambda: pml_miners.PairMarginMiner(pos_margin=0.5, neg_margin=1.1),
  ),
  ("triplet_margin", {}, lambda: pml_miners.TripletMarginMiner()),
  *[
    (
      "triplet_margin",
      {"margin": 0.3, "type_of_triplets": kind},
      lambda kind=kind: pml_miners.TripletMarginMiner(margin=0.3, type_of_triplets=kind),
    )
    for kind in ("easy", "semihard", "hard")
  ],
]


def _counts(indices, b=B) -> miners.Mined:
  """PML's index tuple as jsim's counts."""
  idx = [np.asarray(x) for x in indices]
  if len(idx) == 4:
    pos, neg = np.zeros((b, b), np.int32), np.zeros((b, b), np.int32)
    np.add.at(pos, (idx[0], idx[1]), 1)
    np.add.at(neg, (idx[2], idx[3]), 1)
    return miners.Pairs(pos, neg)
  count = np.zeros((b, b, b), np.int32)
  np.add.at(count, tuple(idx), 1)
  return miners.Triplets(count)


@pytest.mark.parametrize("name,kwargs,make_pml", MINERS)
@parametrize_fast_first("seed", [0, 1, 2])
def test_miner_selects_what_pml_selects(name, kwargs, make_pml, seed):
  emb, labels = _batch(seed)
  want = _counts(make_pml()(torch.tensor(emb), torch.tensor(labels)))
  got = jax.jit(miners.build(name, **kwargs).mine)(jnp.asarray(emb), jnp.asarray(labels))
  assert type(got) is type(want)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), w)
  # Neither nothing nor everything (so that the comparison says something), except for an empty kind.
  every = miners.all_pairs(labels) if isinstance(got, miners.Pairs) else miners.all_triplets(labels)
  chosen = sum(int(np.sum(g)) for g in got)
  assert 0 < chosen < sum(int(np.sum(a)) for a in every)


# Every loss that takes a miner, with every miner (pairs from triplets, triplets from pairs).
LOSSES = [
  ("contrastive", {}, lambda: pml_losses.ContrastiveLoss()),
  ("triplet", {"margin": 0.2}, lambda: pml_losses.TripletMarginLoss(margin=0.2)),
  ("multi_similarity", {}, lambda: pml_losses.MultiSimilarityLoss()),
]


# make test-fast: every miner once, under the losses in turn; make test: every pair.
@pytest.mark.parametrize(
  "loss_name,loss_kwargs,make_pml_loss,miner_name,miner_kwargs,make_pml_miner",
  [
    pytest.param(*loss, *miner, id=f"{loss[0]}-{j}-{miner[0]}", marks=() if i == j % len(LOSSES) else pytest.mark.slow)
    for j, miner in enumerate(MINERS)
    for i, loss in enumerate(LOSSES)
  ],
)
def test_loss_with_miner_equals_pml(loss_name, loss_kwargs, make_pml_loss, miner_name, miner_kwargs, make_pml_miner):
  emb, labels = _batch(0)
  pml_loss, pml_miner = make_pml_loss(), make_pml_miner()
  e = torch.tensor(emb, requires_grad=True)
  t_labels = torch.tensor(labels)
  want = pml_loss(e, t_labels, pml_miner(e, t_labels))
  want.backward()
  loss = losses.build(loss_name, miner=miner_name, miner_hparams=miner_kwargs, **loss_kwargs)
  fn = jax.jit(jax.value_and_grad(lambda x: loss.apply({}, x, jnp.asarray(labels))))
  got, grad = fn(jnp.asarray(emb))
  what = f"{loss_name} {loss_kwargs} with {miner_name} {miner_kwargs}"
  np.testing.assert_allclose(float(got), want.item(), rtol=2e-5, atol=2e-6, err_msg=what)
  np.testing.assert_allclose(np.asarray(grad), e.grad.numpy(), rtol=2e-5, atol=2e-6, err_msg=what)
  # The same as the loss given the mined pairs/triplets, as PML's loss(e, labels, indices_tuple).
  plain = losses.build(loss_name, **loss_kwargs)
  mined = miners.build(miner_name, **miner_kwargs).mine(jnp.asarray(emb), jnp.asarray(labels))
  assert float(plain.apply({}, emb, labels, mined=mined)) == pytest.approx(float(got), rel=1e-6, abs=1e-7)


def test_pml_zero_when_one_pair_of_each_kind():
  # PML's pair losses return 0 when no kind has more than one pair; so do jsim's.
  emb, labels = _batch(1)
  pos, neg = np.zeros((B, B), np.int32), np.zeros((B, B), np.int32)
  same = np.flatnonzero(labels == labels[1])
  other = np.flatnonzero(labels != labels[1])
  pos[1, same[same != 1][0]] = 1
  neg[1, other[0]] = 1
  mined = miners.Pairs(pos, neg)
  idx = (torch.tensor([1]), torch.tensor([same[same != 1][0]]), torch.tensor([1]), torch.tensor([other[0]]))
  for name, pml in (
    ("contrastive", pml_losses.ContrastiveLoss()),
    ("multi_similarity", pml_losses.MultiSimilarityLoss()),
  ):
    want = float(pml(torch.tensor(emb), torch.tensor(labels), idx))
    assert want == 0.0
    assert float(losses.build(name).apply({}, emb, labels, mined=mined)) == 0.0
  neg[2, other[1]] = 1  # a second negative pair: no longer zero, in both
  idx = (idx[0], idx[1], torch.tensor([1, 2]), torch.tensor([other[0], other[1]]))
  want = float(pml_losses.ContrastiveLoss()(torch.tensor(emb), torch.tensor(labels), idx))
  got = float(losses.build("contrastive").apply({}, emb, labels, mined=miners.Pairs(pos, neg)))
  assert got == pytest.approx(want, rel=1e-5) and want > 0


def test_miner_errors_name_the_value():
  with pytest.raises(ValueError, match="unknown miner 'hardest'; available: batch_hard, multi_similarity"):
    miners.build("hardest")
  with pytest.raises(ValueError, match="miner 'pair_margin' has no hyperparameter 'margin'"):
    miners.build("pair_margin", margin=0.1)
  with pytest.raises(ValueError, match="type_of_triplets='semi_hard'"):
    miners.build("triplet_margin", type_of_triplets="semi_hard")
  with pytest.raises(ValueError, match="loss hyperparameter miner='nope': unknown miner"):
    losses.build("triplet", miner="nope")
  with pytest.raises(ValueError, match="loss hyperparameter miner='batch_hard': miner 'batch_hard' has no"):
    losses.build("contrastive", miner="batch_hard", miner_hparams={"epsilon": 0.1})
  with pytest.raises(ValueError, match="no hyperparameter 'miner'"):
    losses.build("proxy_anchor", miner="batch_hard")
