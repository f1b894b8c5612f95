"""`m3jax demo --config=configs/demo.py --workdir=demo_workdir`: the whole pipeline.

prepare-data -> warmup training -> build-index + mine-neighbors -> continual
training -> encode-memory -> eval (knowledge QA by entity group x memory mode,
perplexity) -> bench decode -> summary.json, plots and the evidence table
(m3jax/demo/pipeline.py). A re-run reuses every finished stage.

Also runnable as `python -m m3jax.commands.demo`.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.demo import pipeline as demo

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "demo_workdir", "Where every stage writes.")


def main(argv: list[str]) -> None:
  commands.check_args(argv, _CONFIG)
  try:
    cfg = config_lib.validate(_CONFIG.value)
    demo.run_demo(cfg, _WORKDIR.value)
  except (config_lib.ConfigError, demo.DemoError) as e:
    print(f"m3jax demo: error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
