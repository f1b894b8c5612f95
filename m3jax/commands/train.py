"""`m3jax train`: warmup or continual training (or sft / dpo); resumes by itself.

  m3jax train --config=configs/demo.py --workdir=runs/demo
  m3jax train --config=configs/demo.py --workdir=runs/demo-c --config.train.stage=continual \\
      --config.train.init_from=runs/demo --config.data.workdir_data=runs/demo/data

The stage comes from the config (`train.stage=warmup|continual|sft|dpo`; sft and
dpo read the datasets of `m3jax prepare-chat`; `train.reader=rag` trains the continual
stage's text-RAG competitor on the same data); a run resumes
from the newest checkpoint in --workdir by itself. Multi-host: see WORKSPACE.md
(`--coordinator_address/--num_processes/--process_id` or the M3JAX_* variables;
automatic on Cloud TPU and SLURM).

Also runnable as `python -m m3jax.commands.train`.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from m3jax import cli
from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.core import distributed

CONFIG_FIELDS = ("train.stage", "train.reader", "train.steps", "train.lr", "train.schedule",
                 "train.warmup_steps", "train.init_from", "data.batch_size",
                 "data.workdir_data", "train.log_every", "train.checkpoint_every",
                 "train.eval_every")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics).",
                               required=True)
_STOP_AFTER = flags.DEFINE_integer("stop_after", None,
                                   "Checkpoint and leave after this many steps of this run.")
_PROGRESS_EVERY_S = flags.DEFINE_float(
    "progress_every_s", 30.0, "Seconds between `train: N/M steps ... ETA` lines (each log "
    "line carries the ETA too).")
distributed.define_distributed_flags()


def main(argv: list[str]) -> None:
  commands.check_args(argv, _CONFIG)
  distributed.initialize_from_flags()
  from m3jax.training import loop as train  # after distributed init: it touches devices
  cfg = config_lib.validate(_CONFIG.value)
  train.train(cfg, _WORKDIR.value, stop_after=_STOP_AFTER.value,
              progress_every_s=_PROGRESS_EVERY_S.value)


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
