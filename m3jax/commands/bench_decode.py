"""`m3jax bench decode`: tokens/s with explicit memory vs no memory vs text RAG (Table 21).

  m3jax bench decode --config=configs/demo.py [--batch=32] [--prompt_len=128]
      [--new_tokens=128] [--runs=9] [--modes=none,explicit,rag] [--bank_dir=DIR]
      [--json=FILE]

The paper's protocol (m3jax.bench.decode): random parameters of the configured
size, 3 retrievals per explicit-memory run from a memory bank on disk with its RAM
cache off and never-repeated reference ids, the first run discarded and the rest
averaged. --bank_dir keeps the encoded bench bank between invocations (it is
re-used when present; by default a temporary one is built and deleted). Also
runnable as `python -m m3jax.commands.bench_decode`.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from m3jax import cli
from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.bench import decode as bench_decode

CONFIG_FIELDS = ("model.d_model", "model.n_layers", "model.memory_layers", "model.dtype",
                 "bank.quantization", "bank.cache_memories")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_BATCH = flags.DEFINE_integer("batch", 32, "Sequences per run.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Input tokens per sequence (with <s>).")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Generated tokens per sequence.")
_RUNS = flags.DEFINE_integer("runs", 9, "Runs per mode; the first is discarded.")
_MODES = flags.DEFINE_list("modes", ["none", "explicit", "rag"], "Modes to measure.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of parameters, prompts and references.")
_BANK_DIR = flags.DEFINE_string("bank_dir", None, "Keep/reuse the bench bank here.")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")


def main(argv: list[str]) -> None:
  commands.check_args(argv, _CONFIG)
  cfg = config_lib.validate(_CONFIG.value)
  result = bench_decode.run(cfg, batch=_BATCH.value, prompt_len=_PROMPT_LEN.value,
                            new_tokens=_NEW.value, runs=_RUNS.value, modes=_MODES.value,
                            seed=_SEED.value, bank_dir=_BANK_DIR.value)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
