"""Parameters on disk: params directories, and the params inside training checkpoints.

A *params directory* holds `config.json` (the full resolved config) and `params/`
(an Orbax checkpoint of the float32 parameter tree). `m3jax convert` writes one;
`export_params` writes one from a training checkpoint.

A *training workdir* keeps its config beside `checkpoints/<step>/state/` (written by
`m3jax.training.checkpoint.Checkpointer`; docs/architecture.md). Inference and memory
encoding read parameters from either kind through `load_for_inference`, which lives
here, below training, so that readers never import the trainer: it finds the newest
finished step with Orbax's step utilities and reads only the `params` entry of the
train state (the optimizer moments stay on disk).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from m3jax.core import config as config_lib
from m3jax.core import workspace

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
STATE_ITEM = "state"  # the train-state item of a checkpoint step
EXPORT_INFO_FILE = "export.json"  # beside a params dir written by `export_params`


def save_params(path: str, params: Any, cfg: ml_collections.ConfigDict) -> None:
  """Writes `params` and `cfg` to `path` (created; must not already hold params)."""
  path = os.path.abspath(path)
  target = os.path.join(path, PARAMS_DIR)
  if os.path.exists(target):
    raise FileExistsError(f"{target} already exists; refusing to overwrite a checkpoint")
  os.makedirs(path, exist_ok=True)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(target, params)
  ckpt.wait_until_finished()
  config_lib.save_config(cfg, os.path.join(path, CONFIG_FILE))


def restore_tree(item_dir: str | epath.Path, shardings: Any = None,
                 key: str | None = None) -> Any:
  """Reads the pytree in Orbax item `item_dir` (only its `key` entry, if given).

  `shardings` (a pytree of `jax.sharding.Sharding` like the tree read) places the
  arrays; without it every array goes to the first local device. With
  `key="params"` on a train state, the optimizer moments stay on disk.
  """
  item_dir = epath.Path(item_dir)
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


def is_params_dir(path: str) -> bool:
  """True when `path` holds `config.json` and `params/`."""
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(
      os.path.join(path, PARAMS_DIR))


def load_params(path: str, shardings: Any = None) -> tuple[ml_collections.ConfigDict, Any]:
  """Reads a params directory; returns (config, params).

  With `shardings` (a pytree of `jax.sharding.Sharding` matching the params),
  arrays are restored directly into that layout; without, onto the first local device.
  """
  path = os.path.abspath(path)
  cfg_path = os.path.join(path, CONFIG_FILE)
  target = os.path.join(path, PARAMS_DIR)
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{cfg_path} not found: {path} is not an m3jax params directory")
  if not os.path.isdir(target):
    raise FileNotFoundError(f"{target} not found: {path} holds no parameters")
  return config_lib.config_from_json(cfg_path), restore_tree(target, shardings)


# ------------------------------------------------------------------ training checkpoints


def latest_step(checkpoints: str) -> int | None:
  """Newest finished step in a checkpoints dir (Orbax's half-written steps are skipped)."""
  meta = ocp.path.step.latest_step_metadata(epath.Path(checkpoints),
                                            ocp.path.step.standard_name_format())
  return None if meta is None else int(meta.step)


def workdir_config(checkpoints: str) -> ml_collections.ConfigDict:
  """The `config.json` of the training workdir that holds `checkpoints`."""
  path = os.path.join(os.path.dirname(os.path.abspath(checkpoints)), CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path} not found: a training workdir keeps the run's config.json beside "
        f"{workspace.CHECKPOINTS_DIR}/ (written by m3jax.core.config.save_config)")
  return config_lib.config_from_json(path)


def resolve_checkpoint(path: str) -> tuple[str, int]:
  """(checkpoints dir, step) from a workdir, a checkpoints dir or a step dir."""
  path = os.path.abspath(path)
  if os.path.isdir(workspace.checkpoint_dir(path)):
    path = workspace.checkpoint_dir(path)
  name = os.path.basename(path.rstrip("/"))
  if re.fullmatch(r"\d+", name) and os.path.isdir(os.path.join(path, STATE_ITEM)):
    return os.path.dirname(path), int(name)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} does not exist")
  step = latest_step(path)
  if step is None:
    raise FileNotFoundError(
        f"{path} is neither a params directory (config.json + params/), a training "
        f"workdir (with {workspace.CHECKPOINTS_DIR}/), a checkpoints directory with a "
        "finished step, nor a step directory")
  return path, step


def export_params(checkpoints: str, step: int | None, out_dir: str,
                  cfg: ml_collections.ConfigDict | None = None) -> str:
  """Writes the params of checkpoint `step` (None = latest) as a params directory.

  `checkpoints` is a workdir or its checkpoints dir; the config defaults to the
  workdir's `config.json`. Beside the params dir's `config.json` and `params/`,
  `export.json` records the source step. Returns `out_dir`.
  """
  ckpt_dir, latest = resolve_checkpoint(checkpoints)
  step = latest if step is None else int(step)
  cfg = workdir_config(ckpt_dir) if cfg is None else cfg
  state_dir = epath.Path(ckpt_dir) / str(step) / STATE_ITEM
  if not state_dir.exists():
    raise FileNotFoundError(f"checkpoint step {step} not found: {state_dir}")
  params = restore_tree(state_dir, key="params")
  save_params(out_dir, params, cfg)
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
  if is_params_dir(path):
    cfg, params = load_params(path, shardings)
    step = None
    info = os.path.join(path, EXPORT_INFO_FILE)
    if os.path.isfile(info):
      with open(info) as f:
        step = json.load(f).get("step")
    return cfg, params, step
  ckpt_dir, step = resolve_checkpoint(path)
  cfg = workdir_config(ckpt_dir)
  params = restore_tree(epath.Path(ckpt_dir) / str(step) / STATE_ITEM, shardings,
                        key="params")
  return cfg, params, step
