"""Saving and loading a bare parameter tree with the config that built it.

A *params directory* holds `config.json` (the full resolved config) and `params/`
(an Orbax checkpoint of the float32 parameter tree). `m3jax convert` writes one;
training checkpoints (see `m3jax.training.checkpoint`) can be exported to one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from m3jax.core import config as config_lib

CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


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


def load_params(path: str, shardings: Any = None) -> tuple[ml_collections.ConfigDict, Any]:
  """Reads a params directory; returns (config, params).

  With `shardings` (a pytree of `jax.sharding.Sharding` matching the params),
  arrays are restored directly into that layout.
  """
  path = os.path.abspath(path)
  cfg_path = os.path.join(path, CONFIG_FILE)
  target = os.path.join(path, PARAMS_DIR)
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"{cfg_path} not found: {path} is not an m3jax params directory")
  if not os.path.isdir(target):
    raise FileNotFoundError(f"{target} not found: {path} holds no parameters")
  cfg = config_lib.config_from_json(cfg_path)
  ckpt = ocp.StandardCheckpointer()
  if shardings is None:
    params = ckpt.restore(target)
  else:
    meta = ckpt.metadata(target)
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)  # orbax TreeMetadata wraps the nested dict
    abstract = jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree, shardings)
    params = ckpt.restore(target, abstract)
  return cfg, params
