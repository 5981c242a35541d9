"""Downloads the official tiny-imagenet-200.zip (or any archive) with a progress bar and a checksum.

The file appears under its final name only once it is complete and verified:
it is written to `<name>.part` first and renamed after the check, and a file
that fails the check is removed. An archive already at the destination (e.g.
copied there by hand) is verified and used without a download.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from absl import logging
from tqdm import tqdm

OFFICIAL_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
# The md5 of the official archive, as published with torchvision-style loaders
# (and the archive's size, 248,100,043 bytes). No sha256 is published.
OFFICIAL_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
OFFICIAL_SIZE = 248_100_043

_CHUNK = 1 << 20


class DownloadError(RuntimeError):
  """The archive could not be fetched (no network, server error, interrupted transfer)."""


def file_digests(path: Path) -> dict[str, str]:
  """{'md5': ..., 'sha256': ...} of a file."""
  md5, sha = hashlib.md5(), hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      md5.update(chunk)
      sha.update(chunk)
  return {"md5": md5.hexdigest(), "sha256": sha.hexdigest()}


def _check(path: Path, *, sha256: str, md5: str, what: str) -> str | None:
  """None if `path` passes the configured checks, else why not."""
  if sha256 or md5:
    got = file_digests(path)
    for name, want, key in (("sha256", sha256, "data.download_sha256"), ("md5", md5, "data.download_md5")):
      if want and got[name] != want.lower():
        return f"{what} has {name} {got[name]}, expected {want.lower()} ({key})"
    return None
  # No checksum configured: at least check that it is an intact zip with a wnids.txt.
  try:
    with zipfile.ZipFile(path) as zf:
      broken = zf.testzip()
      if broken is not None:
        return f"{what} is a damaged zip (bad CRC in {broken})"
      if not any(n.rsplit("/", 1)[-1] == "wnids.txt" for n in zf.namelist()):
        return f"{what} is a zip without wnids.txt: not a tiny-imagenet-200 archive"
  except zipfile.BadZipFile as e:
    return f"{what} is not a zip file ({e})"
  logging.warning(
    "No checksum configured (data.download_sha256 / data.download_md5): checked only that "
    "%s is an intact zip holding wnids.txt.",
    path,
  )
  return None


def offline_message(url: str, dest: Path, reason: str) -> str:
  """The one-line message for a failed download: where to put the data and which key to set."""
  return (
    f"Cannot download {url} ({reason}). Without network, get tiny-imagenet-200 another way, then either "
    f"unpack it and set --config.data.source=folder --config.data.root=/path/to/tiny-imagenet-200, or set "
    f"--config.data.source=zip --config.data.zip_path=/path/to/tiny-imagenet-200.zip, or copy the zip to "
    f"{dest} (where source=download looks first)."
  )


def fetch(
  url: str, dest: str | os.PathLike, *, sha256: str = "", md5: str = "", timeout: float = 60.0, progress: bool = True
) -> Path:
  """Returns `dest` holding the verified file at `url`, downloading it if needed.

  Args:
    url: what to download (http, https or file URL).
    dest: the final path of the file.
    sha256, md5: expected hex digests ('' = not checked); with neither, the
      file must be an intact zip holding a wnids.txt.
    timeout: seconds without data before the download is abandoned.
    progress: show a tqdm progress bar.

  Raises:
    DownloadError: the file cannot be fetched (one line saying where to put the
      data instead).
    ValueError: a file (downloaded or already at `dest`) fails the check; a
      downloaded one is removed.
  """
  dest = Path(dest).expanduser()
  if dest.exists():
    problem = _check(dest, sha256=sha256, md5=md5, what=str(dest))
    if problem:
      raise ValueError(f"{problem}: remove or replace it, or fix the checksum in the config")
    return dest

  dest.parent.mkdir(parents=True, exist_ok=True)
  part = dest.with_name(dest.name + ".part")
  try:
    try:
      response = urllib.request.urlopen(url, timeout=timeout)
    except (urllib.error.URLError, OSError, ValueError) as e:
      raise DownloadError(offline_message(url, dest, getattr(e, "reason", None) or str(e))) from None
    with response, open(part, "wb") as f:
      total = int(response.headers.get("Content-Length") or 0) or None
      written = 0
      with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"Downloading {dest.name}",
        disable=not progress,
        mininterval=1.0,
      ) as bar:
        try:
          while chunk := response.read(_CHUNK):
            f.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
        except OSError as e:  # the connection dropped mid-transfer
          raise DownloadError(offline_message(url, dest, f"interrupted after {written} bytes: {e}")) from None
    if total is not None and written != total:
      raise DownloadError(offline_message(url, dest, f"got {written} of {total} bytes"))
    problem = _check(part, sha256=sha256, md5=md5, what=f"the file downloaded from {url}")
    if problem:
      raise ValueError(f"{problem}; it was removed")
    os.replace(part, dest)
  finally:
    part.unlink(missing_ok=True)
  logging.info("Downloaded %s to %s (%d bytes, verified)", url, dest, dest.stat().st_size)
  return dest
