"""The learning-rate schedules (`Schedule`: the protocol's halving rule the default) and the optimizers
by name (`base_optimizer`: the protocol's Nesterov SGD the default), as optax transformations.

The protocol's rule: after each epoch k > 3, with v_1..v_k the validation accuracies so far and
E_k = mean(v_1..v_k), halve the learning rate if
    E_k - (E_{k-1} + E_{k-2} + E_{k-3}) / 3 < alpha,
unless a halving happened fewer than `wait` epochs ago.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax


def running_means(val_accuracies: Sequence[float]) -> list[float]:
  """E_1..E_k: E_k is the mean of the first k validation accuracies."""
  means, total = [], 0.0
  for k, v in enumerate(val_accuracies, start=1):
    total += v
    means.append(total / k)
  return means


def should_halve(
  val_accuracies: Sequence[float], halving_epochs: Sequence[int], *, alpha: float, wait: int = 3
) -> bool:
  """Whether to halve the learning rate after epoch k = len(val_accuracies).

  Args:
    val_accuracies: v_1..v_k, one per finished epoch (epochs are 1-based).
    halving_epochs: the epochs after which the rate was halved so far.
    alpha: the threshold (0.02 in stage 1, 0.01 in stage 2).
    wait: epochs that must pass after a halving before the next; with wait=3 and
      a halving after epoch h, the next can come after epoch h + 3 at the earliest.
  """
  k = len(val_accuracies)
  if k <= 3:
    return False
  if halving_epochs and k - max(halving_epochs) < wait:
    return False
  e = running_means(val_accuracies)
  return e[k - 1] - (e[k - 2] + e[k - 3] + e[k - 4]) / 3.0 < alpha


def smoothed(values: Sequence[float], smoothing: float) -> list[float]:
  """Exponential moving average: s_1 = v_1, s_k = smoothing s_{k-1} + (1 - smoothing) v_k (0: the values)."""
  out: list[float] = []
  for v in values:
    out.append(v if not out else smoothing * out[-1] + (1.0 - smoothing) * v)
  return out


def plateau_should_halve(
  val_accuracies: Sequence[float],
  halving_epochs: Sequence[int],
  *,
  patience: int,
  smoothing: float = 0.0,
  min_delta: float = 0.0,
) -> bool:
  """Whether to halve after epoch k = len(val_accuracies): the smoothed accuracy (`smoothed`) has not
  beaten its best by more than min_delta for `patience` epochs in a row, counted afresh after each
  halving (torch's ReduceLROnPlateau, mode max, with factor 0.5 and patience - 1). Replayed from the
  accuracies and the halvings, which the checkpoint holds: a resumed run decides the same."""
  best, bad = -math.inf, 0
  for k, s in enumerate(smoothed(val_accuracies, smoothing), start=1):
    if s > best + min_delta:
      best, bad = s, 0
    else:
      bad += 1
    if k < len(val_accuracies) and k in halving_epochs:
      bad = 0
  return bad >= patience


SCHEDULES = ("halving", "plateau", "constant", "warmup_cosine")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """How the learning rate moves, decided between epochs from what the checkpoint holds (so every
  schedule resumes exactly):

  halving        the protocol's rule (`should_halve`, alpha, wait): the default
  plateau        halve when the validation figure, smoothed, stalls for `patience` epochs
                 (`plateau_should_halve`: smoothing, min_delta), so that a noisy MAP@R does not halve early
  constant       the configured rate throughout
  warmup_cosine  linear warm-up over `warmup_epochs` epochs (epoch e <= W at rate x e / (W + 1)), then a
                 half cosine from the rate to rate x final_rate_factor over the remaining epochs; the rate
                 changes at epoch boundaries, as timm's schedulers do by default
  """

  kind: str = "halving"
  alpha: float = 0.02
  wait: int = 3
  patience: int = 3
  smoothing: float = 0.0
  min_delta: float = 0.0
  warmup_epochs: int = 0
  final_rate_factor: float = 0.0

  @classmethod
  def from_config(cls, cfg) -> "Schedule":
    """A config section's schedule (a section without `schedule`: the halving rule)."""
    get = lambda key, default: cfg[key] if key in cfg else default
    return cls(
      kind=get("schedule", "halving"),
      alpha=cfg.alpha,
      wait=cfg.halving_wait,
      patience=get("patience", 3),
      smoothing=get("smoothing", 0.0),
      min_delta=get("min_delta", 0.0),
      warmup_epochs=get("warmup_epochs", 0),
      final_rate_factor=get("final_rate_factor", 0.0),
    )

  def check(self, prefix: str) -> None:
    """ValueError naming the first impossible value, as `prefix.key=value`."""
    if self.kind not in SCHEDULES:
      raise ValueError(f"{prefix}.schedule={self.kind!r}: expected one of {', '.join(SCHEDULES)}")
    if self.patience < 1:
      raise ValueError(f"{prefix}.patience={self.patience}: must be >= 1")
    if not 0.0 <= self.smoothing < 1.0:
      raise ValueError(f"{prefix}.smoothing={self.smoothing}: must be in [0, 1)")
    if self.min_delta < 0:
      raise ValueError(f"{prefix}.min_delta={self.min_delta}: must be >= 0")
    if self.warmup_epochs < 0:
      raise ValueError(f"{prefix}.warmup_epochs={self.warmup_epochs}: must be >= 0")
    if not 0.0 <= self.final_rate_factor <= 1.0:
      raise ValueError(f"{prefix}.final_rate_factor={self.final_rate_factor}: must be in [0, 1]")

  def halve(self, val_accuracies: Sequence[float], halving_epochs: Sequence[int]) -> bool:
    """Whether to halve the rate after the epoch len(val_accuracies)."""
    if self.kind == "halving":
      return should_halve(val_accuracies, halving_epochs, alpha=self.alpha, wait=self.wait)
    if self.kind == "plateau":
      return plateau_should_halve(
        val_accuracies, halving_epochs, patience=self.patience, smoothing=self.smoothing, min_delta=self.min_delta
      )
    return False

  def epoch_rate(self, learning_rate: float, epoch: int, num_epochs: int) -> float | None:
    """The rate of `epoch` (1-based) where the schedule sets it (warmup_cosine); None: the run's rate stays."""
    if self.kind != "warmup_cosine":
      return None
    w = self.warmup_epochs
    if epoch <= w:
      return learning_rate * epoch / (w + 1)
    progress = (epoch - 1 - w) / max(1, num_epochs - w)
    final = learning_rate * self.final_rate_factor
    return final + (learning_rate - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


NAG_FORMS = ("optax", "paper")


class PaperNagState(NamedTuple):
  u: Any  # the paper's u_{t-1}: the last step, learning rate included


def paper_nag(learning_rate, momentum: float) -> optax.GradientTransformation:
  """The protocol's NAG exactly, on the look-ahead parameters phi_t = theta_t - g u_{t-1}.

  u_t = g u_{t-1} + lr_t grad L(phi_t), theta_{t+1} = theta_t - u_t, so
  phi_{t+1} = phi_t + g u_{t-1} - (1 + g) u_t. The buffer holds u (learning rate
  inside), so after a halving the old steps keep their old rate, as in the source;
  optax.sgd(nesterov=True) keeps the rate outside its buffer and rescales them too.
  """
  g = momentum

  def init(params):
    return PaperNagState(u=jax.tree.map(jnp.zeros_like, params))

  def update(grads, state, params=None):
    del params
    u = jax.tree.map(lambda u_prev, gr: g * u_prev + learning_rate * gr, state.u, grads)
    updates = jax.tree.map(lambda u_prev, u_new: g * u_prev - (1 + g) * u_new, state.u, u)
    return updates, PaperNagState(u=u)

  return optax.GradientTransformation(init, update)


OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop")


def base_optimizer(
  name: str,
  learning_rate,
  *,
  momentum: float = 0.0,
  nesterov: bool = True,
  nag_form: str = "optax",
  weight_decay: float = 0.0,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  rms_decay: float = 0.99,
) -> optax.GradientTransformation:
  """One optimizer by name, as torch.optim defines it (so that a PML user's setup carries over):

  sgd      SGD with momentum (Nesterov by default: the protocol's); nag_form='paper' its NAG exactly
  adam     Adam(b1, b2, eps)
  adamw    AdamW: weight decay decoupled from the gradient (p -= lr * weight_decay * p)
  rmsprop  RMSprop(alpha=rms_decay, eps outside the square root, no momentum)
  Weight decay for sgd, adam and rmsprop is torch's: weight_decay * p added to the gradient.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer={name!r}: expected one of {', '.join(OPTIMIZERS)}")
  if name == "adamw":
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  if name == "sgd":
    if nag_form == "paper" and nesterov:
      tx = paper_nag(learning_rate, momentum)
    else:
      tx = optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)
  elif name == "adam":
    tx = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
  else:
    tx = optax.rmsprop(learning_rate, decay=rms_decay, eps=eps, eps_in_sqrt=False)
  if weight_decay:
    tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
  return tx


def make_optimizer(
  *,
  learning_rate: float,
  momentum: float,
  nesterov: bool = True,
  weight_decay: float = 0.0,
  nag_form: str = "optax",
  param_groups=None,
  rate_multipliers: dict[str, float] | None = None,
  frozen=None,
  optimizer: str = "sgd",
  **hparams,
) -> optax.GradientTransformation:
  """The optimizer `optimizer` (`base_optimizer`; SGD with Nesterov momentum by default, the
  protocol's), its learning rate a hyperparameter in the state. hparams: b1, b2, eps, rms_decay.

  The protocol's NAG (u_t = g u_{t-1} + lr grad L(theta_t - g u_{t-1})) evaluates the
  gradient at a look-ahead point; optax.sgd(nesterov=True) is the equivalent
  reformulation whose parameters ARE the look-ahead points, so both follow the same
  trajectory while the rate is constant. At a halving they part: optax's buffer
  excludes the rate, so its next update rescales the accumulated momentum by the new
  rate, where the paper's u_{t-1} still carries the old one (docs/PROTOCOL.md gives
  the size of the difference). nag_form='paper' (with nesterov=True) is the paper's
  update exactly (`paper_nag`). inject_hyperparams lets `set_learning_rate` change the
  rate between epochs without recompiling the step.

  param_groups (a function of the params tree to group names, as optax.multi_transform
  takes) with rate_multipliers {group: factor}: each group's rate is learning_rate x its
  factor (optax.multi_transform), so halving the one injected rate halves them all.

  frozen (a function of the params tree to bools, jsim.models.freeze.frozen_fn): the parameters
  marked True get zero updates and no optimizer state (optax.set_to_zero), so neither momentum
  nor weight decay moves them; the rate stays the one injected hyperparameter.
  """
  if nag_form not in NAG_FORMS:
    raise ValueError(f"nag_form={nag_form!r}: expected one of {NAG_FORMS}")
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"optimizer={optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")

  def base(learning_rate):
    return base_optimizer(
      optimizer,
      learning_rate,
      momentum=momentum,
      nesterov=nesterov,
      nag_form=nag_form,
      weight_decay=weight_decay,
      **hparams,
    )

  def grouped(learning_rate):
    if param_groups is None:
      return base(learning_rate)
    return optax.multi_transform({g: base(learning_rate * f) for g, f in rate_multipliers.items()}, param_groups)

  def with_frozen(learning_rate):
    if frozen is None:
      return grouped(learning_rate)
    labels = lambda params: jax.tree.map(lambda f: "frozen" if f else "trained", frozen(params))
    return optax.multi_transform({"trained": grouped(learning_rate), "frozen": optax.set_to_zero()}, labels)

  return optax.inject_hyperparams(with_frozen)(learning_rate=learning_rate)


# A config section's optimizer keys beyond the protocol's (stage 1 has them; a section without them is SGD).
OPTIMIZER_KEYS = ("optimizer", "b1", "b2", "eps", "rms_decay")


def optimizer_from(cfg, **groups) -> optax.GradientTransformation:
  """make_optimizer with a config section's learning_rate, momentum, nesterov, weight_decay, nag_form
  and, where it has them, optimizer, b1, b2, eps, rms_decay."""
  return make_optimizer(
    learning_rate=cfg.learning_rate,
    momentum=cfg.momentum,
    nesterov=cfg.nesterov,
    weight_decay=cfg.weight_decay,
    nag_form=cfg.nag_form,
    **{k: cfg[k] for k in OPTIMIZER_KEYS if k in cfg},
    **groups,
  )


def get_learning_rate(opt_state) -> float:
  return float(opt_state.hyperparams["learning_rate"])


def set_learning_rate(opt_state, lr: float):
  """Returns opt_state with a new rate: same dtype and sharding, so no retrace."""
  old = opt_state.hyperparams["learning_rate"]
  new = jnp.asarray(lr, dtype=old.dtype)
  if hasattr(old, "sharding"):
    new = jax.device_put(new, old.sharding)
  hyper = dict(opt_state.hyperparams, learning_rate=new)
  return opt_state._replace(hyperparams=hyper)
