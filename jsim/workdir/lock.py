"""One run at a time: an fcntl lock on W/.jsim.lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from jsim.workdir.io import is_no_space, is_read_only, no_space
from jsim.workdir.layout import LOCK_FILE


class WorkdirInUse(ValueError):
  """Another process holds the workdir's lock."""


@contextlib.contextmanager
def locked(workdir: Path):
  """Holds W/.jsim.lock for the duration (process 0 only, for several processes).

  A read-only workdir is not locked: no run can write it anyway. The lock file is
  removed on exit; a run that opened it in the meantime sees another inode and retries.
  """
  import jax

  workdir = Path(workdir)
  if jax.process_index() != 0:
    yield
    return
  path = workdir / LOCK_FILE
  while True:
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      if is_read_only(e):
        yield  # read-only
        return
      if is_no_space(e):  # (no inode left)
        raise no_space(path, " (the workdir's lock)") from None
      raise
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 200).decode(errors="replace").split()
      os.close(fd)
      who = f"process {holder[0]} on host {holder[1]}" if len(holder) >= 2 else "another process"
      raise WorkdirInUse(f"{workdir} is in use by {who}; wait until it ends, or use another --workdir") from None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)  # its holder removed it on exit: lock the new one
  try:
    try:
      os.ftruncate(fd, 0)
      os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    except OSError as e:
      if is_no_space(e):
        raise no_space(path, " (the workdir's lock)") from None
      raise
    yield
  finally:
    with contextlib.suppress(OSError):
      path.unlink()
    os.close(fd)
