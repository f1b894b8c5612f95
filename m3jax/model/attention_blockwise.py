"""Blockwise (flash-style) attention in pure JAX: `attention.attend`'s semantics, linear memory.

The softmax over sink prefix + causal context + the chunk's memory tokens is computed
with an online softmax (running max m, running sum l, running output) over blocks of
`block_kv` keys, for blocks of `block_q` queries, so no [Tq, S] logits exist at once.
The memory block is folded in as the starting state of the online softmax: each
query's memory logits ([Tq, M*k] per head, linear in T) give its initial (m, l, out),
and the context key blocks then continue the same softmax.

The backward pass is written by hand (`jax.custom_vjp`), as flash attention does: it
keeps only the output and the per-query (m, l), and recomputes each block's
probabilities, so the backward pass is linear in T too. With a `SlotMask`, key blocks
that no query of a block can see (beyond the causal diagonal) are skipped in both passes.

A query that sees no key at all (a padding query with every earlier key masked) gets a
uniform average over the keys of the blocks it visits, not over all S keys as in
`attention.attend`; such rows are never read (their logits are padding).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.model.attention import (NEG, MemoryKV, SlotMask, _chunks_to_queries,
                                   _queries_to_chunks)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Hashable shape facts of one call (the custom_vjp's non-differentiable argument)."""
  block_q: int
  block_kv: int
  n_queries: int
  n_keys: int
  query_offset: int
  chunk_length: int


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _block_sizes(block_q: int, block_kv: int, tq: int, s: int) -> tuple[int, int]:
  """Blocks no larger than the (padded-to-8) lengths, so short inputs are one block."""
  if block_q <= 0 or block_kv <= 0:
    raise ValueError(f"attention block sizes must be positive, got {block_q}, {block_kv}")
  return min(block_q, _round_up(tq, 8)), min(block_kv, _round_up(s, 8))


# ---------------------------------------------------------------- masks by block


def _pad_mask(mask, st: _Static):
  """Pads a dense mask or SlotMask to the block grid (padding rows/keys see nothing)."""
  tq_p, s_p = _round_up(st.n_queries, st.block_q), _round_up(st.n_keys, st.block_kv)
  if isinstance(mask, SlotMask):
    slots = jnp.pad(mask.query_slots.astype(jnp.int32),
                    [(0, 0), (0, tq_p - st.n_queries)], constant_values=-1)
    valid = mask.key_valid
    if valid is not None:
      valid = jnp.pad(valid.astype(bool), [(0, 0), (0, s_p - st.n_keys)])
    return SlotMask(slots, valid, mask.diagonal)
  mask = jnp.asarray(mask, bool)
  return jnp.pad(mask, [(0, 0), (0, tq_p - st.n_queries), (0, s_p - st.n_keys)])


def _block_mask(mask, st: _Static, qi, kj) -> jax.Array:
  """[B or 1, block_q, block_kv] visibility of key block kj to query block qi."""
  q0, k0 = qi * st.block_q, kj * st.block_kv
  if isinstance(mask, SlotMask):
    slots = jax.lax.dynamic_slice_in_dim(mask.query_slots, q0, st.block_q, axis=1)
    keys = k0 + jnp.arange(st.block_kv)
    visible = keys[None, None, :] <= slots[:, :, None]
    if mask.key_valid is not None:
      valid = jax.lax.dynamic_slice_in_dim(mask.key_valid, k0, st.block_kv, axis=1)
      visible = visible & valid[:, None, :]
    return visible
  rows = jax.lax.dynamic_slice_in_dim(mask, q0, st.block_q, axis=1)
  return jax.lax.dynamic_slice_in_dim(rows, k0, st.block_kv, axis=2)


def _last_visible_key(mask, st: _Static, n_q_blocks: int) -> jax.Array | None:
  """[n_q_blocks] largest key slot any query of each block may see (SlotMask only)."""
  if not isinstance(mask, SlotMask):
    return None
  slots = mask.query_slots.reshape(mask.query_slots.shape[0], n_q_blocks, st.block_q)
  return slots.max(axis=(0, 2))


