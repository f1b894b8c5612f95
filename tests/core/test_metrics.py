"""MetricWriter (TensorBoard + JSON lines), MetricAccumulator and Progress."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.core import metrics
from m3jax.core import progress


def test_jsonl_and_tensorboard_hold_what_was_written(tmp_path):
  written = {10: {"train/loss": 2.5, "train/tokens_per_s": 1024.0, "train/step_count": 3},
             20: {"train/loss": 1.75, "train/tokens_per_s": 2048.0, "train/step_count": 7}}
  with metrics.MetricWriter(str(tmp_path), process_index=0) as w:
    for step, scalars in written.items():
      # Device and NumPy scalars are accepted as well as Python numbers.
      w.write_scalars(step, {"train/loss": jnp.float32(scalars["train/loss"]),
                             "train/tokens_per_s": np.float64(scalars["train/tokens_per_s"]),
                             "train/step_count": scalars["train/step_count"]})

  records = metrics.read_jsonl(str(tmp_path))
  assert [r["step"] for r in records] == [10, 20]
  for r in records:
    assert {k: r[k] for k in written[r["step"]]} == written[r["step"]]
    assert isinstance(r["train/step_count"], int)

  tb = metrics.read_tensorboard_scalars(str(tmp_path))
  assert set(tb) == set(written[10])
  for tag, points in tb.items():
    assert points == [(step, float(np.float32(written[step][tag]))) for step in (10, 20)]


def test_only_process_zero_writes(tmp_path):
  w = metrics.MetricWriter(str(tmp_path / "run"), process_index=1)
  w.write_scalars(1, {"loss": 1.0})
  w.close()
  assert not os.path.exists(tmp_path / "run")


def test_jsonl_resumes_after_a_write_torn_by_a_kill(tmp_path):
  with metrics.MetricWriter(str(tmp_path), process_index=0) as w:
    w.write_scalars(1, {"loss": 3.0})
    w.write_scalars(2, {"loss": 2.0})
  path = tmp_path / metrics.JSONL_FILE
  with open(path, "a") as f:
    f.write('{"step": 3, "lo')  # killed mid-write
  assert [r["step"] for r in metrics.read_jsonl(str(path))] == [1, 2]
  with metrics.MetricWriter(str(tmp_path), process_index=0) as w:  # resumed from step 1
    w.write_scalars(2, {"loss": 1.5})
  assert [r["step"] for r in metrics.read_jsonl(str(path))] == [1, 2, 2]
  latest = metrics.read_jsonl(str(tmp_path), last_per_step=True)
  assert [(r["step"], r["loss"]) for r in latest] == [(1, 3.0), (2, 1.5)]


def test_corrupt_jsonl_line_is_named(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match="m.jsonl:2"):
    metrics.read_jsonl(str(path))


def test_non_scalar_metric_is_named(tmp_path):
  with metrics.MetricWriter(str(tmp_path), process_index=0) as w:
    with pytest.raises(ValueError, match="'train/hist'"):
      w.write_scalars(1, {"train/hist": np.ones(3)})


def test_accumulator_fetches_means_and_last_values_once():
  acc = metrics.MetricAccumulator(last=("lr",))
  step = jax.jit(lambda i: {"loss": i * 2.0, "lr": i / 10.0})
  for i in range(1, 5):
    acc.add(step(jnp.float32(i)))
  assert len(acc) == 4
  out = acc.fetch()
  assert out == pytest.approx({"loss": 5.0, "lr": 0.4})
  assert len(acc) == 0 and acc.fetch() == {}


def test_progress_reports_rate_eta_and_elapsed_on_schedule():
  now = [100.0]
  lines = []
  p = progress.Progress(1000, desc="train", unit="steps", every_s=10, initial=100,
                        clock=lambda: now[0], printer=lines.append)
  for _ in range(9):
    now[0] += 1.0
    assert p.update(10) is None  # not due yet
  now[0] += 1.0
  line = p.update(10)  # 10 s, 100 steps since start: 10 steps/s, 800 left
  assert lines == [line]
  assert line == ("train: 200/1000 steps (20.0%) | 10.00 steps/s | elapsed 10s | "
                  "ETA 1m20s")
  now[0] += 10.0
  p.set(250)  # slower interval: 5 steps/s -> ETA 150 s
  assert lines[-1].endswith("5.00 steps/s | elapsed 20s | ETA 2m30s")
  now[0] += 3600.0
  p.set(1000)
  assert p.close().endswith("elapsed 1h00m20s | ETA 0s")


def test_progress_open_ended_and_silent_when_disabled():
  now = [0.0]
  lines = []
  p = progress.Progress(None, desc="encode", unit="refs", every_s=1, clock=lambda: now[0],
                        printer=lines.append, enabled=False)
  now[0] = 4.0
  assert p.update(2) == "encode: 2 refs | 2.0 s/ref | elapsed 4s"
  assert lines == []
  assert progress.format_duration(3725) == "1h02m05s"


def test_progress_mark_starts_a_fresh_interval_without_printing():
  now = [0.0]
  lines = []
  p = progress.Progress(100, desc="train", unit="steps", every_s=30, clock=lambda: now[0],
                        printer=lines.append)
  now[0] = 20.0
  p.mark(1)  # a 20 s first step (compilation) ends the first interval
  now[0] = 30.0
  assert p.mark(11) == "1.00 steps/s | elapsed 30s | ETA 1m29s"  # 10 steps in 10 s
  now[0] = 59.0
  assert p.set(40) is None  # 29 s since the last mark: not due
  now[0] = 60.0
  assert p.set(41) == "train: 41/100 steps (41.0%) | 1.00 steps/s | elapsed 1m00s | ETA 59s"
  assert lines == [p.line()]


def test_step_time_window_averages_the_last_n_steps():
  # Marks every 10 steps; steps 0..30 take 1 s each, then 3 s each (a loaded machine).
  marks, t = [(0, 0.0)], 0.0
  for step in range(10, 101, 10):
    t += 10 * (1.0 if step <= 30 else 3.0)
    marks.append((step, t))
  w = metrics.StepTimeWindow(40)
  assert w.seconds_per_step() is None
  got = []
  for step, secs in marks:
    w.mark(step, secs)
    got.append(w.seconds_per_step())
  assert got[0] is None
  assert got[1] == got[3] == 1.0  # fewer than 40 steps so far: everything since step 0
  assert got[4] == pytest.approx((10 * 3.0 + 30 * 1.0) / 40)  # steps 0..40
  assert got[5] == pytest.approx((20 * 3.0 + 20 * 1.0) / 40)  # steps 10..50
  assert got[-1] == 3.0  # steps 60..100
  # The pure function agrees on every prefix, and the window keeps few marks.
  for i in range(2, len(marks) + 1):
    assert metrics.windowed_seconds_per_step(marks[:i], 40) == pytest.approx(got[i - 1])
  assert len(w._marks) <= 6
  # Marks 15 steps apart with a 40-step window: the newest mark >= 40 steps back (step 15, then 30).
  assert metrics.windowed_seconds_per_step([(0, 0.), (15, 15.), (30, 30.), (45, 60.),
                                                (60, 90.)], 40) == pytest.approx(75 / 45)
  assert metrics.windowed_seconds_per_step([(0, 0.), (15, 15.), (30, 30.), (45, 60.),
                                                (60, 90.), (75, 120.)], 40) == 2.0
  with pytest.raises(ValueError, match=">= 1 step"):
    metrics.StepTimeWindow(0)
