"""`m3jax build-index`: embed every reference and build the ScaNN index.

  m3jax build-index --config=configs/demo.py --workdir=runs/demo [--params=DIR]

Reads the references and tokenizer of `<workdir>/data` (`m3jax prepare-data`),
fits the embedder that `data.embedder` names on the reference texts, and writes
`<workdir>/data/index/` (see `m3jax.retrieval.index`): the searcher, the ref_id map, the
embedder state and a manifest. `data.embedder=model` needs `--params` (a params
directory of the trained model). Re-running with the same inputs reuses the index;
other inputs are refused unless `--overwrite`.
"""

from __future__ import annotations

import json
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from m3jax import cli
from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.retrieval import index as index_lib
from m3jax.retrieval import reference_index

CONFIG_FIELDS = ("data.workdir_data", "data.embedder", "data.embed_dim",
                 "data.embed_model_layer")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding data/ (prepare-data).")
_PARAMS = flags.DEFINE_string("params", None,
                              "Params directory of the model (only for data.embedder=model).")
_OUT = flags.DEFINE_string("out", None, "Index directory (default <workdir>/data/index).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an index built from other inputs.")
_BRUTE_FORCE_BELOW = flags.DEFINE_integer(
    "brute_force_below", 20_000, "Exact search below this many references; tree+AH above.")
_TARGET_RECALL = flags.DEFINE_float(
    "target_recall", index_lib.IndexSettings.target_recall,
    "Tree index: recall@5 the build tunes leaves searched and re-ranking for (0 = fixed).")


def main(argv: list[str]) -> None:
  commands.check_args(argv, _CONFIG, _WORKDIR)
  cfg = config_lib.validate(_CONFIG.value)
  if not 0 <= _TARGET_RECALL.value <= 1:
    raise app.UsageError(f"--target_recall={_TARGET_RECALL.value} is not in [0, 1]")
  index = reference_index.build_reference_index(
      cfg, _WORKDIR.value, params_dir=_PARAMS.value, out=_OUT.value,
      overwrite=_OVERWRITE.value,
      settings=index_lib.IndexSettings(brute_force_below=_BRUTE_FORCE_BELOW.value,
                                       target_recall=_TARGET_RECALL.value))
  print(json.dumps(dict(index=index.path, references=index.count, dim=index.dim,
                        mode=index.settings["mode"], embedder=index.fingerprint), indent=2))


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
