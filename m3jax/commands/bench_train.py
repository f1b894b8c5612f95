"""`m3jax bench train`: warmup vs continual training-step throughput (tokens/s), MFU and
compiled memory.

  m3jax bench train --config=configs/demo.py [--steps=5] [--json=FILE]

Random parameters and batches of the configured model and batch size; nothing is
read from disk. Also runnable as `python -m m3jax.commands.bench_train`.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from m3jax import cli
from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.bench import train as bench_train

CONFIG_FIELDS = ("model.d_model", "model.n_layers", "model.max_seq_len", "model.dtype",
                 "model.remat_policy", "data.batch_size", "mesh.data", "mesh.fsdp",
                 "mesh.tensor", "train.peak_flops_per_device")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per stage (after one warm-up step).")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")


def main(argv: list[str]) -> None:
  commands.check_args(argv, _CONFIG)
  cfg = config_lib.validate(_CONFIG.value)
  result = bench_train.run(cfg, steps=_STEPS.value)
  print(bench_train.format_result(result))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
