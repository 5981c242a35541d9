"""Checks a config before anything is compiled: one clear line per problem."""

from __future__ import annotations

from jsim import configs


def check_config(config) -> None:
  if config.stage not in configs.STAGES:
    raise ValueError(f"stage={config.stage!r}: expected one of {', '.join(configs.STAGES)}")
