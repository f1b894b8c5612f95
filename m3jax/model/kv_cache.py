"""The key-value cache for incremental decoding, and the arithmetic around it.

Layout: one preallocated array per layer for K and for V, each [B, S, H_kv, d]
with S = prefix_length + max_length slots (static shapes, so
`Transformer.prefill` / `Transformer.decode_step` jit once). Per-layer arrays
(not one stacked array) let a decode step write its slot in place: a stacked
cache made XLA copy a whole layer per step, which grew with the cache size. With the
memory prefix on, slots [0, P) hold the `<s>Reference:` prefix (rotary positions
0..P-1) and context token i sits in slot P + i at rotary position
`context_offset + i`; with it off, token i sits in slot i at position i.
`length` [B] counts the context tokens written per sequence, so a batch may hold
prompts of different lengths (prefill right-padded prompts with their lengths).

Memories are NOT in the cache: they change every chunk, so the caller passes the
current chunk's memories to each step (`chunk_of_next_token` says which chunk).
Keys are cached after rotary embedding; memory keys need none (stored rotated).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from m3jax.core.config import ModelConfig
from m3jax.model.dtypes import JNP_DTYPES

# Logical axis names of each layer's cache array (mapped to mesh axes by the rules table).
CACHE_AXES = ("batch", "length", "kv_heads", "head_dim")


@struct.dataclass
class KVCache:
  """Preallocated KV cache (a pytree; `prefix_length` is static)."""
  k: tuple[jax.Array, ...]  # per layer [B, S, H_kv, d], keys after rotary embedding
  v: tuple[jax.Array, ...]  # per layer [B, S, H_kv, d]
  length: jax.Array  # [B] int32, context tokens written (prefix not counted)
  prefix_length: int = struct.field(pytree_node=False, default=0)

  @property
  def slots(self) -> int:
    return self.k[0].shape[1]

  @property
  def max_length(self) -> int:
    """Context tokens the cache can hold per sequence."""
    return self.slots - self.prefix_length


def init_cache(config: ModelConfig, batch_size: int, max_length: int, *, with_prefix: bool,
               dtype: str | None = None) -> KVCache:
  """An empty cache for `max_length` context tokens (prefix slots added when on).

  with_prefix must be True to decode with memories (the prefix is the attention
  sink memories need, and it moves the context to `config.context_offset`).
  dtype defaults to the model's compute dtype.
  """
  if max_length <= 0 or batch_size <= 0:
    raise ValueError(f"init_cache: batch_size={batch_size} and max_length={max_length} "
                     f"must be positive")
  p = config.prefix_length if with_prefix else 0
  shape = (batch_size, p + max_length, config.n_kv_heads, config.head_dim)
  dt = JNP_DTYPES[dtype or config.dtype]
  zeros = tuple(jnp.zeros(shape, dt) for _ in range(config.n_layers))
  return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dt) for _ in range(config.n_layers)),
                 length=jnp.zeros((batch_size,), jnp.int32), prefix_length=p)


def position_offset(config: ModelConfig, cache: KVCache) -> int:
  """Rotary position of context token 0 for this cache."""
  return config.context_offset if cache.prefix_length else 0


def chunk_of_next_token(config: ModelConfig, cache: KVCache) -> jax.Array:
  """[B] index of the chunk the next decoded token belongs to (its memories' chunk)."""
  return cache.length // config.chunk_length


def cache_logical_axes(cache: KVCache) -> KVCache:
  """The cache's logical partition specs (a KVCache of PartitionSpecs)."""
  spec = jax.sharding.PartitionSpec(*CACHE_AXES)
  layers = tuple(spec for _ in cache.k)
  return cache.replace(k=layers, v=layers, length=jax.sharding.PartitionSpec("batch"))


def cache_shardings(cache: KVCache, mesh: jax.sharding.Mesh, rules) -> KVCache:
  """NamedShardings for a cache (e.g. jit out_shardings of `init_cache`)."""
  return nn.logical_to_mesh_sharding(cache_logical_axes(cache), mesh, rules)
