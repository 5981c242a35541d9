"""SIGTERM and SIGINT, everywhere jsim runs: one line and exit 143/130, never a traceback; a checkpoint in training.

`install` runs first thing in jsim.main (before anything slow is imported). Outside
a training stage a signal raises `Interrupted` where Python next checks for
signals. Inside one (`preemption_guard`, around each training stage) the first
signal only sets a flag that the epoch loop (jsim.train.loop) polls between steps:
it saves a checkpoint and stops; a second Ctrl-C stops at once (KeyboardInterrupt).
Once a run's outputs are written (`install_after_run`) a signal exits at once,
saying that they are complete.

An exception raised inside a gc callback or a __del__ is swallowed by Python
("Exception ignored"), so there a signal is delivered again shortly, and
`received` remembers it: the run raises it again at the next stage boundary
(`raise_if_received`). jsim.sweep passes its signals on to the run it started (`ForwardToChild`).
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
import time

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


def _deliver_later(signum: int) -> None:
  """Sends `signum` to this process again shortly (an exception raised now would be swallowed: see _in_finalizer)."""
  threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()


def _handle(signum, frame):
  global received
  received = signum
  if _in_finalizer(frame):  # it would print "Exception ignored" and go on
    _deliver_later(signum)
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
  """The run's outputs are complete (what is left: its summary, then the exit): a signal exits at once, saying so.

  Only where `install` put jsim's handlers (the command line): a program that calls jsim.run.run in its own
  process keeps its own handlers.
  """
  if signal.getsignal(signal.SIGTERM) is not _handle:
    return
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, _after_run)


def exiting(code: int) -> None:
  """From here on the process exits with `code`: a signal raises nothing more (it would raise inside the handler
  that is exiting, a traceback): after a successful run it exits at once with its own line, else it is ignored."""
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, _after_run if code == 0 else signal.SIG_IGN)


def exit_now(code: int) -> None:
  """Exits with `code` at once, after flushing the output and the exit handlers, without the interpreter's teardown.

  The teardown is where native threads (XLA's, onnxruntime's, tensorstore's) are destroyed under
  Python, which segfaults or prints tracebacks after a KeyboardInterrupt (exit 139 instead of 130),
  and where Python restores the default signal handlers, so that a SIGTERM then kills silently.
  """
  import atexit

  exiting(code)  # (a second signal while flushing: the same one line)
  try:
    atexit._run_exitfuncs()
  finally:
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except (OSError, ValueError):
        pass
    # A signal that another thread took (after a SIGSTOP, the kernel hands it to whichever thread runs first)
    # reaches this thread only when it next takes the GIL (CPython 3.11 sets the "eval breaker" for signals
    # in the main thread only): without a wait it would be lost in the exit, with status 0 and no line.
    time.sleep(0)
    os._exit(code)


class PreemptionGuard:
  """Turns the first SIGTERM/SIGINT into a flag (`signal_name`) that the training loop polls between steps."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  def install(self) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    if received is not None:  # a signal before the stage, whose exception something swallowed
      self.uninstall()
      raise_if_received()

  def _handle(self, signum, frame):
    if self.signal_name is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
      if _in_finalizer(frame):
        _deliver_later(signum)
        return
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name

  def uninstall(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def stop_requested(self, *, agree: bool = True) -> bool:
    """Whether to stop now.

    With several processes, they must stop at the same step, or one would wait
    forever in the others' next step (or in the collective save): a local signal
    counts only where all of them `agree` (the same steps for all), by an allgather,
    which syncs the host with the device, so not at every step.
    """
    import jax

    if jax.process_count() == 1:
      return self.signal_name is not None
    if not agree:
      return False
    import numpy as np
    from jax.experimental import multihost_utils

    stop = bool(np.any(multihost_utils.process_allgather(np.int32(self.signal_name is not None))))
    if stop and self.signal_name is None:
      self.signal_name = "a signal to another process"
    return stop


class ForwardToChild:
  """While a child process runs (`child`, jsim.sweep's run): SIGTERM/SIGINT go to it, which saves a
  checkpoint and stops; `signal_name` tells the parent to stop too. The child runs in its own session,
  so that a Ctrl-C at the terminal reaches it once, from here."""

  def __init__(self):
    self.child = None  # a subprocess.Popen
    self.signal_name: str | None = None

  def __enter__(self):
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def _handle(self, signum, frame):
    self.signal_name = signal.Signals(signum).name
    if self.child is not None and self.child.poll() is None:
      self.child.send_signal(signum)

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)


_active_guard: PreemptionGuard | None = None


@contextlib.contextmanager
def preemption_guard():
  """Within it, SIGTERM/SIGINT set a flag (yielded guard.signal_name) instead of stopping the run.

  Reentrant: an inner guard is the outer one. Used around a whole training stage,
  so that a signal during data loading or compilation is honoured too.
  """
  global _active_guard
  if _active_guard is not None:
    yield _active_guard
    return
  guard = PreemptionGuard()
  guard.install()
  _active_guard = guard
  try:
    yield guard
  finally:
    _active_guard = None
    guard.uninstall()
