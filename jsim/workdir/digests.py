"""Content digests: of a file, of the files a record was written with (and which of them changed since), of a
checkpoint (from its meta), of W/split.json, and the check that the split is the one the stages were made with."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from jsim.workdir.io import read_json
from jsim.workdir.layout import EMBEDDINGS, STAGE1, STAGE2


def file_digest(path: str | os.PathLike) -> str:
  """SHA-256 of a file's bytes (content, not size and time: a copy or a touch keeps it, an edit does not)."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def file_digests(folder: Path, names) -> dict[str, str]:
  """{name: SHA-256} of the files `names` in `folder`: what a record keeps of the files written with it."""
  return {name: file_digest(Path(folder) / name) for name in names}


def changed_file(folder: Path, recorded: dict | None, record: Path, names=None) -> str | None:
  """Why one of the files `recorded` (name -> SHA-256, from `record`) in `folder` is not what was written, in one
  line naming it; None when each is (only `names` of them, if given). A record without digests (None: made
  before they were recorded) is trusted."""
  for name, digest in (recorded or {}).items():
    if names is not None and name not in names:
      continue
    path = Path(folder) / name
    if not path.is_file():
      return f"{path} is missing ({record} records it)"
    if file_digest(path) != digest:
      return f"{path} changed since it was written (its SHA-256 differs from the one in {record})"
  return None


def checkpoint_identity(stage_dir: Path, step: int) -> str | None:
  """What a checkpoint holds, by content: the SHA-256 of its arrays recorded in its meta (jsim.checkpoint),
  read as JSON (no orbax). A copy (cp -r, rsync) has the same; another training run another.
  None when there is no such checkpoint or its meta has no checksum."""
  try:
    meta = json.loads((Path(stage_dir) / "checkpoints" / str(step) / "meta" / "metadata").read_text())
  except (OSError, ValueError):
    return None
  checksum = meta.get("checksum") if isinstance(meta, dict) else None
  return checksum.get("state") if isinstance(checksum, dict) else None


def split_digest(workdir: Path) -> str | None:
  """SHA-256 of W/split.json's content (not its formatting); None if there is none."""
  path = Path(workdir) / "split.json"
  if not path.exists():
    return None
  split = read_json(path)
  if not isinstance(split, dict):
    raise ValueError(
      f"{path}: not a valid split file (a JSON object expected, found {type(split).__name__}); "
      f"restore it, or use another --workdir"
    )
  return hashlib.sha256(json.dumps(split, sort_keys=True).encode()).hexdigest()


def check_split(workdir: Path) -> None:
  """Refuses a workdir whose split.json is not the one its stages were made with (an edit, a copy)."""
  workdir = Path(workdir)
  current = None
  for record in (
    workdir / STAGE1 / "config.json",
    workdir / EMBEDDINGS / "meta.json",
    workdir / STAGE2 / "config.json",
  ):
    if not record.exists():
      continue
    recorded = read_json(record)
    digest = recorded.get("split_sha256") if isinstance(recorded, dict) else None
    if digest is None:
      continue  # (made before digests were recorded)
    current = current or split_digest(workdir)
    if current is None:
      raise ValueError(
        f"{workdir / 'split.json'} is missing, but {record} was made with one; restore it, or use another --workdir"
      )
    if digest != current:
      raise ValueError(
        f"{workdir / 'split.json'} is not the split that {record.parent.name} was made with "
        f"(SHA-256 {current[:12]}... now, {digest[:12]}... recorded); restore it, or use another "
        f"--workdir"
      )
