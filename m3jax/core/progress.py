"""One-line progress reports for long jobs (training, evaluation, mining, encoding).

    train: 1200/10000 steps (12.0%) | 3.41 steps/s | elapsed 5m52s | ETA 43m01s

`Progress` prints at most one line every `every_s` seconds of its clock. The rate is
measured over the interval since the previous report (so a slow first step, e.g.
compilation, stops mattering after one report) and the ETA follows from it. The
clock and the printer are injected, so tests drive it without sleeping.
"""

from __future__ import annotations

import time
from typing import Callable


def format_duration(seconds: float) -> str:
  """1h02m03s, 5m52s, 12s (rounded down to whole seconds)."""
  if seconds != seconds or seconds in (float("inf"), float("-inf")):
    return "?"
  s = max(0, int(seconds))
  h, rem = divmod(s, 3600)
  m, s = divmod(rem, 60)
  if h:
    return f"{h}h{m:02d}m{s:02d}s"
  if m:
    return f"{m}m{s:02d}s"
  return f"{s}s"


def format_rate(rate: float, unit: str) -> str:
  if rate >= 100:
    return f"{rate:,.0f} {unit}/s"
  if rate >= 1:
    return f"{rate:.2f} {unit}/s"
  if rate > 0:
    return f"{1.0 / rate:.1f} s/{unit.rstrip('s') or unit}"
  return f"0 {unit}/s"


class Progress:
  """Counts work done and reports rate, elapsed time and ETA on one line.

  `total=None` for open-ended work (no percentage or ETA). `done` starts at
  `initial` (work finished before a resume), which does not count toward the rate.
  `enabled=False` (e.g. on hosts other than 0) still counts but never prints.
  """

  def __init__(self, total: int | None, *, desc: str = "progress", unit: str = "items",
               every_s: float = 30.0, initial: int = 0,
               clock: Callable[[], float] = time.monotonic,
               printer: Callable[[str], None] | None = None, enabled: bool = True):
    if total is not None and total < 0:
      raise ValueError(f"total={total}: must be >= 0 or None")
    self.total = total
    self.desc = desc
    self.unit = unit
    self.every_s = float(every_s)
    self.enabled = enabled
    self._clock = clock
    self._printer = printer or (lambda line: print(line, flush=True))
    self.done = int(initial)
    self._start_time = clock()
    self._start_done = self.done
    self._mark_time = self._start_time
    self._mark_done = self.done
    self._rate: float | None = None

  # ---------------------------------------------------------------- measures

  @property
  def elapsed_s(self) -> float:
    return self._clock() - self._start_time

  @property
  def rate(self) -> float:
    """Items/s over the last report interval (overall rate before the first report)."""
    if self._rate is not None:
      return self._rate
    elapsed = self.elapsed_s
    return (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0

  @property
  def eta_s(self) -> float | None:
    """Seconds left at the current rate; None when unknown."""
    if self.total is None:
      return None
    left = max(0, self.total - self.done)
    if left == 0:
      return 0.0
    rate = self.rate
    return left / rate if rate > 0 else None

  def line(self) -> str:
    """The status line for the current state."""
    if self.total is not None:
      pct = 100.0 * self.done / self.total if self.total else 100.0
      head = f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.1f}%)"
    else:
      head = f"{self.desc}: {self.done} {self.unit}"
    return f"{head} | {self.timing()}"

  def timing(self) -> str:
    """`3.41 steps/s | elapsed 5m52s | ETA 43m01s`: rate, elapsed time and ETA alone."""
    parts = [format_rate(self.rate, self.unit), f"elapsed {format_duration(self.elapsed_s)}"]
    if self.total is not None:
      eta = self.eta_s
      parts.append(f"ETA {format_duration(eta) if eta is not None else '?'}")
    return " | ".join(parts)

  # ---------------------------------------------------------------- updates

  def update(self, n: int = 1) -> str | None:
    """Adds `n` finished items; returns the line if one was printed."""
    return self.set(self.done + n)

  def set(self, done: int) -> str | None:
    """Sets the finished count (e.g. the training step); prints when due."""
    self.done = int(done)
    now = self._clock()
    if now - self._mark_time < self.every_s:
      return None
    return self._report(now)

  def mark(self, done: int | None = None) -> str:
    """Ends the report interval now without printing; returns `timing()` over it.

    For a caller that prints its own line (a training log line carrying the ETA), so the
    next periodic line comes `every_s` later. Marking right after a slow first step
    (compilation) keeps that step out of the rate.
    """
    if done is not None:
      self.done = int(done)
    self._close_interval(self._clock())
    return self.timing()

  def _close_interval(self, now: float) -> None:
    span = now - self._mark_time
    if span > 0:
      self._rate = (self.done - self._mark_done) / span
    self._mark_time, self._mark_done = now, self.done

  def _report(self, now: float) -> str | None:
    self._close_interval(now)
    text = self.line()
    if self.enabled:
      self._printer(text)
    return text

  def close(self) -> str | None:
    """Prints the final line with the overall rate; returns it."""
    elapsed = self.elapsed_s
    self._rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
    text = self.line()
    if self.enabled:
      self._printer(text)
    return text
