"""Grouped-query attention with Memory³ memory blocks, as pure functions.

In a memory layer every query of chunk c attends, in ONE float32 softmax, to the
keys it may see in the ordinary sense (the `<s>Reference:` prefix and the causal
context, given by `mask`) and to the sparse memory tokens retrieved for chunk c.
The memory part is an extra block of logits of shape
[B, kv_heads, group, C, chunk_length, M*k], computed with one einsum over all
chunks and concatenated to the context logits before the softmax. Memory keys
already carry their rotary embedding (applied when the reference was encoded),
so nothing here knows where memories came from: keys, values and a mask arrive.

Layouts: q [B, Tq, H, d]; k, v [B, S, H_kv, d]; mask [B or 1, Tq, S] (True =
visible). Query heads are grouped as H = H_kv * group, query head h uses KV head
h // group (Hugging Face `repeat_kv`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Additive mask value: finite so a fully masked row gives a uniform (not NaN)
# softmax; exp(NEG - max) underflows to exactly 0 for any real logit.
NEG = float(np.finfo(np.float32).min)


class MemoryKV(NamedTuple):
  """Memory tokens of one layer, grouped by the chunk whose queries see them.

  keys, values: [B, C, H_kv, N, d] (N = memories x tokens per head; KV heads that
  are not memory heads are zero-filled and fully masked); mask: [B, C, H_kv, N].
  """
  keys: jax.Array
  values: jax.Array
  mask: jax.Array


def causal_mask(length: int) -> jax.Array:
  """[1, T, T] lower-triangular visibility."""
  return jnp.tril(jnp.ones((length, length), dtype=bool))[None]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["query_slots", "key_valid"],
                   meta_fields=["diagonal"])
@dataclasses.dataclass(frozen=True)
class SlotMask:
  """A context mask stated by slots, never as a [Tq, S] array (linear in length).

  Query i sees key slot s iff s <= query_slots[i] and key_valid[s]: causal
  attention (query_slots = arange(T)), left padding (key_valid False on padding
  keys) and a decode step (query_slots = the token's cache slot) all fit.
  query_slots: [B or 1, Tq] int32; key_valid: [B or 1, S] bool or None (all valid).
  diagonal (static): True when query_slots is known to be arange(Tq) with Tq == S,
  i.e. plain causal self-attention, which fused kernels take as a flag.
  """
  query_slots: jax.Array
  key_valid: jax.Array | None = None
  diagonal: bool = False

  def dense(self, n_keys: int) -> jax.Array:
    """The same mask as a [B or 1, Tq, S] bool array (what `attend` takes)."""
    visible = jnp.arange(n_keys)[None, None, :] <= self.query_slots[:, :, None]
    if self.key_valid is not None:
      visible = visible & self.key_valid[:, None, :]
    return visible


def causal_slot_mask(length: int, key_valid: jax.Array | None = None) -> SlotMask:
  """`causal_mask(length)` (and key padding) as a SlotMask."""
  return SlotMask(jnp.arange(length, dtype=jnp.int32)[None], key_valid, diagonal=True)


def full_memory_mask(memory_mask: jax.Array | None, memory_shape: Sequence[int]) -> jax.Array:
  """Expands a memory mask to one bool per memory token: [B, C, M, L_mem, H_mem, k].

  `memory_shape` is the shape of the memories array [B, C, M, L_mem, 2, H_mem, k, d].
  The mask may be None (all present), [B, C, M], or any shape that broadcasts to
  [B, C, M, L_mem, H_mem, k] after right-padding with singleton axes (e.g. a
  per-slot mask [B, C, M, L_mem, H_mem, k] built from stored positions >= 0).
  """
  b, c, m, l, _, h, k, _ = memory_shape
  target = (b, c, m, l, h, k)
  if memory_mask is None:
    return jnp.ones(target, dtype=bool)
  memory_mask = jnp.asarray(memory_mask)
  if memory_mask.ndim > 6:
    raise ValueError(f"memory_mask has {memory_mask.ndim} axes; expected at most 6 "
                     f"[B, C, M, L_mem, H_mem, k]")
  memory_mask = memory_mask.reshape(memory_mask.shape + (1,) * (6 - memory_mask.ndim))
  try:
    return jnp.broadcast_to(memory_mask.astype(bool), target)
  except ValueError as e:
    raise ValueError(f"memory_mask of shape {memory_mask.shape} does not broadcast to "
                     f"[B, C, M, L_mem, H_mem, k] = {target}") from e


def layer_memory(memories: jax.Array, memory_mask: jax.Array, layer_slot: int, n_kv_heads: int,
                 memory_heads: Sequence[int], dtype) -> MemoryKV:
  """Slices memory layer `layer_slot` out of [B, C, M, L_mem, 2, H_mem, k, d] memories.

  memory_mask must already be full ([B, C, M, L_mem, H_mem, k], see
  `full_memory_mask`). The M memories of a chunk are laid side by side (M*k tokens
  per KV head); KV heads outside `memory_heads` get zero keys and a False mask, so
  their query groups see no memory.
  """
  b, c, m, _, _, h_mem, k, d = memories.shape
  mem = memories[:, :, :, layer_slot].astype(dtype)  # [B, C, M, 2, H_mem, k, d]
  mem = jnp.transpose(mem, (3, 0, 1, 4, 2, 5, 6)).reshape(2, b, c, h_mem, m * k, d)
  mask = jnp.transpose(memory_mask[:, :, :, layer_slot], (0, 1, 3, 2, 4)).reshape(
      b, c, h_mem, m * k)
  keys, values = mem[0], mem[1]
  if tuple(memory_heads) != tuple(range(n_kv_heads)):
    idx = np.asarray(memory_heads)
    keys = jnp.zeros((b, c, n_kv_heads, m * k, d), dtype).at[:, :, idx].set(keys)
    values = jnp.zeros((b, c, n_kv_heads, m * k, d), dtype).at[:, :, idx].set(values)
    mask = jnp.zeros((b, c, n_kv_heads, m * k), bool).at[:, :, idx].set(mask)
  return MemoryKV(keys, values, mask)


def _queries_to_chunks(x: jax.Array, offset: int, n_chunks: int, chunk_length: int) -> jax.Array:
  """[B, Tq, ...] -> [B, C, Lc, ...]: drops the first `offset` rows, pads the tail."""
  x = x[:, offset:]
  pad = n_chunks * chunk_length - x.shape[1]
  if pad < 0:
    raise ValueError(f"{x.shape[1]} memory queries do not fit {n_chunks} chunks of "
                     f"{chunk_length}; pass memories for ceil(T / chunk_length) chunks")
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  return x.reshape((x.shape[0], n_chunks, chunk_length) + x.shape[2:])


def _chunks_to_queries(x: jax.Array, offset: int, n_queries: int) -> jax.Array:
  """Inverse of `_queries_to_chunks`: [B, C, Lc, ...] -> [B, Tq, ...], zero prefix rows."""
  x = x.reshape((x.shape[0], -1) + x.shape[3:])[:, :n_queries - offset]
  return jnp.pad(x, [(0, 0), (offset, 0)] + [(0, 0)] * (x.ndim - 2))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | SlotMask,
           memory: MemoryKV | None = None, *, query_offset: int = 0, chunk_length: int = 1,
           memory_heads: Sequence[int] | None = None,
           return_memory_mass: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """Softmax attention over context keys plus (optionally) per-chunk memory tokens.

  Args:
    q: [B, Tq, H, d] queries (rotary embedding applied).
    k, v: [B, S, H_kv, d] context keys (rotary applied) and values.
    mask: [B or 1, Tq, S] bool, which context keys each query sees (or a SlotMask).
    memory: memory tokens per chunk ([B, C, H_kv, N, d]) or None.
    query_offset: queries before it see no memory (the `<s>Reference:` prefix).
    chunk_length: queries query_offset + c*chunk_length ... + chunk_length - 1
      see memory chunk c (1 for single-token decoding).
    memory_heads: KV heads whose groups the memory mass statistic averages over.
    return_memory_mass: also return the softmax mass on memory tokens, [B, Tq],
      averaged over the query heads of `memory_heads` (0 for prefix queries).

  Returns:
    (out [B, Tq, H, d] in v's dtype, memory mass or None).
  """
  b, tq, h, d = q.shape
  s, h_kv = k.shape[1], k.shape[2]
  if h % h_kv:
    raise ValueError(f"{h} query heads are not a multiple of {h_kv} KV heads")
  g = h // h_kv
  scale = 1.0 / math.sqrt(d)
  if isinstance(mask, SlotMask):
    mask = mask.dense(s)
  qg = q.reshape(b, tq, h_kv, g, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, None, None], logits, NEG)

  if memory is not None:
    c = memory.keys.shape[1]
    qc = _queries_to_chunks(qg, query_offset, c, chunk_length)  # [B, C, Lc, H_kv, G, d]
    mem_logits = jnp.einsum("bclkgd,bckmd->bkgclm", qc, memory.keys,
                            preferred_element_type=jnp.float32) * scale
    visible = jnp.transpose(memory.mask, (0, 2, 1, 3))[:, :, None, :, None, :]
    mem_logits = jnp.where(visible, mem_logits, NEG)  # [B, H_kv, G, C, Lc, N]
    mem_logits = jnp.moveaxis(mem_logits, (3, 4), (1, 2))  # [B, C, Lc, H_kv, G, N]
    mem_logits = _chunks_to_queries(mem_logits, query_offset, tq)  # [B, Tq, H_kv, G, N]
    # Prefix rows (zero padded above) must not see memory.
    row_has_memory = (jnp.arange(tq) >= query_offset)[None, :, None, None, None]
    mem_logits = jnp.where(row_has_memory, mem_logits, NEG)
    logits = jnp.concatenate([logits, jnp.moveaxis(mem_logits, 1, 3)], axis=-1)

  probs = jax.nn.softmax(logits, axis=-1)  # float32, one softmax over context + memory
  out = jnp.einsum("bkgts,bskd->btkgd", probs[..., :s].astype(v.dtype), v)

  mass = None
  if memory is not None:
    mem_probs = jnp.moveaxis(probs[..., s:], 3, 1)  # [B, Tq, H_kv, G, N]
    pc = _queries_to_chunks(mem_probs, query_offset, c, chunk_length)
    mem_out = jnp.einsum("bclkgm,bckmd->bclkgd", pc.astype(memory.values.dtype), memory.values)
    out = out + _chunks_to_queries(mem_out, query_offset, tq).astype(out.dtype)
    if return_memory_mass:
      heads = np.asarray(range(h_kv) if memory_heads is None else memory_heads)
      mass = mem_probs.sum(-1)[:, :, heads].mean(axis=(2, 3))
  return out.reshape(b, tq, h, d), mass
