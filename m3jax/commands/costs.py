"""`m3jax costs`: parameter, storage and FLOP accounting of a config.

  m3jax costs --config=configs/memory3_2p4b.py [--references=1.12e8] [--uses=1,10,100]

Prints the report of `m3jax.model.cost_report.format_report` (docs/model.md "Cost model").
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from m3jax import cli
from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.model import cost_report
from m3jax.model import costs

CONFIG_FIELDS = ("model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads",
                 "model.n_kv_heads", "model.mlp_dim", "model.memory_layers",
                 "model.memory_heads", "model.memory_tokens_per_head",
                 "model.reference_length")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_REFERENCES = flags.DEFINE_float(
    "references", costs.PAPER_REFERENCES,
    "Number of references in the memory bank (default: the paper's 1.12e8).")
_USES = flags.DEFINE_list(
    "uses", [f"{u:g}" for u in cost_report.DEFAULT_USES],
    "Usage counts n at which to tabulate the implicit / explicit / RAG total cost.")
_BYTES_PER_VECTOR = flags.DEFINE_integer(
    "quantized_bytes_per_vector", costs.QUANTIZED_BYTES_PER_VECTOR,
    "Bytes per key/value vector after vector quantization (paper: 14).")


def _parse_uses(values: list[str]) -> list[float]:
  out = []
  for v in values:
    try:
      n = float(v)
    except ValueError:
      raise app.UsageError(f"--uses: {v!r} is not a number") from None
    if n < 0:
      raise app.UsageError(f"--uses: {v!r} must be >= 0")
    out.append(n)
  return out


def main(argv: list[str]) -> None:
  commands.check_args(argv, _CONFIG)
  if _REFERENCES.value <= 0:
    raise app.UsageError(f"--references must be positive, got {_REFERENCES.value}")
  if _BYTES_PER_VECTOR.value <= 0:
    raise app.UsageError(
        f"--quantized_bytes_per_vector must be positive, got {_BYTES_PER_VECTOR.value}")
  cfg = config_lib.validate(_CONFIG.value)
  report = cost_report.cost_report(config_lib.model_config(cfg), name=cfg.get("name", ""),
                                   references=_REFERENCES.value,
                                   uses=_parse_uses(_USES.value),
                                   bytes_per_vector=_BYTES_PER_VECTOR.value)
  print(cost_report.format_report(report))


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
