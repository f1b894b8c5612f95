"""Training checkpoints: one Orbax step directory per save, restorable into any mesh.

A training workdir keeps its checkpoints under `<workdir>/checkpoints/<step>/`
(`m3jax.core.workspace.checkpoint_dir`), each step one atomic Orbax checkpoint with up
to three items:

  state/  the train-state pytree (`StandardSave`; sharded arrays written by every host)
  data/   the data-iterator state of EVERY process: `process_<i>-of-<n>.json` (or `.bin`
          for non-JSON bytes). Each host resumes its own iterator.
  meta/   a JSON dict: the caller's metadata plus `step`, `time`, `process_count`.

Orbax writes a step into `<step>.orbax-checkpoint-tmp-<n>/` and renames it when every
host has finished, so a job killed mid-save leaves no directory that looks complete;
`latest_step()` only sees finished steps. Saves are asynchronous: `save()` returns once
arrays are copied off the device, writing continues in the background.

Stopping on a signal is `m3jax.training.preemption`; reading the params of a step for
inference (or exporting them as a params directory) is `m3jax.model.params_io`, which
readers use without importing the trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
from typing import Any, Iterator, Mapping, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import future as ocp_future

from m3jax.core import workspace
from m3jax.core.errors import InputError
from m3jax.model import params_io

STATE_ITEM = params_io.STATE_ITEM
DATA_ITEM = "data"
META_ITEM = "meta"

DataState = bytes | str | Mapping[str, Any] | list | None


def _abspath(path: str) -> str:
  """Absolute local path; URLs (gs://...) are left for Orbax to open."""
  return path if "://" in path else os.path.abspath(path)


# ------------------------------------------------------------------ per-process data state


def _process_file(directory: epath.Path, suffix: str) -> epath.Path:
  return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.{suffix}"


class ProcessStateHandler(ocp.AsyncCheckpointHandler):
  """Writes one small file per process (each host's data-iterator state).

  Orbax's JSON handler writes on the primary host only; a data iterator is
  per-host state, so every process writes `process_<i>-of-<n>.json` (JSON values and
  UTF-8 bytes such as grain's `get_state()`) or `.bin` (other bytes), and restores its
  own file.
  """

  def _write_now(self, directory: epath.Path, value: DataState) -> None:
    if isinstance(value, (bytes, bytearray)):
      try:
        text = bytes(value).decode("utf-8")
        json.loads(text)
      except (UnicodeDecodeError, ValueError):
        _process_file(directory, "bin").write_bytes(bytes(value))
        return
      _process_file(directory, "json").write_text(json.dumps({"bytes": text}))
    else:
      _process_file(directory, "json").write_text(json.dumps({"json": value}))

  async def _write(self, directory: epath.Path, value: DataState) -> None:
    self._write_now(directory, value)

  async def async_save(self, directory: epath.Path, args: "ProcessStateSave"
                       ) -> list[ocp_future.Future]:
    # The commit future waits until Orbax has created `directory` on every host.
    return [ocp_future.CommitFutureAwaitingContractedSignals(
        self._write(directory, args.item), name="m3jax_process_state_save")]

  def save(self, directory: epath.Path, args: "ProcessStateSave") -> None:
    self._write_now(directory, args.item)

  def restore(self, directory: epath.Path, args: "ProcessStateRestore | None" = None
              ) -> DataState:
    del args
    bin_path, json_path = _process_file(directory, "bin"), _process_file(directory, "json")
    if bin_path.exists():
      return bin_path.read_bytes()
    if not json_path.exists():
      saved = sorted(p.name for p in directory.iterdir())
      raise FileNotFoundError(
          f"{json_path} not found: the data state in {directory} was saved by another "
          f"process layout ({', '.join(saved) or 'no files'}); this job is process "
          f"{jax.process_index()} of {jax.process_count()}. Restore with "
          "restore_data=False to start the data iterators afresh.")
    blob = json.loads(json_path.read_text())
    return blob["bytes"].encode("utf-8") if "bytes" in blob else blob["json"]

  def metadata(self, directory: epath.Path) -> None:
    del directory
    return None

  def finalize(self, directory: epath.Path) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(ProcessStateHandler, for_save=True)
@dataclasses.dataclass
class ProcessStateSave(ocp.args.CheckpointArgs):
  item: DataState


@ocp.args.register_with_handler(ProcessStateHandler, for_restore=True)
@dataclasses.dataclass
class ProcessStateRestore(ocp.args.CheckpointArgs):
  pass


# ------------------------------------------------------------------ Checkpointer


class Restored(NamedTuple):
  state: Any
  data_state: DataState
  meta: dict[str, Any]


def _to_json(value: Any, where: str) -> Any:
  """Python scalars from numpy/JAX scalars, recursively; fails naming the key."""
  if isinstance(value, Mapping):
    return {str(k): _to_json(v, f"{where}.{k}") for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    arr = np.asarray(jax.device_get(value))
    if arr.ndim:
      return arr.tolist()
    return arr.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"checkpoint {where} = {value!r} ({type(value).__name__}) "
                  "is not JSON-serializable")


_READ_ONLY_NOTICE = "Given directory is read only=%s"


class _DropReadOnlyNotice(logging.Filter):
  """Drops Orbax's warning that a manager opened read-only is read-only (what we asked)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.msg != _READ_ONLY_NOTICE


@contextlib.contextmanager
def _without_read_only_notice() -> Iterator[None]:
  """While a CheckpointManager is made: that one absl warning, and nothing else, is dropped."""
  logger, drop = logging.getLogger("absl"), _DropReadOnlyNotice()
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


class Checkpointer:
  """Async Orbax checkpoints of (train state, data-iterator state, metadata).

  One instance per training run, created on every process (saving and restoring
  are collective). `keep` finished steps are kept (None = all); the loop decides
  when to save.
  """

  def __init__(self, directory: str, *, keep: int | None = 3, async_save: bool = True,
               read_only: bool = False):
    if keep is not None and keep < 1:
      raise ValueError(f"keep={keep}: must be >= 1, or None to keep every checkpoint "
                       "(config field `train.keep_checkpoints`)")
    self.directory = _abspath(directory)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        save_interval_steps=0 if read_only else 1,
        create=not read_only,
        read_only=read_only,
        # A run restarted after a crash drops the half-written step it left behind.
        # Read-only users (eval, export) must not: a trainer may be writing it now.
        cleanup_tmp_directories=not read_only,
    )
    if read_only and not epath.Path(self.directory).is_dir():
      raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
    self._last_saved: int | None = None
    with _without_read_only_notice():
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=options,
          item_handlers={
              STATE_ITEM: ocp.StandardCheckpointHandler(),
              DATA_ITEM: ProcessStateHandler(),
              META_ITEM: ocp.JsonCheckpointHandler(),
          },
      )

  @classmethod
  def for_workdir(cls, workdir: str, cfg: ml_collections.ConfigDict | None = None,
                  **kwargs: Any) -> "Checkpointer":
    """The checkpointer of a training workdir; `keep` from `cfg.train.keep_checkpoints`."""
    if cfg is not None and "keep" not in kwargs:
      keep = int(cfg.train.keep_checkpoints)
      if keep < 0:
        raise InputError(f"config field `train.keep_checkpoints`: {keep} must be >= 0 "
                         "(0 keeps every checkpoint)")
      kwargs["keep"] = keep or None
    return cls(workspace.checkpoint_dir(workdir), **kwargs)

  # ---------------------------------------------------------------- queries

  def all_steps(self) -> list[int]:
    """Finished steps, ascending (re-read from disk)."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """Newest finished step, or None when there is none."""
    self._manager.reload()
    return self._manager.latest_step()

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # ---------------------------------------------------------------- save / restore

  def save(self, step: int, state: Any, data_state: DataState = None,
           meta: Mapping[str, Any] | None = None) -> bool:
    """Starts saving `step` (collective: call on every process with its own data state).

    Returns False (and writes nothing) when `step` is already saved, e.g. a
    preemption save right after a periodic one.
    """
    step = int(step)
    if step == self._last_saved or step in self._manager.all_steps():
      logging.info("checkpoint step %d already saved in %s", step, self.directory)
      return False
    info = _to_json(dict(meta or {}), "meta")
    info.update(step=step, process_count=jax.process_count(),
                time=datetime.datetime.now(datetime.timezone.utc).isoformat())
    items = {STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(info)}
    if data_state is not None:
      if not isinstance(data_state, (bytes, bytearray)):
        data_state = _to_json(data_state, "data_state")
      items[DATA_ITEM] = ProcessStateSave(data_state)
    saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      self._last_saved = step
    return bool(saved)

  def restore(self, step: int | None = None, abstract_state: Any = None, *,
              restore_data: bool = True) -> Restored:
    """Reads `step` (default: the latest) -> (state, data_state, meta).

    `abstract_state`: a pytree like the saved state whose leaves are
    `jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(...))` (or arrays);
    every array is read straight into that sharding, so a multi-host job restores
    into its own mesh. Without it, arrays come back with their saved sharding
    (single-host convenience only). `data_state` is None when none was saved or
    `restore_data` is False.
    """
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
    step = int(step)
    if step not in self.all_steps():
      raise FileNotFoundError(f"checkpoint step {step} not found in {self.directory} "
                              f"(finished steps: {self.all_steps()})")
    path = epath.Path(self.step_dir(step))
    items: dict[str, Any] = {
        STATE_ITEM: ocp.args.StandardRestore(abstract_state),
        META_ITEM: ocp.args.JsonRestore(),
    }
    if restore_data and (path / DATA_ITEM).exists():
      items[DATA_ITEM] = ProcessStateRestore()
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    data = out[DATA_ITEM] if DATA_ITEM in items else None
    return Restored(out[STATE_ITEM], data, dict(out[META_ITEM]))

  def wait_until_finished(self) -> None:
    """Blocks until the last save is on disk (and old steps are deleted)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases Orbax's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
