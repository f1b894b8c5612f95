"""Codecs of memory key/value vectors: how a bank stores a memory's numbers.

A memory (L_mem, 2, H_mem, k, d_h) is L_mem·2·H_mem·k vectors of d_h numbers. A
*codec* turns each vector into a few bytes and back; the bank stores the bytes and
decodes on lookup, on the CPU, as the paper does (docs/model.md "Quantization", paper Appendix B).

- `BFloat16Codec` ("none"): the vector in bfloat16, 2·d_h bytes (stored as the raw
  uint16 bit patterns, which any numpy reads).
- `Int8Codec` ("int8"): symmetric per-vector int8, q = round(x / s), s = max|x| / 127,
  s in float16: d_h + 2 bytes (about 2x).
- `m3jax.memory.pq.ProductQuantizer` ("pq"): learned product quantization.
`make_codec` picks one by the bank's `quantization` setting.
"""

from __future__ import annotations

import abc
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.core import errors

METHODS = ("none", "int8", "pq")
GROUPINGS = ("shared", "kv", "layer_kv", "layer_kv_head")

MemoryShape = tuple[int, int, int, int, int]


class QuantizerError(errors.UserError, ValueError):
  """A quantizer file or setting does not fit the bank; the message says which."""


def relative_mse(x: Any, y: Any) -> float:
  """sum((x - y)^2) / sum(x^2) in float64 (0 for identical arrays)."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  den = float(np.sum(x * x))
  return float(np.sum((x - y) ** 2)) / den if den > 0 else 0.0


def check_memories(memories: Any, memory_shape: Sequence[int]) -> None:
  if tuple(memories.shape[1:]) != tuple(memory_shape):
    raise ValueError(f"memories have shape {tuple(memories.shape)}; expected "
                     f"[n, {', '.join(map(str, memory_shape))}]")


class MemoryCodec(abc.ABC):
  """Stores memories as record fields and decodes them (see module docstring)."""

  method: str
  memory_shape: MemoryShape

  @property
  def n_vectors(self) -> int:
    """Key/value vectors per memory: L_mem·2·H_mem·k."""
    l, two, h, k, _ = self.memory_shape
    return l * two * h * k

  @property
  @abc.abstractmethod
  def bytes_per_vector(self) -> int:
    """Stored bytes per d_h-dim vector."""

  @property
  def bytes_per_memory(self) -> int:
    """Stored key/value bytes per memory (positions not included)."""
    return self.n_vectors * self.bytes_per_vector

  @property
  def compression(self) -> float:
    """bfloat16 bytes / stored bytes per vector."""
    return 2 * self.memory_shape[-1] / self.bytes_per_vector

  @abc.abstractmethod
  def fields(self) -> list[tuple[str, str, tuple[int, ...]]]:
    """The record fields (name, numpy dtype string, per-memory shape) this codec stores."""

  @abc.abstractmethod
  def encode(self, memories: Any) -> dict[str, np.ndarray]:
    """memories [n, L, 2, H, k, d] (any float) -> {field: array [n, ...]}."""

  @abc.abstractmethod
  def decode(self, records: Any) -> np.ndarray:
    """Record fields (a structured array or dict) [n] -> memories [n, L, 2, H, k, d]."""

  def describe(self) -> dict[str, Any]:
    """JSON-able settings for the bank manifest."""
    return dict(method=self.method, bytes_per_vector=self.bytes_per_vector,
                bytes_per_memory=self.bytes_per_memory,
                compression_vs_bfloat16=round(self.compression, 4))

  def round_trip(self, memories: Any) -> np.ndarray:
    """decode(encode(memories)) as float32: what a bank with this codec returns."""
    return np.asarray(self.decode(self.encode(memories)), np.float32)


class BFloat16Codec(MemoryCodec):
  """Keys/values in bfloat16, stored as uint16 bit patterns (field `kv`)."""

  method = "none"

  def __init__(self, memory_shape: Sequence[int]):
    self.memory_shape = tuple(memory_shape)

  @property
  def bytes_per_vector(self) -> int:
    return 2 * self.memory_shape[-1]

  def fields(self):
    return [("kv", "<u2", self.memory_shape)]

  def encode(self, memories):
    check_memories(memories, self.memory_shape)
    bf = np.asarray(jax.device_get(jnp.asarray(memories).astype(jnp.bfloat16)))
    return {"kv": bf.view(np.uint16)}

  def decode(self, records):
    return np.asarray(records["kv"]).view(jnp.bfloat16)


class Int8Codec(MemoryCodec):
  """Symmetric per-vector int8 (field `kv_int8`) with a float16 scale (`kv_scale`)."""

  method = "int8"

  def __init__(self, memory_shape: Sequence[int]):
    self.memory_shape = tuple(memory_shape)
    self._encode = jax.jit(_int8_encode)

  @property
  def bytes_per_vector(self) -> int:
    return self.memory_shape[-1] + 2

  def fields(self):
    return [("kv_int8", "i1", self.memory_shape), ("kv_scale", "<f2", self.memory_shape[:-1])]

  def encode(self, memories):
    check_memories(memories, self.memory_shape)
    q, scale = jax.device_get(self._encode(jnp.asarray(memories)))
    if not np.all(np.isfinite(scale)):
      raise QuantizerError("int8 quantization: a vector's max |x| / 127 overflows float16 "
                           "(|x| > 8.3e6); use quantization=none or pq")
    return {"kv_int8": np.asarray(q), "kv_scale": np.asarray(scale)}

  def decode(self, records):
    q = np.asarray(records["kv_int8"], np.float32)
    return q * np.asarray(records["kv_scale"], np.float32)[..., None]


def _int8_encode(x):
  # The bank holds bfloat16-rounded values; quantize exactly those.
  x = x.astype(jnp.bfloat16).astype(jnp.float32)
  amax = jnp.max(jnp.abs(x), axis=-1)
  scale = (amax / 127.0).astype(jnp.float16)
  s32 = scale.astype(jnp.float32)
  q = jnp.where(s32[..., None] > 0, jnp.round(x / jnp.where(s32 > 0, s32, 1.0)[..., None]), 0)
  return jnp.clip(q, -127, 127).astype(jnp.int8), scale


# ------------------------------------------------------------------ codecs by name


def make_codec(method: str, memory_shape: Sequence[int],
               quantizer: MemoryCodec | None = None) -> MemoryCodec:
  """The codec for a bank's `quantization` setting (pq needs its trained
  m3jax.memory.pq.ProductQuantizer)."""
  if method == "none":
    return BFloat16Codec(memory_shape)
  if method == "int8":
    return Int8Codec(memory_shape)
  if method == "pq":
    if quantizer is None:
      raise QuantizerError("quantization=pq needs a trained quantizer")
    if tuple(quantizer.memory_shape) != tuple(memory_shape):
      raise QuantizerError(f"PQ quantizer was trained for memories {quantizer.memory_shape}, "
                           f"the model's are {tuple(memory_shape)}")
    return quantizer
  raise QuantizerError(f"bank.quantization: unknown method {method!r}; one of {METHODS}")
