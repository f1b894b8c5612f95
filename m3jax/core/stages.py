"""Stages that run once: skipped while their recorded settings hash matches and output is there.

A stage is a named step of a longer job (prepare-data's documents/tokenizer/..., the
demo's prepare/warmup/.../bench). `StageRunner.run` hashes the stage's settings
(`artifacts.settings_hash`), reads the stage's record, and either reuses it (same hash,
output still there) or runs the stage and writes a new record with the hash, the
result, the time it took and when it finished. A record whose hash differs goes to
`on_change`, which either raises (prepare-data refuses to mix settings) or lets the
stage run again (the demo).

Two record layouts are on disk, both kept as they are (`RecordFormat`):
  prepare-data  `<data>/<stage>/stage.json` inside the stage's output directory, which is
                built under `<data>/.tmp-<stage>-<id>/` and renamed into place with its
                record, so a killed run never leaves a stage that looks finished;
  demo          `<workdir>/stages/<stage>.json`, its outputs elsewhere (`done()` checks them).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import time
import uuid
from typing import Any, Callable

import numpy as np

from m3jax.core import artifacts
from m3jax.core import errors

STAGE_RECORD = "stage.json"  # inside a directory stage's output


class StageChangedError(errors.UserError, ValueError):
  """A finished stage was made with other settings (or is not a stage at all)."""


@dataclasses.dataclass(frozen=True)
class RecordFormat:
  """The JSON keys of a stage record (their names differ between the two layouts)."""
  name: str  # the stage's name
  key: str  # its settings hash
  result: str  # what the stage returned
  keep_settings: bool  # also store the settings themselves (for diffs of changed fields)


DIRECTORY_STAGE = RecordFormat(name="stage", key="settings_hash", result="info",
                               keep_settings=True)
RECORDED_STAGE = RecordFormat(name="name", key="key", result="result", keep_settings=False)


def jsonable(x: Any) -> Any:
  """`json.dumps(default=...)` for stage results: numpy scalars/arrays, else str."""
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.floating):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def normalise(x: Any) -> Any:
  """`x` as its JSON round trip (tuples become lists, numpy values Python ones; key
  order kept)."""
  return json.loads(json.dumps(x, default=jsonable))


OnChange = Callable[[str, str, dict[str, Any], Any], None]


def rerun_on_change(log: Callable[[str], None]) -> OnChange:
  """An `on_change` that logs the change and lets the stage run again."""
  def on_change(name: str, where: str, record: dict[str, Any], settings: Any) -> None:
    del where, record, settings
    log(f"stage {name}: settings changed since the recorded run: running it again")
  return on_change


class StageRunner:
  """Runs stages once; `records` holds each stage's record (plus `status`: ran/reused)."""

  def __init__(self, *, fmt: RecordFormat, on_change: OnChange,
               log: Callable[[str], None] = print, owner: str = "m3jax"):
    self.fmt, self.on_change, self.log, self.owner = fmt, on_change, log, owner
    self.records: dict[str, dict[str, Any]] = {}

  def run(self, name: str, settings: Any, build: Callable[..., Any], *,
          record: str | None = None, output_dir: str | None = None,
          done: Callable[[], bool] = lambda: True) -> dict[str, Any]:
    """Reuses stage `name` if its record has the hash of `settings` and `done()`; else runs it.

    Give `record` (a JSON path; `build()` writes its outputs wherever it likes and
    `done()` says whether they are still there), or `output_dir` (`build(tmp_dir)`
    writes into a temporary directory that becomes `output_dir`, record included;
    such a stage is never replaced, so its `on_change` must raise). Returns the record.
    """
    if (record is None) == (output_dir is None):
      raise ValueError("give exactly one of `record` and `output_dir`")
    settings = normalise(settings)
    key = artifacts.settings_hash(settings)
    path = record or os.path.join(output_dir, STAGE_RECORD)
    where = output_dir or path
    old = self._read(path, output_dir)
    if old is not None:
      if old.get(self.fmt.key) == key and done():
        return self._keep(name, dict(old, status="reused"), where)
      if old.get(self.fmt.key) != key:
        self.on_change(name, where, old, settings)
        if output_dir is not None:
          raise StageChangedError(f"{where}: a finished stage is not replaced; remove it")
    self.log(f"building stage {name}")
    t0 = time.time()
    if output_dir is None:
      rec = self._record(name, key, settings, build(), t0)
      artifacts.write_json(path, rec)
    else:
      rec = self._build_directory(name, key, settings, build, output_dir, t0)
    self.log(f"stage {name} done in {rec['seconds']:.1f}s")
    return self._keep(name, dict(rec, status="ran"), None)

  def _read(self, path: str, output_dir: str | None) -> dict[str, Any] | None:
    if output_dir is not None and os.path.exists(output_dir) and not os.path.isfile(path):
      raise StageChangedError(
          f"{output_dir} exists but has no {STAGE_RECORD} (not written by {self.owner}, or "
          "damaged); remove it to rebuild the stage")
    return artifacts.read_json(path) if os.path.isfile(path) else None

  def _keep(self, name: str, rec: dict[str, Any], reused_from: str | None) -> dict[str, Any]:
    if reused_from is not None:
      self.log(f"reusing stage {name} ({reused_from}; it took {rec['seconds']:.1f}s)")
    self.records[name] = rec
    return rec

  def _record(self, name: str, key: str, settings: Any, result: Any, t0: float
              ) -> dict[str, Any]:
    f = self.fmt
    rec = {f.name: name, f.key: key, f.result: normalise(result),
           "seconds": round(time.time() - t0, 2),
           "finished": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    if f.keep_settings:
      rec["settings"] = settings
    return rec

  def _build_directory(self, name: str, key: str, settings: Any, build: Callable[[str], Any],
                       output_dir: str, t0: float) -> dict[str, Any]:
    tmp = os.path.join(os.path.dirname(output_dir), f".tmp-{name}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
      rec = self._record(name, key, settings, build(tmp), t0)
      artifacts.write_json(os.path.join(tmp, STAGE_RECORD), rec)
      os.rename(tmp, output_dir)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    return rec


def clean_tmp(root: str) -> None:
  """Removes temporary stage directories left by killed runs (only `.tmp-*`)."""
  for entry in os.listdir(root):
    if entry.startswith(".tmp-"):
      shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
