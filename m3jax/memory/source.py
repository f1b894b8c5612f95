"""Where memories come from at inference: the `MemorySource` interface.

The generator and evaluator ask one question, "the memories of these ref ids":

    memories, token_mask = source.lookup(ref_ids)   # ref_ids int64 [n], -1 = none
    memories   [n, L_mem, 2, H_mem, k, d_h]          (numpy or jax)
    token_mask [n, L_mem, H_mem, k] bool             (False: empty slot / id -1)

Id -1 gives zeros and an all-False mask. Implementations:

- `EncodeOnTheFly(model, params, reference_store)`: runs `Transformer.encode_references`
  (m3jax.memory.encoder) for every lookup (what continual training does inside its step).
- `m3jax.memory.bank_reader.MemoryBank`: the precomputed bank on disk (warm start), with a
  RAM LRU cache, optional prefetch and checksums.
- `m3jax.memory.cold_start.ColdStartBank`: encodes a reference the first time it is retrieved,
  stores it in the bank layout and reuses it afterwards.

`ArrayReferenceStore` is the smallest reference store (tokens held in arrays), for
tests and for references that never went through `m3jax prepare-data`; the real one
is `data_pipeline.references.ReferenceStore`. Both answer `tokens_by_ids(ids) ->
(tokens [n, R] int32 right-padded, lengths [n])` and carry `tokenizer_hash`.
"""

from __future__ import annotations

import abc
import collections
import threading
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.core.config import ModelConfig
from m3jax.memory.encoder import encode_references


class ReferenceSource(Protocol):
  """What the encoders read: references by id (see data_pipeline.references)."""
  tokenizer_hash: str
  reference_length: int

  def __len__(self) -> int: ...

  def tokens_by_ids(self, ids: Any) -> tuple[np.ndarray, np.ndarray]: ...


def check_ref_ids(ref_ids: Any, n_references: int | None = None) -> np.ndarray:
  """ref_ids as a 1-D int64 array; raises on ids < -1 or >= n_references."""
  ids = np.asarray(ref_ids)
  if ids.ndim != 1:
    raise ValueError(f"ref_ids must be 1-D, got shape {ids.shape}")
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"ref_ids must be integers, got dtype {ids.dtype}")
  ids = ids.astype(np.int64)
  bad = ids[(ids < -1) | ((ids >= n_references) if n_references is not None else False)]
  if bad.size:
    hi = f", {n_references})" if n_references is not None else ", inf)"
    raise IndexError(f"ref_id {int(bad[0])} out of range [-1{hi}")
  return ids


class MemorySource(abc.ABC):
  """Memories by reference id (see module docstring)."""

  memory_shape: tuple[int, int, int, int, int]  # (L_mem, 2, H_mem, k, d_h)

  @abc.abstractmethod
  def lookup(self, ref_ids: np.ndarray) -> tuple[Any, Any]:
    """(memories [n, L_mem, 2, H_mem, k, d_h], token_mask [n, L_mem, H_mem, k])."""

  def prefetch(self, ref_ids: np.ndarray) -> None:
    """Hint: these ids will be looked up soon (no-op unless the source can load ahead)."""
    del ref_ids

  def stats(self) -> dict[str, Any]:
    """Counters (cache hits, encoded references, ...); empty when the source keeps none."""
    return {}

  def close(self) -> None:
    """Releases threads and files."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ------------------------------------------------------------------ LRU cache


class LRUCache:
  """A fixed-capacity least-recently-used map ref_id -> value, with counters.

  Capacity counts memories; 0 turns the cache off (every get misses, nothing is
  kept). `get` counts a hit or a miss; `peek`/`put` count nothing, so background
  loads (prefetch) do not distort the hit rate. Thread-safe.
  """

  def __init__(self, capacity: int):
    if capacity < 0:
      raise ValueError(f"cache capacity must be >= 0, got {capacity}")
    self.capacity = int(capacity)
    self._data: collections.OrderedDict[int, Any] = collections.OrderedDict()
    self._lock = threading.Lock()
    self.hits = 0
    self.misses = 0
    self.evictions = 0

  def __len__(self) -> int:
    return len(self._data)

  def __contains__(self, key: int) -> bool:
    with self._lock:
      return key in self._data

  def get(self, key: int) -> Any | None:
    """The value (and marks it most recently used), or None; counts a hit or a miss."""
    with self._lock:
      if key in self._data:
        self._data.move_to_end(key)
        self.hits += 1
        return self._data[key]
      self.misses += 1
      return None

  def peek(self, key: int) -> Any | None:
    """The value or None, without counting or reordering."""
    with self._lock:
      return self._data.get(key)

  def put(self, key: int, value: Any) -> None:
    if self.capacity == 0:
      return
    with self._lock:
      self._data[key] = value
      self._data.move_to_end(key)
      while len(self._data) > self.capacity:
        self._data.popitem(last=False)
        self.evictions += 1

  def clear(self) -> None:
    with self._lock:
      self._data.clear()

  def reset_stats(self) -> None:
    with self._lock:
      self.hits = self.misses = self.evictions = 0

  def stats(self) -> dict[str, Any]:
    with self._lock:
      total = self.hits + self.misses
      return dict(capacity=self.capacity, size=len(self._data), hits=self.hits,
                  misses=self.misses, evictions=self.evictions,
                  hit_rate=self.hits / total if total else 0.0)


# ------------------------------------------------------------------ references in arrays


class ArrayReferenceStore:
  """References held in arrays: tokens [N, R] int32 (right-padded), lengths [N]."""

  def __init__(self, tokens: np.ndarray, lengths: np.ndarray, *, tokenizer_hash: str = "",
               pad_id: int = 0):
    tokens = np.asarray(tokens, np.int32)
    lengths = np.asarray(lengths, np.int32)
    if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
      raise ValueError(f"tokens {tokens.shape} / lengths {lengths.shape}: expected [N, R] / [N]")
    if lengths.size and (lengths.min() < 0 or lengths.max() > tokens.shape[1]):
      raise ValueError(f"lengths must lie in [0, {tokens.shape[1]}]")
    self.tokens, self.lengths = tokens, lengths
    self.tokenizer_hash = tokenizer_hash
    self.reference_length = tokens.shape[1]
    self.pad_id = pad_id
    self.path = ""

  def __len__(self) -> int:
    return self.tokens.shape[0]

  def tokens_by_ids(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids, np.int64)
    flat = ids.reshape(-1)
    bad = flat[(flat < -1) | (flat >= len(self))]
    if bad.size:
      raise IndexError(f"ref_id {int(bad[0])} out of range [-1, {len(self)})")
    safe = np.maximum(flat, 0)
    toks = np.where((flat >= 0)[:, None], self.tokens[safe], self.pad_id).astype(np.int32)
    lens = np.where(flat >= 0, self.lengths[safe], 0).astype(np.int32)
    return toks.reshape(ids.shape + (self.reference_length,)), lens.reshape(ids.shape)

  @classmethod
  def random(cls, n: int, reference_length: int, vocab_size: int, *, seed: int = 0,
             min_length: int = 1, first_token: int = 5, tokenizer_hash: str = "random"
             ) -> "ArrayReferenceStore":
    """n random references of random lengths in [min_length, R] (tests, benchmarks)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_length, reference_length + 1, size=n).astype(np.int32)
    tokens = rng.integers(first_token, vocab_size, size=(n, reference_length)).astype(np.int32)
    tokens[np.arange(reference_length)[None, :] >= lengths[:, None]] = 0
    return cls(tokens, lengths, tokenizer_hash=tokenizer_hash)


