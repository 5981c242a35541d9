"""A stage's identity: the settings recorded in its config.json that define its outputs, and how a
recorded one is compared with a run's (keys free to change, keys added or retired since)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsim.workdir.io import config_to_dict, read_json
from jsim.workdir.layout import RESULT_FILE, STAGE1, STAGE2

# Keys that may differ between a run and its resumption.
# learning_rate, alpha, halving_wait: the rate from here on (a NaN stop is continued at a lower one); so are
# the groups' rates (head_learning_rate, loss_learning_rate: the configs derive the latter from learning_rate)
# and the schedule and its settings.
# conv_impl: how convs are lowered; the same math, other float rounding, as on another platform.
_FREE_KEYS = {
  "stage",
  "overwrite",
  "num_epochs",
  "split_sha256",
  "learning_rate",
  "alpha",
  "halving_wait",
  "log_every_steps",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "eval_batch_size",
  "cache_dir",
  "num_workers",
  "pipeline",
  "conv_impl",
  "head_learning_rate",
  "loss_learning_rate",
  "schedule",
  "patience",
  "smoothing",
  "min_delta",
  "warmup_epochs",
  "final_rate_factor",
  "evaluation",
  "sweep",
  "embed",
}


def _identity(d: Any) -> Any:
  if isinstance(d, dict):
    return {k: _identity(v) for k, v in d.items() if k not in _FREE_KEYS}
  return d


def _with_new_keys(recorded: Any, now: Any, defaults: Any) -> Any:
  """`recorded` plus the keys it lacks that `now` has, at their `defaults` value.

  A key added to jsim after a workdir was made reads as its default there: a new key's
  default keeps the old behaviour (the rule for every new key; a changed default is a
  recorded value that differs, and still refuses).
  """
  if not (isinstance(recorded, dict) and isinstance(now, dict) and isinstance(defaults, dict)):
    return recorded
  out = dict(recorded)
  for k, v in now.items():
    if k not in recorded and k in defaults:
      out[k] = defaults[k]
    elif k in recorded:
      out[k] = _with_new_keys(recorded[k], v, defaults.get(k))
  return out


# Keys jsim no longer has, each with the value that meant what a record without it means now: a record
# holding that value reads as current; another value still refuses (it asked for what is now said otherwise).
# loss_hparams.triplet.mining='all' is miner='none' (every triplet); its other values are miners now.
_RETIRED = {("classifier", "loss_hparams", "triplet", "mining"): "all"}


def _without_retired(recorded: Any) -> Any:
  recorded = json.loads(json.dumps(recorded))  # (a copy)
  for path, meant_now in _RETIRED.items():
    node = recorded
    for key in path[:-1]:
      node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict) and path[-1] in node and node[path[-1]] == meant_now:
      del node[path[-1]]
  return recorded


def _recorded_identity(recorded: dict, now: dict, defaults: dict | None) -> Any:
  return _with_new_keys(_identity(_without_retired(recorded)), _identity(now), _identity(defaults or {}))


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  short = lambda v: r if len(r := repr(v)) <= 60 else r[:57] + "..."
  return [] if a == b else [f"{prefix[:-1]}: {short(a)} in the workdir, {short(b)} now"]


def _subset(recorded: Any, like: Any) -> Any:
  """The part of `recorded` with the keys of `like` (recursively)."""
  if isinstance(recorded, dict) and isinstance(like, dict):
    return {k: _subset(recorded.get(k), v) for k, v in like.items()}
  return recorded


def _read_record(path: Path) -> dict:
  """A stage's config.json: a JSON object, or a one-line error naming the file."""
  recorded = read_json(path)
  if not isinstance(recorded, dict):
    raise ValueError(
      f"{path}: not a jsim stage record (a JSON object expected, found {type(recorded).__name__}); "
      f"restore it, or redo that stage with --config.overwrite=True"
    )
  return recorded


