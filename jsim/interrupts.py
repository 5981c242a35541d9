"""SIGTERM/SIGINT outside the training stages: one line and exit 143/130, never a traceback.

`install` runs first thing in jsim.main (before anything slow is imported). Outside
a training stage a signal raises `Interrupted` where Python next checks for
signals; a training stage's preemption guard (jsim.train.loop) replaces the
handler for its duration with one that saves a checkpoint. An exception raised
inside a gc callback or a __del__ is swallowed by Python ("Exception ignored"),
so `received` remembers the signal and the run raises it again at the next
stage boundary (`raise_if_received`).
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading

received: int | None = None  # the last signal handled here


class Interrupted(BaseException):
  """A BaseException, like KeyboardInterrupt: `except Exception` in a library does not swallow it."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum, self.name = signum, signal.Signals(signum).name

  @property
  def exit_code(self) -> int:
    return 128 + self.signum


def _in_finalizer(frame) -> bool:
  """Whether Python would swallow an exception raised here: in a gc callback (jax has one) or a __del__."""
  callbacks = {getattr(cb, "__code__", None) for cb in gc.callbacks}
  while frame is not None:
    if frame.f_code in callbacks or frame.f_code.co_name == "__del__":
      return True
    frame = frame.f_back
  return False


def _handle(signum, frame):
  global received
  received = signum
  if _in_finalizer(frame):  # it would print "Exception ignored" and go on: deliver the signal again shortly
    threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
    return
  raise Interrupted(signum)


def raise_if_received() -> None:
  """Raises Interrupted for a signal whose exception something swallowed (a gc callback: 'Exception ignored')."""
  if received is not None:
    raise Interrupted(received)


def install() -> None:
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, _handle)


def _exit_now(message: str):
  def handle(signum, frame):
    sys.stderr.write(f"jsim: stopped by {signal.Signals(signum).name}{message}\n")
    sys.stderr.flush()
    os._exit(128 + signum)

  return handle


def install_while_importing() -> None:
  """Before jsim.main's imports: nothing is written yet, so a signal exits at once (no import traceback)."""
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, _exit_now(" while starting; nothing was written"))


def _after_run(signum, frame):
  sys.stderr.write(f"jsim: {signal.Signals(signum).name} after the run finished; its outputs are complete\n")
  sys.stderr.flush()
  os._exit(128 + signum)


def install_after_run() -> None:
  """The run is over (only the interpreter's teardown is left): a signal exits at once, saying so."""
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, _after_run)


def exit_now(code: int) -> None:
  """Exits with `code` at once, after flushing the output and the exit handlers, without the interpreter's teardown.

  The teardown is where native threads (XLA's, onnxruntime's, tensorstore's) are destroyed under
  Python, which segfaults or prints tracebacks after a KeyboardInterrupt (exit 139 instead of 130),
  and where Python restores the default signal handlers, so that a SIGTERM then kills silently.
  """
  import atexit

  for sig in (signal.SIGTERM, signal.SIGINT):  # (a second signal while flushing: the same one line)
    signal.signal(sig, _after_run if code == 0 else signal.SIG_IGN)
  try:
    atexit._run_exitfuncs()
  finally:
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except (OSError, ValueError):
        pass
    os._exit(code)
