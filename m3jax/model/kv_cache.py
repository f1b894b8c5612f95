"""The key-value cache for incremental decoding, and the arithmetic around it.

Layout: one preallocated array per layer for K and for V, each [B, H_kv, S, d]
(static shapes, so `Transformer.prefill` / `Transformer.decode_step` jit once).
Per-layer arrays (not one stacked array) let a decode step write its slot in
place: a stacked cache made XLA copy a whole layer per step, which grew with the
cache size. Heads before slots, as the attention matmuls batch them: with slots
first ([B, S, H_kv, d]) XLA:CPU copied every layer's K and V into that order at
every decode step. Keys are cached after rotary embedding.

Context slots, the same in every layer: with the memory prefix on, slots [0, P)
hold the `<s>Reference:` prefix (rotary positions 0..P-1) and context token i
sits in slot P + i at rotary position `context_offset + i`; with it off, token i
sits in slot i at position i. `length` [B] counts the context tokens written per
sequence, so a batch may hold prompts of different lengths (prefill right-padded
prompts with their lengths).

Memory slots (a cache made `with_memory=True`; docs/model.md "Memory attention"):
each memory layer's arrays have N = memories_per_chunk * memory_tokens_per_head
more slots AFTER the context slots, holding the current chunk's memory tokens
(keys stored rotated at encoding, so nothing is re-rotated), and `memory_valid`
says per memory layer, sequence and KV head which of them are real. They are
written by `place_memories` once per retrieval (the decode loop calls it at chunk
boundaries), so a decode step is ONE attention over the cache: prefix, causal
context and the chunk's memories in one softmax, exactly the keys the memory
block of `attention.attend` would add. Layers outside `memory_layers` have no
memory slots.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from m3jax.core.config import ModelConfig
from m3jax.model import attention as attn_lib
from m3jax.model.dtypes import JNP_DTYPES

# Logical axis names of each layer's cache array (mapped to mesh axes by the rules table).
CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


@struct.dataclass
class KVCache:
  """Preallocated KV cache (a pytree; the layout fields are static)."""
  k: tuple[jax.Array, ...]  # per layer [B, H_kv, S_layer, d], keys after rotary embedding
  v: tuple[jax.Array, ...]  # per layer [B, H_kv, S_layer, d]
  length: jax.Array  # [B] int32, context tokens written (prefix not counted)
  # [B, L_mem, H_kv, N] bool per memory slot of each memory layer (None without them).
  memory_valid: jax.Array | None = None
  prefix_length: int = struct.field(pytree_node=False, default=0)
  memory_layers: tuple[int, ...] = struct.field(pytree_node=False, default=())
  memory_tokens: int = struct.field(pytree_node=False, default=0)  # N slots per memory layer

  @property
  def slots(self) -> int:
    """Prefix + context slots (the same in every layer; memory slots not counted)."""
    return self.k[0].shape[2] - (self.memory_tokens if 0 in self.memory_layers else 0)

  @property
  def max_length(self) -> int:
    """Context tokens the cache can hold per sequence."""
    return self.slots - self.prefix_length

  @property
  def with_memory(self) -> bool:
    return bool(self.memory_layers)


def init_cache(config: ModelConfig, batch_size: int, max_length: int, *, with_prefix: bool,
               with_memory: bool = False, dtype: str | None = None) -> KVCache:
  """An empty cache for `max_length` context tokens (prefix slots added when on).

  with_prefix must be True to decode with memories (the prefix is the attention
  sink memories need, and it moves the context to `config.context_offset`).
  with_memory adds the memory slots of the memory layers (empty until
  `place_memories`). dtype defaults to the model's compute dtype.
  """
  if max_length <= 0 or batch_size <= 0:
    raise ValueError(f"init_cache: batch_size={batch_size} and max_length={max_length} "
                     f"must be positive")
  if with_memory and not with_prefix:
    raise ValueError("init_cache: with_memory=True needs with_prefix=True (memories need "
                     "the <s>Reference: prefix)")
  if with_memory and not config.n_memory_layers:
    raise ValueError("init_cache: with_memory=True but model.memory_layers is empty")
  p = config.prefix_length if with_prefix else 0
  layers = tuple(config.memory_layers) if with_memory else ()
  n = config.memories_per_chunk * config.memory_tokens_per_head if with_memory else 0
  dt = JNP_DTYPES[dtype or config.dtype]

  def layer(i):
    extra = n if i in layers else 0
    return jnp.zeros((batch_size, config.n_kv_heads, p + max_length + extra, config.head_dim), dt)

  valid = None
  if with_memory:
    valid = jnp.zeros((batch_size, len(layers), config.n_kv_heads, n), bool)
  return KVCache(k=tuple(layer(i) for i in range(config.n_layers)),
                 v=tuple(layer(i) for i in range(config.n_layers)),
                 length=jnp.zeros((batch_size,), jnp.int32), memory_valid=valid,
                 prefix_length=p, memory_layers=layers, memory_tokens=n)


def place_memories(config: ModelConfig, cache: KVCache, memories: jax.Array,
                   memory_mask: jax.Array | None = None) -> KVCache:
  """Writes one chunk's memories into the memory slots of every memory layer.

  memories [B, M, L_mem, 2, H_mem, k, d_h] (M = memories_per_chunk), memory_mask
  None (all present), [B, M] or broadcastable to [B, M, L_mem, H_mem, k]. Slot
  `slots + m*k + j` of KV head h holds token j of memory m (as `attention.layer_memory`
  lays a chunk's memories side by side); KV heads outside `memory_heads` get
  zero keys and no valid slot. Replaces what the slots held before.
  """
  if not cache.with_memory:
    raise ValueError("place_memories needs a cache made with with_memory=True")
  memories = jnp.asarray(memories)
  b = cache.length.shape[0]
  want = (b, config.memories_per_chunk) + tuple(config.memory_shape)
  if memories.shape != want:
    raise ValueError(f"place_memories: memories have shape {memories.shape}; expected "
                     f"[B, M, L_mem, 2, H_mem, k, d_h] = {want}")
  mask = None if memory_mask is None else jnp.asarray(memory_mask)[:, None]
  mem = memories[:, None]  # one chunk: [B, 1, M, ...]
  mask = attn_lib.full_memory_mask(mask, mem.shape)
  k, v, s = list(cache.k), list(cache.v), cache.slots
  valid = []
  for j, layer in enumerate(cache.memory_layers):
    kv = attn_lib.layer_memory(mem, mask, j, config.n_kv_heads, config.memory_heads,
                               k[layer].dtype)  # keys, values [B, 1, H_kv, N, d]
    k[layer] = jax.lax.dynamic_update_slice_in_dim(k[layer], kv.keys[:, 0], s, axis=2)
    v[layer] = jax.lax.dynamic_update_slice_in_dim(v[layer], kv.values[:, 0], s, axis=2)
    valid.append(kv.mask[:, 0])
  return cache.replace(k=tuple(k), v=tuple(v), memory_valid=jnp.stack(valid, axis=1))


def decode_masks(cache: KVCache, slot: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """Visibility for a decode step writing context slot `slot` [B].

  Returns the context mask [B, 1, S] of layers without memory slots (prefix and
  causal context up to `slot`) and, for a cache with memory, the masks of the
  memory layers [B, L_mem, H_kv, 1, S + N] (the same, then `memory_valid`).
  """
  ctx = (jnp.arange(cache.slots)[None, :] <= slot[:, None])  # [B, S]
  if not cache.with_memory:
    return ctx[:, None, :], None
  b, l, h, n = cache.memory_valid.shape
  ctx_h = jnp.broadcast_to(ctx[:, None, None, :], (b, l, h, ctx.shape[1]))
  mem = jnp.concatenate([ctx_h, cache.memory_valid], axis=-1)
  return ctx[:, None, :], mem[:, :, :, None, :]


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
  valid = None
  if cache.memory_valid is not None:
    valid = jax.sharding.PartitionSpec("batch", None, "kv_heads", None)
  return cache.replace(k=layers, v=layers, length=jax.sharding.PartitionSpec("batch"),
                       memory_valid=valid)


def cache_shardings(cache: KVCache, mesh: jax.sharding.Mesh, rules) -> KVCache:
  """NamedShardings for a cache (e.g. jit out_shardings of `init_cache`)."""
  return nn.logical_to_mesh_sharding(cache_logical_axes(cache), mesh, rules)
