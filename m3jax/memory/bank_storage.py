"""Bank storage accounting: the bytes of a finished bank next to m3jax.model.costs."""

from __future__ import annotations

import os
from typing import Any

from m3jax.core.config import ModelConfig
from m3jax.memory import bank_format
from m3jax.model import costs
from m3jax.model.cost_report import format_bytes


def storage_summary(root: str, config: ModelConfig) -> dict[str, Any]:
  """Bytes of a finished bank next to the m3jax.model.costs formulas (which they must match)."""
  manifest = bank_format.read_json(os.path.join(root, bank_format.MANIFEST_FILE))
  storage = manifest["storage"]
  method = storage["method"]
  record = manifest["layout"]["record_bytes"]
  kv = storage["bytes_per_memory"]
  if method == "none":
    expected_kv = costs.memory_bytes_per_reference(config)
  else:
    expected_kv = costs.quantized_memory_bytes_per_reference(config,
                                                              storage["bytes_per_vector"])
  if expected_kv != kv:
    raise AssertionError(f"bank stores {kv} key/value bytes per memory, m3jax.model.costs says "
                         f"{expected_kv}")
  n = manifest["references"]["count"]
  bf16 = costs.memory_bytes_per_reference(config)
  dense = costs.dense_kv_bytes_per_reference(config)
  return dict(references=n, shards=manifest["totals"]["shards"],
              bank_bytes=manifest["totals"]["bytes"], record_bytes=record,
              kv_bytes_per_memory=kv, positions_bytes_per_memory=record - kv,
              bfloat16_kv_bytes_per_memory=bf16, dense_kv_bytes_per_reference=dense,
              compression_vs_dense=dense / kv, quantization=method,
              kv_bytes_total=kv * n,
              paper_scale_bytes=record * costs.PAPER_REFERENCES)


def storage_report(root: str, config: ModelConfig) -> str:
  s = storage_summary(root, config)
  fb = format_bytes
  formula = ("memory_bytes_per_reference" if s["quantization"] == "none" else
             "quantized_memory_bytes_per_reference")
  return "\n".join([
      f"storage: {s['references']:,} memories in {s['shards']} shards: "
      f"{fb(s['bank_bytes'])} on disk ({s['bank_bytes']:,} B)",
      f"  per memory: {s['record_bytes']:,} B = {s['kv_bytes_per_memory']:,} B keys/values "
      f"({s['quantization']}; m3jax.model.costs: {formula}) "
      f"+ {s['positions_bytes_per_memory']} B positions",
      f"  vs dense KV of a reference ({fb(s['dense_kv_bytes_per_reference'])}): "
      f"{s['compression_vs_dense']:,.0f}x smaller; bfloat16 sparse memory "
      f"{s['bfloat16_kv_bytes_per_memory']:,} B",
      f"  keys/values of all memories: {fb(s['kv_bytes_total'])}; at the paper's "
      f"{costs.PAPER_REFERENCES:.3g} references this record size would need "
      f"{fb(s['paper_scale_bytes'])}",
  ])