def check_recorded(workdir: Path, stage: str, expected: dict) -> None:
  """Refuses to build on W/<stage> when its config.json records other values of `expected`'s keys.

  For stages that read another's outputs (embed reads stage 1 with config.model), so
  that another architecture is a clear error rather than a failed restore.
  """
  path = Path(workdir) / stage / "config.json"
  if not path.exists():
    return
  diffs = _differences(_subset(_read_record(path), expected), expected)
  if diffs:
    raise ValueError(
      f"{path.parent} was made by another configuration ({'; '.join(diffs[:4])}); "
      f"use another --workdir, or redo that stage with --config.overwrite=True"
    )


# The sections of the config a stage's config.json records as it was trained with (besides seed and model name).
_TRAINED_SECTIONS = {STAGE1: ("data", "model", "classifier")}
_STAGE2_SECTIONS = ("similarity",)  # stage 2 and the sweep's stages


def _trained_record(workdir: Path, stage: str) -> dict | None:
  """W/<stage>/config.json of a finished stage (None if it has not finished or its record is unreadable)."""
  path = Path(workdir) / stage / "config.json"
  if not (path.parent / RESULT_FILE).exists() or not path.exists():
    return None
  try:
    recorded = read_json(path)
  except (OSError, ValueError):
    return None
  return recorded if isinstance(recorded, dict) else None


def _overlay(base: Any, recorded: Any) -> Any:
  """`base` with the values `recorded` has for its keys (a key only one of them has keeps base's, or stays out)."""
  if isinstance(base, dict) and isinstance(recorded, dict):
    return {k: _overlay(v, recorded[k]) if k in recorded else v for k, v in base.items()}
  return recorded


def _common(a: Any, b: Any) -> tuple[Any, Any]:
  """a and b restricted to the keys both have (recursively)."""
  if isinstance(a, dict) and isinstance(b, dict):
    keys = [k for k in a if k in b]
    pairs = {k: _common(a[k], b[k]) for k in keys}
    return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
  return a, b


def not_applied(workdir: Path, stage: str, config_dict: dict) -> list[str]:
  """The settings of finished W/<stage> that `config_dict` (a run's) gives other values: 'key: recorded in the
  workdir, other now', one each. Keys free to change (a learning rate, num_epochs: `_FREE_KEYS`) do not refuse
  a finished stage, nor retrain it: the stage stays as it was trained, with its recorded values."""
  recorded = _trained_record(workdir, stage)
  if recorded is None:
    return []
  sections = _TRAINED_SECTIONS.get(stage, _STAGE2_SECTIONS)
  was, now = _common({k: recorded.get(k) for k in sections}, {k: config_dict.get(k) for k in sections})
  return _differences(was, now)


def not_applied_text(workdir: Path, stage: str, config) -> str:
  """For a line about finished W/<stage>: '' when `config` gives its settings the values it was trained with,
  else ', as trained, not with this run's values (...): ...' naming those that differ (up to 4)."""
  diffs = not_applied(workdir, stage, config_to_dict(config))
  if not diffs:
    return ""
  more = f" and {len(diffs) - 4} more" if len(diffs) > 4 else ""
  return (
    f", as trained, not with this run's values ({'; '.join(diffs[:4])}{more}): a finished stage is not "
    f"retrained (--config.overwrite=True retrains it)"
  )


def trained_config(workdir: Path, config_dict: dict) -> dict:
  """`config_dict` with the sections of W's finished stages as they were trained (their config.json), for the
  record of what was evaluated (report.json): a key that does not retrain a finished stage (`not_applied`)
  shows the value the stage used, not the one given now."""
  out = json.loads(json.dumps(config_dict, default=str))
  for stage, sections in ((STAGE1, _TRAINED_SECTIONS[STAGE1]), (STAGE2, _STAGE2_SECTIONS)):
    recorded = _trained_record(workdir, stage)
    for key in sections if recorded is not None else ():
      if isinstance(recorded.get(key), dict):
        out[key] = _overlay(out.get(key), recorded[key])
  return out