def _logits(q_blk, k_blk, visible, real, scale):
  """Masked float32 logits [B, H_kv, G, bq, bk]: NEG where hidden, -inf on padding keys."""
  s = jnp.einsum("bqkgd,bskd->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
  s = jnp.where(visible[:, None, None], s, NEG)
  return jnp.where(real[None, None, None, None, :], s, -jnp.inf)


# ---------------------------------------------------------------- memory block


def _memory_logits(qg, memory: MemoryKV, st: _Static, scale) -> jax.Array:
  """[B, H_kv, G, Tq, N] float32 memory logits, NEG where hidden and on prefix rows."""
  tq = qg.shape[1]
  c = memory.keys.shape[1]
  qc = _queries_to_chunks(qg, st.query_offset, c, st.chunk_length)  # [B, C, Lc, H_kv, G, d]
  s = jnp.einsum("bclkgd,bckmd->bclkgm", qc, memory.keys,
                 preferred_element_type=jnp.float32) * scale
  visible = memory.mask[:, :, None, :, None, :]  # [B, C, 1, H_kv, 1, N]
  s = jnp.where(visible, s, NEG)
  s = _chunks_to_queries(s, st.query_offset, tq)  # [B, Tq, H_kv, G, N], prefix rows 0
  s = jnp.where((jnp.arange(tq) >= st.query_offset)[None, :, None, None, None], s, NEG)
  return jnp.moveaxis(s, 1, 3)


def _memory_weights_times(w, values, st: _Static, n_queries: int) -> jax.Array:
  """sum_n w[.., t, n] values[chunk(t), n]: [B, H_kv, G, Tq, N] -> [B, H_kv, G, Tq, d] f32."""
  c = values.shape[1]
  wc = _queries_to_chunks(jnp.moveaxis(w, 3, 1), st.query_offset, c, st.chunk_length)
  # No preferred_element_type: XLA:CPU has no bf16 x bf16 -> f32 kernel for this einsum.
  out = jnp.einsum("bclkgm,bckmd->bclkgd", wc.astype(values.dtype), values).astype(jnp.float32)
  return jnp.moveaxis(_chunks_to_queries(out, st.query_offset, n_queries), 1, 3)


def _chunk_rows(x, st: _Static, c: int):
  """[B, H_kv, G, Tq, ...] -> [B, C, Lc, H_kv, G, ...] (drops prefix rows)."""
  return _queries_to_chunks(jnp.moveaxis(x, 3, 1), st.query_offset, c, st.chunk_length)


def memory_state(st: _Static, qg, memory: MemoryKV | None):
  """The online softmax's state after the memory block: running max m, sum l [B, H_kv, G,
  Tq] and unnormalised output [B, H_kv, G, Tq, d] (float32); empty without memory."""
  b, tq, h_kv, g, d = qg.shape
  if memory is None:
    return (jnp.full((b, h_kv, g, tq), NEG, jnp.float32),
            jnp.zeros((b, h_kv, g, tq), jnp.float32),
            jnp.zeros((b, h_kv, g, tq, d), jnp.float32))
  s_mem = _memory_logits(qg, memory, st, 1.0 / math.sqrt(d))
  m0 = s_mem.max(-1)
  p_mem = jnp.exp(s_mem - m0[..., None])
  return m0, p_mem.sum(-1), _memory_weights_times(p_mem, memory.values, st, tq)


def memory_backward(st: _Static, qg, memory: MemoryKV, m, l, d_out, delta):
  """Gradients through the memory block given the final softmax statistics.

  m, l: final running max and sum [B, H_kv, G, Tq] (l > 0); d_out [B, H_kv, G, Tq, d];
  delta = sum(d_out * out, -1). Returns (d qg [B, Tq, H_kv, G, d] float32, MemoryKV of
  d keys and d values, mask None).
  """
  tq, d = qg.shape[1], qg.shape[-1]
  scale = 1.0 / math.sqrt(d)
  c = memory.keys.shape[1]
  s_mem = _memory_logits(qg, memory, st, scale)
  p_mem = jnp.exp(s_mem - m[..., None]) / l[..., None]  # [B, H_kv, G, Tq, N]
  pc = _chunk_rows(p_mem, st, c)  # [B, C, Lc, H_kv, G, N]
  doc = _chunk_rows(d_out.astype(jnp.float32), st, c)  # [B, C, Lc, H_kv, G, d]
  dp = jnp.einsum("bclkgd,bckmd->bclkgm", doc, memory.values.astype(jnp.float32))
  ds = pc * (dp - _chunk_rows(delta[..., None], st, c))
  qc = _chunk_rows(jnp.moveaxis(qg, 1, 3), st, c).astype(jnp.float32)
  d_mem_v = jnp.einsum("bclkgm,bclkgd->bckmd", pc, doc)
  d_mem_k = jnp.einsum("bclkgm,bclkgd->bckmd", ds, qc) * scale
  d_mem = MemoryKV(d_mem_k.astype(memory.keys.dtype), d_mem_v.astype(memory.values.dtype), None)
  dq_c = jnp.einsum("bclkgm,bckmd->bclkgd", ds, memory.keys.astype(jnp.float32)) * scale
  return _chunks_to_queries(dq_c, st.query_offset, tq), d_mem


# ---------------------------------------------------------------- forward


def _forward(st: _Static, qg, k, v, memory, mask):
  """Returns out [B, H_kv, G, Tq, d] f32 and the final (m, l) [B, H_kv, G, Tq], and the
  memory block's own (m, l) (for the memory mass)."""
  b, tq, h_kv, g, d = qg.shape
  scale = 1.0 / math.sqrt(d)
  bq, bk = st.block_q, st.block_kv
  tq_p, s_p = _round_up(tq, bq), _round_up(st.n_keys, bk)
  nq, nk = tq_p // bq, s_p // bk

  m0, l0, acc0 = memory_state(st, qg, memory)
  pad_q = [(0, 0)] * 3 + [(0, tq_p - tq)]
  m0, l0 = jnp.pad(m0, pad_q, constant_values=NEG), jnp.pad(l0, pad_q)
  acc0 = jnp.pad(acc0, pad_q + [(0, 0)])
  qg_p = jnp.pad(qg, [(0, 0), (0, tq_p - tq), (0, 0), (0, 0), (0, 0)])
  k_p = jnp.pad(k, [(0, 0), (0, s_p - st.n_keys), (0, 0), (0, 0)])
  v_p = jnp.pad(v, [(0, 0), (0, s_p - st.n_keys), (0, 0), (0, 0)])
  mask = _pad_mask(mask, st)
  last_key = _last_visible_key(mask, st, nq)

  def q_block(_, qi):
    q_blk = jax.lax.dynamic_slice_in_dim(qg_p, qi * bq, bq, axis=1)
    carry = tuple(jax.lax.dynamic_slice_in_dim(x, qi * bq, bq, axis=3) for x in (m0, l0, acc0))

    def kv_block(kj, carry):
      m, l, acc = carry
      k_blk = jax.lax.dynamic_slice_in_dim(k_p, kj * bk, bk, axis=1)
      v_blk = jax.lax.dynamic_slice_in_dim(v_p, kj * bk, bk, axis=1)
      real = kj * bk + jnp.arange(bk) < st.n_keys
      s = _logits(q_blk, k_blk, _block_mask(mask, st, qi, kj), real, scale)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      corr = jnp.exp(m - m_new)
      l = l * corr + p.sum(-1)
      acc = acc * corr[..., None] + jnp.einsum(
          "bkgqs,bskd->bkgqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
      return m_new, l, acc

    n_visit = nk if last_key is None else jnp.clip(last_key[qi] // bk + 1, 0, nk)
    m, l, acc = jax.lax.fori_loop(0, n_visit, kv_block, carry)
    return None, (m, l, acc / jnp.where(l == 0, 1.0, l)[..., None])

  _, (m, l, out) = jax.lax.scan(q_block, None, jnp.arange(nq))
  # [nq, B, H_kv, G, bq, ...] -> [B, H_kv, G, Tq, ...]
  unblock = lambda x: jnp.moveaxis(x, 0, 3).reshape(x.shape[1:4] + (tq_p,) + x.shape[5:])[
      :, :, :, :tq]
  m, l, out = unblock(m), unblock(l), unblock(out)
  return out, m, l, m0[..., :tq], l0[..., :tq]


# ---------------------------------------------------------------- backward


def _backward(st: _Static, qg, k, v, memory, mask, out, m, l, d_out):
  """Gradients (dqg, dk, dv, d memory keys, d memory values) from the saved (out, m, l)."""
  b, tq, h_kv, g, d = qg.shape
  scale = 1.0 / math.sqrt(d)
  bq, bk = st.block_q, st.block_kv
  tq_p, s_p = _round_up(tq, bq), _round_up(st.n_keys, bk)
  nq, nk = tq_p // bq, s_p // bk
  l_safe = jnp.where(l == 0, 1.0, l)
  dt = v.dtype  # matmul operands in the compute dtype, accumulation in float32
  d_out = d_out.astype(dt)  # [B, H_kv, G, Tq, d]
  delta = jnp.sum(d_out.astype(jnp.float32) * out, axis=-1)  # [B, H_kv, G, Tq]

  d_mem, dqg_mem = None, 0.0
  if memory is not None:
    dqg_mem, d_mem = memory_backward(st, qg, memory, m, l_safe, d_out, delta)

  pad_q = [(0, 0)] * 3 + [(0, tq_p - tq)]
  m_p = jnp.pad(m, pad_q, constant_values=NEG)
  l_p = jnp.pad(l_safe, pad_q, constant_values=1.0)
  delta_p = jnp.pad(delta, pad_q)
  do_p = jnp.pad(d_out, pad_q + [(0, 0)])
  qg_p = jnp.pad(qg, [(0, 0), (0, tq_p - tq), (0, 0), (0, 0), (0, 0)])
  k_p = jnp.pad(k, [(0, 0), (0, s_p - st.n_keys), (0, 0), (0, 0)])
  v_p = jnp.pad(v, [(0, 0), (0, s_p - st.n_keys), (0, 0), (0, 0)])
  mask = _pad_mask(mask, st)
  last_key = _last_visible_key(mask, st, nq)

  def kv_block(dq_acc, kj):
    k_blk = jax.lax.dynamic_slice_in_dim(k_p, kj * bk, bk, axis=1)
    v_blk = jax.lax.dynamic_slice_in_dim(v_p, kj * bk, bk, axis=1)
    real = kj * bk + jnp.arange(bk) < st.n_keys

    def q_block(qi, carry):
      dk, dv, dq_acc = carry
      sl = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, qi * bq, bq, axis=axis)
      q_blk, do_blk = sl(qg_p, 1), sl(do_p, 3)
      s = _logits(q_blk, k_blk, _block_mask(mask, st, qi, kj), real, scale)
      p = jnp.exp(s - sl(m_p, 3)[..., None]) / sl(l_p, 3)[..., None]  # [B, H_kv, G, bq, bk]
      dv = dv + jnp.einsum("bkgqs,bkgqd->bskd", p.astype(dt), do_blk,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bkgqd,bskd->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
      ds = (p * (dp - sl(delta_p, 3)[..., None])).astype(dt)
      dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, q_blk,
                           preferred_element_type=jnp.float32) * scale
      dq = jnp.einsum("bkgqs,bskd->bqkgd", ds, k_blk, preferred_element_type=jnp.float32) * scale
      dq_acc = jax.lax.dynamic_update_slice_in_dim(dq_acc, sl(dq_acc, 1) + dq, qi * bq, axis=1)
      return dk, dv, dq_acc

    def maybe_q_block(qi, carry):
      if last_key is None:
        return q_block(qi, carry)
      return jax.lax.cond(last_key[qi] >= kj * bk, q_block, lambda _, c: c, qi, carry)

    zeros = jnp.zeros((b, bk, h_kv, d), jnp.float32)
    dk, dv, dq_acc = jax.lax.fori_loop(0, nq, maybe_q_block, (zeros, zeros, dq_acc))
    return dq_acc, (dk, dv)

  dq_acc = jnp.zeros((b, tq_p, h_kv, g, d), jnp.float32)
  dq_acc, (dk, dv) = jax.lax.scan(kv_block, dq_acc, jnp.arange(nk))
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape((b, s_p, h_kv, d))[:, :st.n_keys]
  dqg = dq_acc[:, :tq] + dqg_mem
  return (dqg.astype(qg.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype), d_mem)


# ---------------------------------------------------------------- custom_vjp wrapper


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, qg, k, v, memory, mask):
  out, m, l, m_mem, l_mem = _forward(st, qg, k, v, memory, mask)
  return out.astype(v.dtype), (m, l, m_mem, l_mem)


def _flash_fwd(st, qg, k, v, memory, mask):
  out, m, l, m_mem, l_mem = _forward(st, qg, k, v, memory, mask)
  out = out.astype(v.dtype)
  return (out, (m, l, m_mem, l_mem)), (qg, k, v, memory, mask, out, m, l)


def _flash_bwd(st, res, cotangents):
  qg, k, v, memory, mask, out, m, l = res
  d_out, _ = cotangents  # the softmax statistics are returned for the memory mass only
  dqg, dk, dv, d_mem = _backward(st, qg, k, v, memory, mask, out.astype(jnp.float32), m, l,
                                 d_out)
  return dqg, dk, dv, d_mem, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def attend_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | SlotMask,
                     memory: MemoryKV | None = None, *, query_offset: int = 0,
                     chunk_length: int = 1, memory_heads: Sequence[int] | None = None,
                     return_memory_mass: bool = False, block_q: int = 512,
                     block_kv: int = 512) -> tuple[jax.Array, jax.Array | None]:
  """`attention.attend` computed block by block (same arguments and results).

  block_q / block_kv: queries and keys per block (multiples of 128 suit TPUs);
  inputs shorter than a block are one block. The memory mass is not differentiable.
  """
  b, tq, h, d = q.shape
  s, h_kv = k.shape[1], k.shape[2]
  if h % h_kv:
    raise ValueError(f"{h} query heads are not a multiple of {h_kv} KV heads")
  g = h // h_kv
  bq, bk = _block_sizes(block_q, block_kv, tq, s)
  st = _Static(bq, bk, tq, s, query_offset, chunk_length)
  qg = q.reshape(b, tq, h_kv, g, d)
  out, (m, l, m_mem, l_mem) = _flash(st, qg, k, v, memory, mask)
  out = jnp.moveaxis(out, 3, 1).reshape(b, tq, h, d)  # [B, H_kv, G, Tq, d] -> [B, Tq, H, d]
  mass = None
  if memory is not None and return_memory_mass:
    mass = memory_mass((m, l, m_mem, l_mem), query_offset, memory_heads)
  return out, mass


def memory_mass(stats, query_offset: int, memory_heads: Sequence[int] | None) -> jax.Array:
  """Softmax mass on memory tokens [B, Tq] from the final and the memory block's (m, l)
  [B, H_kv, G, Tq], averaged over the query heads of `memory_heads` (0 on prefix rows,
  as `attention.attend` reports it). Not differentiable."""
  m, l, m_mem, l_mem = jax.lax.stop_gradient(stats)
  frac = l_mem * jnp.exp(m_mem - m) / jnp.where(l == 0, 1.0, l)
  frac = jnp.where(jnp.arange(m.shape[-1]) >= query_offset, frac, 0.0)
  heads = np.asarray(range(m.shape[1]) if memory_heads is None else memory_heads)
  return frac[:, heads].mean(axis=(1, 2))
