"""Preemption: SIGTERM / SIGINT become a step, agreed by every host, to save at and stop.

The training loop polls `PreemptionGuard.should_stop(step)` once per step; on the step
it returns True everywhere, the loop saves a checkpoint (`m3jax.training.checkpoint`)
and exits 0, so a preempted job resumes from that step.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionGuard:
  """Turns SIGTERM / SIGINT into a "save and stop" decision the training loop polls.

  Every process calls `should_stop(step)` once per step, at the same steps; it
  returns True on the same step everywhere, after which the loop saves a
  checkpoint and exits 0.

  * One process: Python handlers for `signals` set a flag; the step it is seen at
    stops the loop. A second SIGINT raises KeyboardInterrupt (hard abort).
  * Several processes with JAX's preemption service (the default once
    `jax.distributed` is initialised): SIGTERM is caught by JAX's notifier, which
    agrees on a safe step across hosts (`reached_preemption_sync_point`); no
    Python SIGTERM handler is installed (it would replace JAX's). SIGINT keeps
    its default, so Ctrl-C on a multi-host job still aborts it.
  * Several processes, local requests (`request()`, or signal handlers when JAX's
    service is off): the flags are all-gathered every `sync_every` steps. That
    collective waits for the device like a metrics fetch does, so pass the logging
    period as `sync_every`.
  """

  def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT), *,
               sync_every: int = 10):
    if sync_every < 1:
      raise ValueError(f"sync_every={sync_every}: must be >= 1")
    self._signals = tuple(signals)
    self._sync_every = sync_every
    self._previous: dict[int, Any] = {}
    self._flag = threading.Event()
    self.signal_name: str | None = None
    self.stop_step: int | None = None

  @staticmethod
  def _jax_preemption_service() -> bool:
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)

  def install(self) -> "PreemptionGuard":
    """Installs the handlers (main thread only); returns self."""
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("PreemptionGuard.install() must run in the main thread")
    skip = set()
    if jax.process_count() > 1 and self._jax_preemption_service():
      skip = {signal.SIGTERM, signal.SIGINT}
    for sig in self._signals:
      if sig in skip:
        continue
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self) -> None:
    """Restores the handlers that were there before `install()`."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def __enter__(self) -> "PreemptionGuard":
    return self.install()

  def __exit__(self, *exc: Any) -> None:
    self.uninstall()

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self._flag.is_set() and signum == signal.SIGINT:
      raise KeyboardInterrupt  # second Ctrl-C: stop waiting for the checkpoint
    self.request(signal.Signals(signum).name)

  def request(self, reason: str = "request") -> None:
    """Asks the loop to stop, as a signal would (usable from any thread)."""
    if not self._flag.is_set():
      self.signal_name = reason
      logging.warning("m3jax: %s received; will save a checkpoint and stop", reason)
    self._flag.set()

  @property
  def requested(self) -> bool:
    """True once this process saw a stop signal (not yet agreed with other hosts)."""
    return self._flag.is_set()

  def should_stop(self, step: int) -> bool:
    """True at the step where every process should save and exit (call every step)."""
    if self.stop_step is not None:
      return True
    stop = self._flag.is_set()
    if jax.process_count() > 1:
      stop = False
      if self._jax_preemption_service():
        stop = multihost_utils.reached_preemption_sync_point(int(step))
        if stop and self.signal_name is None:
          self.signal_name = "SIGTERM"
      if not stop and step % self._sync_every == 0:
        # Local requests (Python handlers, `request()`): the same collective on every
        # process, so all of them see the same answer at the same step.
        flags = multihost_utils.process_allgather(np.int32(self._flag.is_set()))
        stop = bool(np.any(flags))
    if stop:
      self.stop_step = int(step)
    return stop


