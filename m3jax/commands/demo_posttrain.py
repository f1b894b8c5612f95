"""`m3jax demo-posttrain`: SFT and DPO on the workdir of `m3jax demo`.

  m3jax demo-posttrain --config=configs/demo.py --workdir=demo_workdir

Runs after `m3jax demo` on the same workdir: writes the knowledge world as chats,
prepares the chat and preference datasets (each chunk's reference retrieved from
the prompt), fine-tunes the continual checkpoint (train.stage=sft), aligns it with
DPO (train.stage=dpo), and prints chat exact match per entity group with explicit
memory and without, and held-out preference accuracy before and after DPO
(m3jax/demo/posttrain.py). Also runnable as `python -m m3jax.commands.demo_posttrain`.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

from m3jax import cli
from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.demo import posttrain

CONFIG_FIELDS = ("demo.posttrain", "data.chat_tokens")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "demo_workdir", "The workdir of `m3jax demo`.")


def main(argv: list[str]) -> None:
  commands.check_args(argv, _CONFIG)
  cfg = config_lib.validate(_CONFIG.value)
  posttrain.run_posttrain(cfg, _WORKDIR.value)


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