# ------------------------------------------------------------------ encode on the fly


def pow2_at_least(n: int, minimum: int = 1) -> int:
  """Next power of two >= max(n, minimum): few distinct shapes, few recompilations."""
  b = max(1, minimum)
  while b < n:
    b *= 2
  return b


class EncodeOnTheFly(MemorySource):
  """Encodes the references of every lookup with `Transformer.encode_references`.

  Ids are deduplicated and padded to a power-of-two bucket (at least `min_batch`)
  so the jitted encoder compiles once per bucket size. Results stay on device as
  jax arrays in the model's compute dtype, or rounded to bfloat16 with
  `round_to_bfloat16=True` (what a bank stores, so both sources agree).
  """

  def __init__(self, model: Any, params: Any, reference_store: ReferenceSource, *,
               round_to_bfloat16: bool = False, min_batch: int = 8):
    config: ModelConfig = model.config
    if config.n_memory_layers == 0:
      raise ValueError("EncodeOnTheFly: model.memory_layers is empty (no memory to encode)")
    if reference_store.reference_length > config.reference_length:
      raise ValueError(f"reference store holds {reference_store.reference_length}-token "
                       f"references > model.reference_length={config.reference_length}")
    self.model, self.params, self.references = model, params, reference_store
    self.memory_shape = config.memory_shape
    self.min_batch = min_batch
    self.encoded = 0
    self.lookups = 0
    round_bf16 = round_to_bfloat16

    def encode(p, tokens, lengths, inverse):
      mem, pos = encode_references(model, p, tokens, lengths, round_to_bfloat16=round_bf16)
      return mem[inverse], pos[inverse] >= 0

    self._encode = jax.jit(encode)

  def lookup(self, ref_ids: np.ndarray) -> tuple[jax.Array, jax.Array]:
    ids = check_ref_ids(ref_ids, len(self.references))
    unique, inverse = np.unique(ids, return_inverse=True)
    n = pow2_at_least(len(unique), self.min_batch)
    padded = np.full(n, -1, np.int64)
    padded[:len(unique)] = unique
    tokens, lengths = self.references.tokens_by_ids(padded)
    self.lookups += 1
    self.encoded += int((unique >= 0).sum())
    return self._encode(self.params, tokens, lengths, inverse.astype(np.int32))

  def stats(self) -> dict[str, Any]:
    return dict(lookups=self.lookups, encoded=self.encoded)


def empty_memories(n: int, memory_shape: Sequence[int], dtype: Any = jnp.bfloat16
                   ) -> tuple[np.ndarray, np.ndarray]:
  """n zero memories and all-False masks (what id -1 looks up to)."""
  l, _, h, k, _ = memory_shape
  return np.zeros((n,) + tuple(memory_shape), dtype), np.zeros((n, l, h, k), bool)

