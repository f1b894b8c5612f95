"""`m3jax mine-neighbors`: one reference per training chunk, with the overlap filter.

  m3jax mine-neighbors --config=configs/demo.py --workdir=runs/demo [--split=train]

Needs `m3jax prepare-data` and `m3jax build-index` first. Writes the neighbor table
of the packed split to `<workdir>/data/neighbors/<split>/` (see
`m3jax.retrieval.neighbors`): numbered int32 shards plus a manifest. Killed and
rerun, it finishes the missing shards and produces byte-identical files. Several
processes share the work with --process_index/--process_count (default: the
M3JAX_PROCESS_ID / M3JAX_NUM_PROCESSES environment, else 0 of 1).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from m3jax import cli
from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.retrieval import neighbors

CONFIG_FIELDS = ("data.neighbors_per_chunk", "data.neighbor_candidates",
                 "data.train_overlap_threshold", "data.exclude_same_doc",
                 "data.neighbor_shard_size", "data.embedder")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding data/ (prepare-data).")
_SPLIT = flags.DEFINE_string("split", "train", "Packed split to mine (train or validation).")
_PARAMS = flags.DEFINE_string("params", None,
                              "Params directory of the model (only for data.embedder=model).")
_INDEX = flags.DEFINE_string("index", None, "Index directory (default <workdir>/data/index).")
_OUT = flags.DEFINE_string("out", None,
                           "Table directory (default <workdir>/data/neighbors/<split>).")
_PROCESS_INDEX = flags.DEFINE_integer(
    "process_index", int(os.environ.get("M3JAX_PROCESS_ID", 0)), "This process's index.")
_PROCESS_COUNT = flags.DEFINE_integer(
    "process_count", int(os.environ.get("M3JAX_NUM_PROCESSES", 1)), "Number of processes.")
_MAX_SHARDS = flags.DEFINE_integer("max_shards", None,
                                   "Stop after this many new shards (a partial run).")


def main(argv: list[str]) -> None:
  commands.check_args(argv, _CONFIG, _WORKDIR)
  if not 0 <= _PROCESS_INDEX.value < _PROCESS_COUNT.value:
    raise app.UsageError(f"--process_index={_PROCESS_INDEX.value} is not in "
                         f"[0, --process_count={_PROCESS_COUNT.value})")
  cfg = config_lib.validate(_CONFIG.value)
  manifest = neighbors.mine_workdir(
      cfg, _WORKDIR.value, split=_SPLIT.value, params_dir=_PARAMS.value,
      index_path=_INDEX.value, out=_OUT.value, process_index=_PROCESS_INDEX.value,
      process_count=_PROCESS_COUNT.value, max_shards=_MAX_SHARDS.value)
  print(json.dumps(dict(sequences=manifest["n_sequences"], shards=manifest["n_shards"],
                        chunks_per_sequence=manifest["chunks_per_sequence"],
                        embedder=manifest["inputs"]["embedder"]), indent=2))


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
