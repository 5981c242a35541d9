"""Atomic writes and a full disk: every file is written to a temporary name, synced to the disk and renamed
(the folder synced after), so a killed run or a power loss leaves either the old file or the new one, never half
of one nor an empty one; a full disk is `NoSpace`, one line naming
the file, with the temporary file removed."""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

TMP_SUFFIX = ".tmp"


class NoSpace(OSError):
  """A write failed because the disk (or quota) is full: one line naming the path."""


def is_no_space(e: BaseException | None) -> bool:
  """Whether `e` (or what caused it: orbax and tensorstore wrap the OSError, or keep only its text) is ENOSPC."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "no space left on device" in str(e).lower() or "disk quota exceeded" in str(e).lower():
      return True
    e = e.__cause__ or e.__context__
  return False


def no_space(path: Path | str, what: str = "") -> NoSpace:
  """The one-line error of a full disk while writing `path`."""
  return NoSpace(
    errno.ENOSPC,
    f"{path}: no space left on device{what}; nothing half-written was kept: free some space and rerun the same "
    f"command (it continues from what is complete)",
  )


class ReadOnly(OSError):
  """A write failed because the folder cannot be written (a read-only mount, no permission): one line naming
  the path."""


def read_only(path: Path | str, e: OSError) -> ReadOnly:
  """The one-line error of a write refused by the file system (`e`: its OSError)."""
  return ReadOnly(
    e.errno,
    f"{path}: cannot be written ({(e.strerror or 'read-only').lower()}); this run has to write to the workdir "
    f"(a read-only workdir is only read, when every stage and the evaluation in it are current)",
  )


def _oserror_str(self) -> str:  # NoSpace(errno, message) prints as its message alone, without "[Errno 28]"
  return self.strerror


NoSpace.__str__ = _oserror_str
ReadOnly.__str__ = _oserror_str


def default_cache_dir() -> Path:
  """$JSIM_CACHE, else ~/.cache/jsim: what the runs of a host share (decoded data, downloads, features, the
  conv backward record of jsim.models.conv_tuning)."""
  return Path(os.environ.get("JSIM_CACHE") or Path.home() / ".cache" / "jsim").expanduser()


def write_json(path: Path, obj: Any) -> None:
  """Atomic (write_file): a reader never sees half a file. A full disk raises NoSpace naming `path`."""
  text = json.dumps(obj, indent=1, sort_keys=True, default=str)
  write_file(path, lambda tmp: Path(tmp).write_text(text))


def write_file(path: Path, write: Any) -> None:
  """Atomic like write_json for any writer: `write(tmp_path)` makes the file, renamed to `path` once complete.

  The temporary name ends in TMP_SUFFIX (readers and the stage checks skip such names); it is
  removed on any failure, and a full disk raises NoSpace naming `path`.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f"{path.name}.{os.getpid()}{TMP_SUFFIX}")
  try:
    write(tmp)
    _fsync(tmp)  # the rename must not reach the disk before the data: a power loss would leave an empty file
    tmp.replace(path)
    _fsync(path.parent)  # and the rename itself
  except BaseException as e:  # (a signal, a full disk: no half-written temporary file stays)
    with contextlib.suppress(OSError):  # (on a read-only file system even this fails: the first error is the one)
      tmp.unlink(missing_ok=True)
    if is_no_space(e):
      raise no_space(path) from None
    if is_read_only(e):
      raise read_only(path, e) from None
    raise


def _fsync(path: Path) -> None:
  """Flushes `path` (a file, or a folder: its entries) to the disk; a folder that cannot be synced (some file
  systems, no read permission) is left as it is."""
  folder = path.is_dir()
  try:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
  except OSError:
    if folder:
      return
    raise
  try:
    os.fsync(fd)
  except OSError:
    if not folder:
      raise
  finally:
    os.close(fd)


def write_npy(path: Path, arr: Any) -> None:
  """`arr` as a .npy file at `path`, atomically (write_file)."""

  def write(tmp: Path) -> None:
    with open(tmp, "wb") as f:  # (a file object: np.save would append .npy to the temporary name)
      np.save(f, arr)

  write_file(path, write)


def is_read_only(e: BaseException) -> bool:
  """Whether an OSError means the folder cannot be written (a read-only mount, no permission)."""
  return isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM)


def read_json(path: Path) -> Any:
  try:
    return json.loads(Path(path).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())
