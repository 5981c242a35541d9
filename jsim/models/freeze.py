"""config.model.freeze: which leading part of a backbone is fixed during stage 1.

  none       every parameter trains (the default);
  stages:N   the stem and the first N stages are fixed (N >= 0: stages:0 is the stem only);
  backbone   everything but the classifier head (and a metric loss's embedding head and parameters).

A fixed part is outside the gradient (the model applies stop_gradient after it, so the backward
pass does not enter it), its BatchNorm layers always normalise with their running averages (which
therefore never change), and the optimizer gives its parameters zero updates
(`schedule.make_optimizer(frozen=...)`), so weight decay and momentum never move them either.
A backbone that supports freezing has a `freeze` field and a `frozen_modules()` method naming its
fixed top-level submodules.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import jax

NONE, BACKBONE = "none", "backbone"
ALL_STAGES = 10**6  # parse("backbone"): more stages than any model has


def parse(freeze: str, num_stages: int | None = None) -> int | None:
  """None for 'none'; the number of fixed stages for 'stages:N'; ALL_STAGES for 'backbone'.

  Raises ValueError (one line naming the value) for anything else, or N > num_stages.
  """
  if freeze == NONE:
    return None
  if freeze == BACKBONE:
    return ALL_STAGES
  m = re.fullmatch(r"stages:(\d+)", freeze)
  if not m:
    raise ValueError(f"model.freeze={freeze!r}: expected none, backbone or stages:N (N >= 0)")
  n = int(m.group(1))
  if num_stages is not None and n > num_stages:
    raise ValueError(f"model.freeze={freeze!r}: the model has {num_stages} stages")
  return n


def supports(model: Any) -> bool:
  """Whether the backbone (or the backbone of a MetricModel) can be frozen."""
  backbone = getattr(model, "backbone", model)
  return hasattr(backbone, "frozen_modules")


def frozen_prefixes(model: Any) -> tuple[tuple[str, ...], ...]:
  """Parameter-path prefixes of the fixed submodules (under 'backbone' for a MetricModel)."""
  backbone = getattr(model, "backbone", None)
  if backbone is not None:
    return tuple(("backbone",) + p for p in frozen_prefixes(backbone))
  if not hasattr(model, "frozen_modules"):
    return ()
  return tuple((name,) for name in model.frozen_modules())


def frozen_fn(model: Any) -> Callable[[Any], Any] | None:
  """params -> a tree of bools (True: fixed), or None when nothing is fixed."""
  prefixes = frozen_prefixes(model)
  if not prefixes:
    return None

  def mask(params):
    def fixed(path, _):
      names = tuple(str(getattr(k, "key", k)) for k in path)
      return any(names[: len(p)] == p for p in prefixes)

    return jax.tree_util.tree_map_with_path(fixed, params)

  return mask
