"""Training checkpoints: one Orbax step directory per save, restorable into any mesh.

A training workdir keeps its checkpoints under `<workdir>/checkpoints/<step>/`, each
step one atomic Orbax checkpoint with up to three items:

  state/  the train-state pytree (`StandardSave`; sharded arrays written by every host)
  data/   the data-iterator state of EVERY process: `process_<i>-of-<n>.json` (or `.bin`
          for non-JSON bytes). Each host resumes its own iterator.
  meta/   a JSON dict: the caller's metadata plus `step`, `time`, `process_count`.

Orbax writes a step into `<step>.orbax-checkpoint-tmp-<n>/` and renames it when every
host has finished, so a job killed mid-save leaves no directory that looks complete;
`latest_step()` only sees finished steps. Saves are asynchronous: `save()` returns once
arrays are copied off the device, writing continues in the background.

`PreemptionGuard` turns SIGTERM/SIGINT into a flag the loop polls (`should_stop(step)`),
agreed across hosts, so every process saves the same step and exits cleanly.

`export_params` / `load_for_inference` bridge checkpoints to params directories
(`m3jax.model.params_io`): inference accepts a params dir, a workdir, its checkpoints dir or
one step dir.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import re
import signal
import threading
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import future as ocp_future

from m3jax.core import config as config_lib
from m3jax.model import params_io

CHECKPOINTS_DIR = "checkpoints"
STATE_ITEM = "state"
DATA_ITEM = "data"
META_ITEM = "meta"
EXPORT_INFO_FILE = "export.json"  # beside a params dir written by `export_params`

DataState = bytes | str | Mapping[str, Any] | list | None


def _abspath(path: str) -> str:
  """Absolute local path; URLs (gs://...) are left for Orbax to open."""
  return path if "://" in path else os.path.abspath(path)


def checkpoint_dir(workdir: str) -> str:
  """`<workdir>/checkpoints`: where a training run keeps its steps."""
  return os.path.join(_abspath(workdir), CHECKPOINTS_DIR)


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
        raise ValueError(f"config field `train.keep_checkpoints`: {keep} must be >= 0 "
                         "(0 keeps every checkpoint)")
      kwargs["keep"] = keep or None
    return cls(checkpoint_dir(workdir), **kwargs)

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


# ------------------------------------------------------------------ preemption


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
      from jax.experimental import multihost_utils
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


# ------------------------------------------------------------------ export / inference


def _restore_params(item_dir: epath.Path, shardings: Any = None, key: str | None = "params"
                    ) -> Any:
  """Reads the pytree in `item_dir` (only its `key` entry, if given) into `shardings`.

  With `key="params"` on a train state, the optimizer moments stay on disk. Without
  `shardings`, every array goes to the first local device.
  """
  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = handler.metadata(item_dir).tree
    if key is not None and key not in tree:
      raise KeyError(f"{item_dir} holds no `{key}` entry (top-level keys: "
                     f"{sorted(tree)}); the train state must keep its parameters there")
    target_meta = tree[key] if key is not None else tree
    if shardings is None:
      device = jax.local_devices()[0]
      shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(device),
                               target_meta)
    abstract = jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), target_meta,
        shardings)
    item = {key: abstract} if key is not None else abstract
    restored = handler.restore(
        item_dir,
        args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=key is not None))
  finally:
    handler.close()
  return restored[key] if key is not None else restored


def _workdir_config(checkpoints: str) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.dirname(os.path.abspath(checkpoints)), params_io.CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path} not found: a training workdir keeps the run's config.json beside "
        f"{CHECKPOINTS_DIR}/ (written by m3jax.core.config.save_config)")
  return config_lib.config_from_json(path)


def _resolve_checkpoint(path: str) -> tuple[str, int]:
  """(checkpoints dir, step) from a workdir, a checkpoints dir or a step dir."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    path = os.path.join(path, CHECKPOINTS_DIR)
  name = os.path.basename(path.rstrip("/"))
  if re.fullmatch(r"\d+", name) and os.path.isdir(os.path.join(path, STATE_ITEM)):
    return os.path.dirname(path), int(name)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} does not exist")
  step = Checkpointer(path, read_only=True).latest_step()
  if step is None:
    raise FileNotFoundError(
        f"{path} is neither a params directory (config.json + params/), a training "
        f"workdir (with {CHECKPOINTS_DIR}/), a checkpoints directory with a finished "
        "step, nor a step directory")
  return path, step


def export_params(checkpoints: str, step: int | None, out_dir: str,
                  cfg: ml_collections.ConfigDict | None = None) -> str:
  """Writes the params of checkpoint `step` (None = latest) as a params directory.

  `checkpoints` is a workdir or its checkpoints dir; the config defaults to the
  workdir's `config.json`. Beside the params dir's `config.json` and `params/`,
  `export.json` records the source step. Returns `out_dir`.
  """
  ckpt_dir, latest = _resolve_checkpoint(checkpoints)
  step = latest if step is None else int(step)
  cfg = _workdir_config(ckpt_dir) if cfg is None else cfg
  state_dir = epath.Path(ckpt_dir) / str(step) / STATE_ITEM
  if not state_dir.exists():
    raise FileNotFoundError(f"checkpoint step {step} not found: {state_dir}")
  params = _restore_params(state_dir)
  params_io.save_params(out_dir, params, cfg)
  if jax.process_index() == 0:
    info = {"step": step, "source": os.path.join(ckpt_dir, str(step))}
    with open(os.path.join(out_dir, EXPORT_INFO_FILE), "w") as f:
      json.dump(info, f, indent=2)
  return out_dir


def load_for_inference(path: str, shardings: Any = None
                       ) -> tuple[ml_collections.ConfigDict, Any, int | None]:
  """(config, params, step) from a params dir, a workdir, a checkpoints dir or a step dir.

  A workdir or checkpoints dir gives its latest finished step. `shardings` (a
  pytree of `jax.sharding.Sharding` like the params) places the arrays; by default
  they go to the first local device. `step` is None for a params dir that was not
  exported from a checkpoint.
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist")
  if os.path.isfile(os.path.join(path, params_io.CONFIG_FILE)) and os.path.isdir(
      os.path.join(path, params_io.PARAMS_DIR)):
    # Same format as m3jax.model.params_io.load_params, read here so that arrays land on
    # one device by default instead of the layout they were saved from.
    cfg = config_lib.config_from_json(os.path.join(path, params_io.CONFIG_FILE))
    params = _restore_params(epath.Path(path) / params_io.PARAMS_DIR, shardings, key=None)
    step = None
    info = os.path.join(path, EXPORT_INFO_FILE)
    if os.path.isfile(info):
      with open(info) as f:
        step = json.load(f).get("step")
    return cfg, params, step
  ckpt_dir, step = _resolve_checkpoint(path)
  cfg = _workdir_config(ckpt_dir)
  params = _restore_params(epath.Path(ckpt_dir) / str(step) / STATE_ITEM, shardings)
  return cfg, params, step
