"""Metrics of long jobs: TensorBoard event files and JSON lines, without TensorFlow.

`MetricWriter(workdir)` writes scalars twice, and only on process 0:
  <workdir>/tensorboard/events.out.tfevents.*   (tensorboardX; `tensorboard --logdir`)
  <workdir>/metrics.jsonl                        (one {"step", "time", ...} object a line)
The JSON lines are appended, so a resumed run continues the same file; readers keep
the last record of a step (`read_jsonl(..., last_per_step=True)`).

`MetricAccumulator` keeps per-step metrics on device and fetches them in one transfer
at logging steps, so logging never stalls the device between them. `StepTimeWindow`
turns the times of logging steps into seconds per step over the last N steps.
`read_tensorboard_scalars` parses event files (checking their CRCs) with the protos
tensorboardX ships.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tensorboardX.crc32c import crc32c
from tensorboardX.proto import event_pb2

from m3jax.core.workspace import METRICS_FILE as JSONL_FILE
from m3jax.core.workspace import TENSORBOARD_DIR


def _scalar(name: str, value: Any) -> int | float:
  """A Python number from a Python/NumPy/JAX scalar; the error names the metric."""
  if not isinstance(value, (int, float, np.ndarray, np.generic)):
    value = jax.device_get(_addressable(value))
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f"metric {name!r}: expected a scalar, got shape {arr.shape}")
  item = arr.reshape(()).item()
  if isinstance(item, bool):
    return int(item)
  if not isinstance(item, (int, float)):
    raise TypeError(f"metric {name!r}: {value!r} is not a number")
  return item


class MetricWriter:
  """Scalars to TensorBoard and `metrics.jsonl`; a no-op on processes other than 0."""

  def __init__(self, workdir: str, process_index: int | None = None, *,
               flush_secs: float = 30.0):
    if process_index is None:
        process_index = jax.process_index()
    self.workdir = os.path.abspath(workdir)
    self.enabled = process_index == 0
    self.jsonl_path = os.path.join(self.workdir, JSONL_FILE)
    self.tensorboard_dir = os.path.join(self.workdir, TENSORBOARD_DIR)
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(self.tensorboard_dir, exist_ok=True)
      self._tb = SummaryWriter(self.tensorboard_dir, flush_secs=flush_secs)
      _drop_torn_tail(self.jsonl_path)
      self._jsonl = open(self.jsonl_path, "a", encoding="utf-8", buffering=1)  # per line

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Records `scalars` (name -> number or device scalar) at `step`.

    Names like "train/loss" group plots in TensorBoard.
    """
    if not self.enabled:
      return
    values = {str(k): _scalar(str(k), v) for k, v in scalars.items()}
    now = time.time()
    for name, value in values.items():
      self._tb.add_scalar(name, value, global_step=int(step), walltime=now)
    record = {"step": int(step), "time": round(now, 3), **values}
    self._jsonl.write(json.dumps(record) + "\n")

  def flush(self) -> None:
    """Pushes buffered records to disk (JSON lines and event files)."""
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled and self._jsonl is not None:
      self.flush()
      self._tb.close()
      self._jsonl.close()
      self._jsonl = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()


