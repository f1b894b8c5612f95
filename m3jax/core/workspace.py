"""Where a run's artifacts live: the one module that knows a workdir's layout.

    <workdir>/
      config.json            the resolved config of a training run (m3jax train)
      checkpoints/<step>/    Orbax training checkpoints
      metrics.jsonl          scalar metrics, one JSON object a line
      tensorboard/           the same scalars as TensorBoard event files
      bank/                  the memory bank (m3jax encode-memory)
      <data.workdir_data>/   prepare-data's output, "data" by default:
        manifest.json        what was prepared, with every stage's settings hash
        index/               the reference index (m3jax build-index)
        neighbors/<split>/   one mined reference per training chunk (m3jax mine-neighbors)

Every command derives its default paths from these functions, so moving an artifact
is a change here and nowhere else. WORKSPACE.md describes each artifact's format.
"""

from __future__ import annotations

import os
from typing import Any

CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
BANK_DIR = "bank"
DATA_MANIFEST = "manifest.json"
INDEX_DIR = "index"
NEIGHBORS_DIR = "neighbors"


def _abspath(path: str) -> str:
  """Absolute local path; URLs (gs://...) are kept as they are (Orbax opens them)."""
  return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def data_root(cfg: Any, workdir: str) -> str:
  """`<workdir>/<data.workdir_data>` (an absolute `data.workdir_data` is used as is)."""
  d = cfg.data.workdir_data
  return _abspath(d if os.path.isabs(d) else os.path.join(workdir, d))


def config_file(workdir: str) -> str:
  return os.path.join(_abspath(workdir), CONFIG_FILE)


def checkpoint_dir(workdir: str) -> str:
  """`<workdir>/checkpoints`: where a training run keeps its steps."""
  return os.path.join(_abspath(workdir), CHECKPOINTS_DIR)


def bank_dir(workdir: str) -> str:
  """`<workdir>/bank`: the memory bank encode-memory writes and eval/generate read."""
  return os.path.join(_abspath(workdir), BANK_DIR)


def index_dir_of_root(root: str) -> str:
  """`<data root>/index`."""
  return os.path.join(_abspath(root), INDEX_DIR)


def index_dir(cfg: Any, workdir: str) -> str:
  """Default place of the reference index: `<data root>/index`."""
  return index_dir_of_root(data_root(cfg, workdir))


def neighbors_dir(root: str, split: str = "train") -> str:
  """Default place of a split's neighbor table: `<data root>/neighbors/<split>`."""
  return os.path.join(_abspath(root), NEIGHBORS_DIR, split)
