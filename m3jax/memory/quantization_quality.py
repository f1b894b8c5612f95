"""How much quantization costs: sizes, reconstruction error, and evaluation loss.

`quantization_report` measures bytes per vector / memory, the compression ratio
against bfloat16 and the relative MSE; `evaluate_quantization` runs a caller's
evaluation-loss function with bfloat16 and with quantized memories.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.memory.codecs import BFloat16Codec, MemoryCodec, relative_mse
from m3jax.memory.source import MemorySource


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
  method: str
  bytes_per_vector: int
  bytes_per_memory: int  # key/value bytes (positions not included)
  bfloat16_bytes_per_memory: int
  compression: float  # vs bfloat16
  relative_mse: float  # over all vectors
  relative_mse_keys: float
  relative_mse_values: float

  def line(self) -> str:
    return (f"{self.method}: {self.bytes_per_vector} B/vector, {self.bytes_per_memory:,} B/memory "
            f"(bf16 {self.bfloat16_bytes_per_memory:,} B), {self.compression:.2f}x, "
            f"relative MSE {self.relative_mse:.4g} (keys {self.relative_mse_keys:.4g}, "
            f"values {self.relative_mse_values:.4g})")


def quantization_report(codec: MemoryCodec, memories: Any) -> QuantizationReport:
  """Sizes and reconstruction error of `codec` on memories [n, L, 2, H, k, d].

  The error is measured against the bfloat16-rounded memories (what an
  unquantized bank holds), over non-empty slots (all-zero vectors are skipped).
  """
  x = np.asarray(jax.device_get(jnp.asarray(memories).astype(jnp.bfloat16)), np.float32)
  y = codec.round_trip(x)
  # Empty slots (all-zero vectors of short references) are masked at attention time.
  valid = np.any(x != 0, axis=-1, keepdims=True)
  x, y = x * valid, y * valid
  return QuantizationReport(
      codec.method, codec.bytes_per_vector, codec.bytes_per_memory,
      BFloat16Codec(codec.memory_shape).bytes_per_memory, codec.compression,
      relative_mse(x, y), relative_mse(x[:, :, 0], y[:, :, 0]),
      relative_mse(x[:, :, 1], y[:, :, 1]))


class QuantizedSource(MemorySource):
  """Another source's memories after an encode/decode round trip through `codec`."""

  def __init__(self, source: MemorySource, codec: MemoryCodec):
    self.source, self.codec = source, codec
    self.memory_shape = source.memory_shape

  def lookup(self, ref_ids):
    mem, mask = self.source.lookup(ref_ids)
    out = self.codec.round_trip(mem)
    return out.astype(np.asarray(mem[:0]).dtype), mask

  def prefetch(self, ref_ids):
    self.source.prefetch(ref_ids)

  def stats(self):
    return self.source.stats()


def evaluate_quantization(loss_fn: Callable[[MemorySource], float], source: MemorySource,
                          codec: MemoryCodec, *, sample_ids: Any = None) -> dict[str, Any]:
  """Evaluation loss with `source`'s (bfloat16) memories and with them quantized.

  `loss_fn(memory_source) -> float` runs the caller's evaluation (e.g. the
  evaluator's perplexity over a fixed set of sequences) reading memories from the
  given source. `sample_ids` (optional ref ids) adds the reconstruction error on
  those memories. Returns losses, their difference and the codec's sizes.
  """
  base = float(loss_fn(source))
  quant = float(loss_fn(QuantizedSource(source, codec)))
  out = dict(method=codec.method, loss_bfloat16=base, loss_quantized=quant,
             loss_delta=quant - base, bytes_per_vector=codec.bytes_per_vector,
             bytes_per_memory=codec.bytes_per_memory, compression=codec.compression)
  if sample_ids is not None:
    mem, _ = source.lookup(np.asarray(sample_ids, np.int64))
    out["relative_mse"] = quantization_report(codec, mem).relative_mse
  return out
