"""Progress bars with rate and ETA that say 'compiling' while JAX compiles, and plain lines in a log.

No jsim imports: the data layer, the trainers and the evaluators all use it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref


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
COMPILE_NOTE_S = 0.05  # a log's last line says how much was compiling from this much on (not '0.0 s of it')

# What JAX reports when it traces, lowers and compiles a function for XLA (jax.monitoring): only a call that
# is not in its caches does, so a bar says 'compiling' only when it is (a later epoch's steps are cached).
_COMPILE_EVENTS = frozenset(
  {
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
  }
)
_open_bars: "weakref.WeakSet[Progress]" = weakref.WeakSet()  # the bars not yet closed: told of every compilation
_open_bars_lock = threading.Lock()  # (JAX may compile, and report it, on another thread)
_listening = False


def _on_jax_event(event: str, seconds: float, **_) -> None:
  if event in _COMPILE_EVENTS:
    with _open_bars_lock:
      bars = list(_open_bars)
    for bar in bars:
      bar._compiled(seconds)


def _listen_to_jax() -> None:
  global _listening
  if not _listening:
    import jax.monitoring

    jax.monitoring.register_event_duration_secs_listener(_on_jax_event)
    _listening = True


class Progress:
  """A progress bar with rate and ETA that says 'compiling' when JAX compiles before the first update.

  On a terminal it is a tqdm bar, erased when closed; in a redirected log it writes a
  plain line when the step starts compiling (with `announce`), every PLAIN_EVERY_S
  seconds, and when a step that was announced or took that long ends: 'done in ...', or
  'stopped after ...' when it ends short of its total (an interrupt, an error). The rate
  and ETA leave out the first update when JAX compiled before it (the first step's
  compilation); otherwise they count from the start.
  """

  def __init__(
    self,
    total: int,
    desc: str,
    unit: str,
    *,
    initial: int = 0,
    enabled: bool = True,
    announce: bool = False,
    stream=None,
    terminal: bool | None = None,
  ):
    self.total, self.desc, self.unit = total, desc, unit
    self.n = initial
    self.initial = initial
    self.enabled = enabled
    self.stream = stream or sys.stderr
    self.terminal = _is_terminal(self.stream) if terminal is None else terminal
    self._start = time.perf_counter()
    self._t0 = self._n0 = None  # after the first update: where the rate is measured from
    self._compile_s = 0.0  # JAX's tracing, lowering and compiling while the bar is open
    self._compiles = 0  # how many of those JAX reported
    self._last_plain = self._start
    self._periodic = 0  # plain lines written since the start
    self.announce = announce
    self._announced = False  # a log got the 'compiling' line: it also gets the one saying how it ended
    self._postfix = ""
    self._bar = None
    with _open_bars_lock:  # (also when disabled: the rate leaves the compilation out on every process)
      _listen_to_jax()
      _open_bars.add(self)
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

  def _compiled(self, seconds: float) -> None:
    """JAX traced, lowered or compiled something for `seconds` (a jax.monitoring event) while the bar was open."""
    self._compile_s += seconds
    self._compiles += 1
    if not self.enabled or self._t0 is not None or self._compiles > 1:  # (said already, or after the first step)
      return
    if self._bar is not None:
      self._bar.set_postfix_str(", ".join(x for x in ("compiling", self._postfix) if x), refresh=True)
    elif self.announce:
      self._plain("compiling")
      self._announced = True

  def _speed(self) -> float | None:
    if self._t0 is None:
      return None
    dt = time.perf_counter() - self._t0
    return (self.n - self._n0) / dt if dt > 0 and self.n > self._n0 else None

  def rate(self) -> float | None:
    """Items per second from the start to now; from the first update when JAX compiled before it."""
    return self._speed()

  def _status(self) -> str:
    speed = self._speed()
    if speed is None:
      if self._t0 is None:
        return "compiling" if self._compiles else ""
      return "compiled, measuring the rate"
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
    if self._t0 is None:  # the first update: it took the compilation, if any, so the rate starts after it
      self._t0, self._n0 = (time.perf_counter(), self.n) if self._compiles else (self._start, self.initial)
    if not self.enabled:
      return
    if self._bar is not None:  # (the status first: tqdm draws the bar in update, with the postfix it has)
      self._bar.set_postfix_str(", ".join(x for x in (self._status(), self._postfix) if x), refresh=False)
      self._bar.update(n)
    elif time.perf_counter() - self._last_plain >= PLAIN_EVERY_S and self.n < self.total:
      self._plain(self._status())
      self._periodic += 1

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Erases the bar on a terminal; in a log, says how it ended if it said anything before."""
    with _open_bars_lock:
      _open_bars.discard(self)
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    elif self._periodic or self._announced:  # (a short step says nothing in a log; a long one says when it ended)
      elapsed = duration(time.perf_counter() - self._start)
      how = f"done in {elapsed}" if self.n >= self.total else f"stopped after {elapsed}"
      if self._compiles and self._compile_s >= COMPILE_NOTE_S:
        how += f" ({duration(self._compile_s)} of it compiling)"
      self._plain(how)
    self.enabled = False


def progress(total: int, desc: str, unit: str, *, initial: int = 0, announce: bool = False) -> Progress:
  """A Progress on the main process (silent on the others)."""
  import jax

  return Progress(total, desc, unit, initial=initial, enabled=jax.process_index() == 0, announce=announce)
