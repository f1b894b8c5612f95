"""`m3jax train --config=configs/X.py --workdir=DIR`: both training stages.

The stage comes from the config (`train.stage=warmup|continual`); a run resumes
from the newest checkpoint in --workdir by itself. Multi-host: see WORKSPACE.md
(`--coordinator_address/--num_processes/--process_id` or the M3JAX_* variables;
automatic on Cloud TPU and SLURM).

Also runnable as `python -m m3jax.commands.train`.
"""

from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags

from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.core import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).",
                               required=True)
_STOP_AFTER = flags.DEFINE_integer("stop_after", None,
                                   "Checkpoint and leave after this many steps of this run.")
distributed.define_distributed_flags()


def main(argv: list[str]) -> None:
  commands.check_args(argv, _CONFIG)
  distributed.initialize_from_flags()
  from m3jax.training import loop as train  # after distributed init: it touches devices
  cfg = config_lib.validate(_CONFIG.value)
  train.train(cfg, _WORKDIR.value, stop_after=_STOP_AFTER.value)


if __name__ == "__main__":
  app.run(main)
