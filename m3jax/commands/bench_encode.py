"""`m3jax bench encode`: reference-encoding vs full-forward throughput (m3jax.bench.encode).

  m3jax bench encode --config=configs/demo.py [--batch_size=16] [--repeats=5] [--json=FILE]
      [--quantization_sample=2048]

Random parameters and tokens; nothing is read from disk. Also runnable as
`python -m m3jax.commands.bench_encode`.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from m3jax import cli
from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.bench import encode as bench_encode

CONFIG_FIELDS = ("model.d_model", "model.n_layers", "model.memory_layers",
                 "model.memory_tokens_per_head", "model.reference_length", "model.dtype",
                 "bank.quantization", "bank.pq_subvectors")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "References per encode step (and sequences "
                              "per forward step); a multiple of the local device count.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs of each side (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs first (the first one compiles).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random parameters and tokens.")
_QUANT_SAMPLE = flags.DEFINE_integer(
    "quantization_sample", 0, "Also report int8/PQ (cfg.bank) bytes and error on this many "
    "random references (0 = skip).")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")


def main(argv: list[str]) -> None:
  commands.check_args(argv, _CONFIG)
  cfg = config_lib.validate(_CONFIG.value)
  result = bench_encode.run(cfg, batch_size=_BATCH.value, repeats=_REPEATS.value,
                            warmup=_WARMUP.value, seed=_SEED.value)
  if _QUANT_SAMPLE.value > 0:
    result["quantization"] = bench_encode.quantization(
        cfg, n_references=_QUANT_SAMPLE.value, seed=_SEED.value)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
