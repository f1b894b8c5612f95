"""`m3jax demo`: the whole pipeline on the knowledge world, with its evidence table.

prepare-data -> warmup training -> build-index + mine-neighbors -> continual
training -> encode-memory -> eval (knowledge QA by entity group x memory mode,
perplexity) -> bench decode -> summary.json, plots and the evidence table
(m3jax/demo/pipeline.py). A re-run reuses every finished stage.

  m3jax demo --config=configs/demo.py --workdir=demo_workdir

Also runnable as `python -m m3jax.commands.demo`.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from m3jax import cli
from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.demo import pipeline as demo

CONFIG_FIELDS = ("data.knowledge_world.n_seen", "data.knowledge_world.n_memory_taught",
                 "data.knowledge_world.n_unseen", "model.d_model", "model.n_layers",
                 "data.batch_size", "train.lr")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "demo_workdir", "Where every stage writes.")


def main(argv: list[str]) -> None:
  commands.check_args(argv, _CONFIG)
  cfg = config_lib.validate(_CONFIG.value)
  demo.run_demo(cfg, _WORKDIR.value)


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
