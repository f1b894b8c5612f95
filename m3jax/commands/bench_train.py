"""`m3jax bench train --config=...`: warmup vs continual step throughput, MFU and compiled memory."""

from __future__ import annotations

import json

from absl import app
from absl import flags
from ml_collections import config_flags

from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.bench import train as bench_train

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
  app.run(main)