def _drop_torn_tail(path: str) -> None:
  """Truncates a last line left unterminated by a killed job, so appends stay valid."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size == 0:
      return
    f.seek(size - 1)
    if f.read(1) == b"\n":
      return
    end = size  # scan back, 64 KiB at a time, for the last complete line
    while end > 0:
      start = max(0, end - (1 << 16))
      f.seek(start)
      cut = f.read(end - start).rfind(b"\n")
      if cut >= 0:
        f.truncate(start + cut + 1)
        return
      end = start
    f.truncate(0)


class MetricAccumulator:
  """Collects per-step metric dicts of device scalars; fetches them only when asked.

  `add()` keeps references (no device sync); `fetch()` transfers everything in one
  `jax.device_get` and returns per-name means over the steps since the last fetch
  (names in `last` keep their latest value instead, e.g. the learning rate).
  """

  def __init__(self, last: Iterable[str] = ()):
    self._last = frozenset(last)
    self._pending: list[Mapping[str, Any]] = []

  def add(self, metrics: Mapping[str, Any]) -> None:
    self._pending.append(dict(metrics))

  def __len__(self) -> int:
    return len(self._pending)

  def fetch(self) -> dict[str, float]:
    """Means (or last values) over the pending steps; empties the accumulator."""
    if not self._pending:
      return {}
    host = jax.device_get([{k: _addressable(v) for k, v in m.items()}
                           for m in self._pending])
    self._pending = []
    out: dict[str, float] = {}
    names = dict.fromkeys(k for m in host for k in m)
    for name in names:
      values = [_scalar(name, m[name]) for m in host if name in m]
      out[name] = float(values[-1]) if name in self._last else float(np.mean(values))
    return out


class StepTimeWindow:
  """Seconds per step over the last `window` steps, for throughput and MFU in logs.

  A training loop syncs with the device only at logging steps, so it cannot time one
  step; it calls `mark(step, seconds)` there with its cumulative training seconds
  (eval and checkpoint time left out). One logging interval on a shared machine
  swings with the load; the window averages the last `window` steps or more (whole
  intervals), so the logged figure moves slowly. Counted, not timed: the figure is
  a pure function of the marks (`windowed_seconds_per_step`).
  """

  def __init__(self, window: int):
    if window < 1:
      raise ValueError(f"the step-time window must be >= 1 step, got {window}")
    self.window = int(window)
    self._marks: list[tuple[int, float]] = []

  def mark(self, step: int, seconds: float) -> None:
    self._marks.append((int(step), float(seconds)))
    # Keep the newest mark at least `window` steps back, and what follows it.
    while len(self._marks) > 2 and self._marks[-1][0] - self._marks[1][0] >= self.window:
      self._marks.pop(0)

  def seconds_per_step(self) -> float | None:
    return windowed_seconds_per_step(self._marks, self.window)


def windowed_seconds_per_step(marks: Sequence[tuple[int, float]], window: int) -> float | None:
  """Mean seconds per step between the newest mark and the newest mark at least
  `window` steps before it (the oldest mark when none is that old).

  marks: (step, cumulative seconds) in increasing step order. None with fewer than
  two marks (no interval yet).
  """
  if len(marks) < 2:
    return None
  last_step, last_t = marks[-1]
  first_step, first_t = marks[0]
  for step, t in reversed(marks[:-1]):
    if last_step - step >= window:
      first_step, first_t = step, t
      break
  if last_step <= first_step:
    raise ValueError(f"step-time marks must increase in step; got {first_step} then {last_step}")
  return (last_t - first_t) / (last_step - first_step)


def _addressable(value: Any) -> Any:
  """A replicated global scalar of a multi-host jit can be read from a local shard."""
  if hasattr(value, "is_fully_addressable") and not value.is_fully_addressable:
    return value.addressable_data(0)
  return value


# ------------------------------------------------------------------ readers


def read_jsonl(path: str, last_per_step: bool = False) -> list[dict[str, Any]]:
  """Records of a `metrics.jsonl` (or a workdir holding one), in file order.

  A torn last line (job killed mid-write) is skipped. With `last_per_step`, a step
  written again after a restart keeps only its latest record, ordered by step.
  """
  if os.path.isdir(path):
    path = os.path.join(path, JSONL_FILE)
  records = []
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i == len(lines) - 1:  # unterminated last line: an interrupted write
        break
      raise ValueError(f"{path}:{i + 1}: not a JSON object: {line[:80]!r}") from None
  if last_per_step:
    by_step = {r["step"]: r for r in records}
    records = [by_step[s] for s in sorted(by_step)]
  return records


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_records(path: str) -> Iterable[bytes]:
  """TFRecord framing: len u64, masked crc(len) u32, data, masked crc(data) u32."""
  with open(path, "rb") as f:
    blob = f.read()
  pos = 0
  while pos + 12 <= len(blob):
    header = blob[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", blob[pos + 8:pos + 12])
    if header_crc != _masked_crc(header):
      raise ValueError(f"{path}: corrupt record header at byte {pos}")
    end = pos + 12 + length + 4
    if end > len(blob):  # a record still being written
      return
    data = blob[pos + 12:pos + 12 + length]
    (data_crc,) = struct.unpack("<I", blob[end - 4:end])
    if data_crc != _masked_crc(data):
      raise ValueError(f"{path}: corrupt record data at byte {pos}")
    yield data
    pos = end


def read_tensorboard_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """tag -> [(step, value), ...] from every event file in `logdir` (or workdir/tensorboard)."""
  if os.path.isdir(os.path.join(logdir, TENSORBOARD_DIR)):
    logdir = os.path.join(logdir, TENSORBOARD_DIR)
  files = sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
  if not files:
    raise FileNotFoundError(f"no TensorBoard event files in {logdir}")
  out: dict[str, list[tuple[int, float]]] = {}
  for path in files:
    for data in _read_records(path):
      event = event_pb2.Event.FromString(data)
      if not event.HasField("summary"):
        continue
      for value in event.summary.value:
        if value.HasField("simple_value"):
          number = float(value.simple_value)
        elif value.HasField("tensor") and value.tensor.float_val:
          number = float(value.tensor.float_val[0])
        elif value.HasField("tensor") and value.tensor.double_val:
          number = float(value.tensor.double_val[0])
        else:
          continue
        out.setdefault(value.tag, []).append((int(event.step), number))
  return out

