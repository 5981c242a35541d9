"""Progress bars with rate and ETA that say 'compiling' first, and plain lines in a log.

No jsim imports: the data layer, the trainers and the evaluators all use it.
"""

from __future__ import annotations

import os
import sys
import time


def rate(x: float) -> str:
  """3.1k, 412, 2.9M: a throughput with 2-3 significant digits."""
  for unit, scale in (("M", 1e6), ("k", 1e3)):
    if x >= scale:
      return f"{x / scale:.3g}{unit}"
  return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def duration(seconds: float) -> str:
  """'45 s', '3 min 12 s', '1 h 05 min'."""
  s = int(round(seconds))
  if s < 60:
    return f"{max(seconds, 0):.1f} s" if seconds < 10 else f"{s} s"
  if s < 3600:
    return f"{s // 60} min {s % 60:02d} s"
  return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _clock(seconds: float) -> str:
  s = int(max(seconds, 0))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _is_terminal(stream) -> bool:
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


# A redirected log gets one plain line this often (and one at the end), instead of tqdm's '\r' updates.
PLAIN_EVERY_S = float(os.environ.get("JSIM_PROGRESS_EVERY_S", "30"))


class Progress:
  """A progress bar with rate and ETA that says 'compiling' until the first update.

  On a terminal it is a tqdm bar, erased when done; in a redirected log it writes a
  plain line when it starts (with `announce`), every PLAIN_EVERY_S seconds, and when a
  step that took that long ends. The rate and ETA leave out the first update (which
  includes the compilation of the step) unless `compiles` is False.
  """

  def __init__(
    self,
    total: int,
    desc: str,
    unit: str,
    *,
    initial: int = 0,
    enabled: bool = True,
    compiles: bool = True,
    announce: bool = False,
    stream=None,
    terminal: bool | None = None,
  ):
    self.total, self.desc, self.unit = total, desc, unit
    self.compiles = compiles  # False: nothing to compile, the rate counts from the start
    self.n = initial
    self.enabled = enabled
    self.stream = stream or sys.stderr
    self.terminal = _is_terminal(self.stream) if terminal is None else terminal
    self._start = time.perf_counter()
    self._t0 = self._n0 = None  # after the first update: where the rate is measured from
    if not compiles:
      self._t0, self._n0 = self._start, initial
    self._last_plain = self._start
    self._periodic = 0  # plain lines written since the start
    self._announced = False  # a log got the 'compiling' line: it also gets the one saying it is done
    self._postfix = ""
    self._bar = None
    if not enabled:
      return
    if self.terminal:
      import tqdm

      self._bar = tqdm.tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        unit_scale=False,
        dynamic_ncols=True,
        file=self.stream,
        mininterval=0.5,
        leave=False,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
      )
      if compiles:
        self._bar.set_postfix_str("compiling", refresh=True)
    elif announce:
      self._plain("compiling" if compiles and initial < total else "")
      self._announced = True

  def _speed(self) -> float | None:
    if self._t0 is None:
      return None
    dt = time.perf_counter() - self._t0
    return (self.n - self._n0) / dt if dt > 0 and self.n > self._n0 else None

  def rate(self) -> float | None:
    """Items per second from the start (the first update, which compiles the step, left out when the step
    compiles) to now."""
    return self._speed()

  def _status(self) -> str:
    speed = self._speed()
    if speed is None:
      return "compiling" if self._t0 is None else "compiled, measuring the rate"
    eta = (self.total - self.n) / speed
    return f"{rate(speed)} {self.unit}/s, ETA {_clock(eta)}"

  def _plain(self, status: str) -> None:
    total = max(self.total, 1)
    parts = [f"{self.desc}: {100 * self.n / total:3.0f}% {self.n:,}/{self.total:,} {self.unit}"]
    if status:
      parts.append(status)
    if self._postfix:
      parts.append(self._postfix)
    print(", ".join(parts), file=self.stream, flush=True)
    self._last_plain = time.perf_counter()

  def set_postfix(self, text: str) -> None:
    self._postfix = text

  def update(self, n: int) -> None:
    self.n += n
    if self._t0 is None:
      self._t0, self._n0 = time.perf_counter(), self.n
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.update(n)
      status = self._status()
      self._bar.set_postfix_str(", ".join(x for x in (status, self._postfix) if x), refresh=False)
    elif time.perf_counter() - self._last_plain >= PLAIN_EVERY_S and self.n < self.total:
      self._plain(self._status())
      self._periodic += 1

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif self._periodic or self._announced:  # (a short step says nothing in a log; a long one says when it ended)
      elapsed = time.perf_counter() - self._start
      compiling = self._t0 - self._start if self.compiles and self._t0 is not None else 0.0
      self._plain(f"done in {duration(elapsed)}" + (f" ({duration(compiling)} of it compiling)" if compiling else ""))
    self.enabled = False


def progress(
  total: int, desc: str, unit: str, *, initial: int = 0, compiles: bool = True, announce: bool = False
) -> Progress:
  """A Progress on the main process (silent on the others)."""
  import jax

  return Progress(
    total, desc, unit, initial=initial, enabled=jax.process_index() == 0, compiles=compiles, announce=announce
  )
