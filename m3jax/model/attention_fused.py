"""Fused attention kernels where the backend has them, with `attention.attend`'s semantics.

- `attend_pallas_tpu`: the Pallas TPU flash-attention kernels
  (`jax.experimental.pallas.ops.tpu.flash_attention`) for the causal context. A memory
  layer merges the kernel's context partial with the memory block's partial through
  their softmax statistics (running max m, sum l): one softmax over both. The backward
  pass is ours (`jax.custom_vjp`): the kernel's own backward kernels (dK/dV and dQ) run
  with the *merged* statistics and output, which is exactly the gradient of the one
  softmax restricted to the context keys, and the memory block's gradient is computed
  in JAX (`attention_blockwise.memory_backward`, linear in T).
- `attend_cudnn`: cuDNN flash attention through `jax.nn.dot_product_attention` for
  layers without memory. JAX's cuDNN binding drops the gradient of its log-sum-exp
  output, so a memory layer (whose merge needs it) runs blockwise.

Calls that are not causal self-attention over a whole sequence (a decode step: one
query row against the cache; a dense mask) run blockwise, on every backend.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp

from m3jax.model.attention import MemoryKV, SlotMask
from m3jax.model.attention_blockwise import (_Static, attend_blockwise, memory_backward,
                                             memory_mass, memory_state)

_LANES = 128  # TPU kernel blocks are multiples of this


def _is_causal_sequence(q: jax.Array, k: jax.Array, mask) -> bool:
  return isinstance(mask, SlotMask) and mask.diagonal and q.shape[1] == k.shape[1]


# ---------------------------------------------------------------- cuDNN (GPU)


def attend_cudnn(q: jax.Array, k: jax.Array, v: jax.Array, mask, memory: MemoryKV | None = None,
                 *, query_offset: int = 0, chunk_length: int = 1,
                 memory_heads: Sequence[int] | None = None, return_memory_mass: bool = False,
                 block_q: int = 512, block_kv: int = 512) -> tuple[jax.Array, jax.Array | None]:
  """cuDNN flash attention for causal layers without memory or key padding; else blockwise."""
  if memory is None and _is_causal_sequence(q, k, mask) and mask.key_valid is None:
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    return out.astype(v.dtype), None
  return attend_blockwise(q, k, v, mask, memory, query_offset=query_offset,
                          chunk_length=chunk_length, memory_heads=memory_heads,
                          return_memory_mass=return_memory_mass, block_q=block_q,
                          block_kv=block_kv)


# ---------------------------------------------------------------- Pallas (TPU)


def _kernel_blocks(st: _Static):
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # TPU kernels: load on use
  bq, bk = st.block_q, st.block_kv
  return fa, fa.BlockSizes(
      block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
      block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
      block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)


def _to_heads(x, g: int, t_p: int):
  """[B, T, H_kv, (G,) d] -> [B, H_kv * G, T_p, d]: the kernel's layout (KV heads repeated G
  times when x has no G axis)."""
  if x.ndim == 4:
    x = jnp.repeat(x[:, :, :, None], g, axis=3)
  b, t, h_kv, g, d = x.shape
  x = jnp.pad(x, [(0, 0), (0, t_p - t), (0, 0), (0, 0), (0, 0)])
  return jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b, h_kv * g, t_p, d)


def _segments(key_valid, b: int, t: int, t_p: int):
  """Segment ids that hide invalid keys (kernel rule: a query sees keys of its segment)."""
  if key_valid is None:
    return None
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # TPU kernels: load on use
  kv = jnp.broadcast_to(key_valid, (b, t)).astype(jnp.int32)
  return fa.SegmentIds(q=jnp.ones((b, t_p), jnp.int32),
                       kv=jnp.pad(kv, [(0, 0), (0, t_p - t)]))


def _pallas_forward(st: _Static, qg, k, v, memory, key_valid):
  b, t, h_kv, g, d = qg.shape
  t_p = -(-t // math.lcm(st.block_q, st.block_kv)) * math.lcm(st.block_q, st.block_kv)
  fa, blocks = _kernel_blocks(st)
  out_c, l_c, m_c = fa._flash_attention(  # save_residuals=True: also return l, m
      _to_heads(qg, g, t_p), _to_heads(k, g, t_p), _to_heads(v, g, t_p), None,
      _segments(key_valid, b, t, t_p), True, True, 1.0 / math.sqrt(d), blocks, False)
  grouped = lambda x: x.reshape((b, h_kv, g) + x.shape[2:])[:, :, :, :t]
  out_c, l_c, m_c = grouped(out_c).astype(jnp.float32), grouped(l_c), grouped(m_c)
  m0, l0, acc0 = memory_state(st, qg, memory)
  if memory is None:
    return out_c, m_c, l_c, m0, l0
  m = jnp.maximum(m_c, m0)
  w_c, w_m = l_c * jnp.exp(m_c - m), jnp.exp(m0 - m)
  l = w_c + l0 * w_m
  out = (out_c * w_c[..., None] + acc0 * w_m[..., None]) / l[..., None]
  return out, m, l, m0, l0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pallas(st: _Static, qg, k, v, memory, key_valid):
  out, m, l, m0, l0 = _pallas_forward(st, qg, k, v, memory, key_valid)
  return out.astype(v.dtype), (m, l, m0, l0)


def _pallas_fwd(st, qg, k, v, memory, key_valid):
  out, m, l, m0, l0 = _pallas_forward(st, qg, k, v, memory, key_valid)
  out = out.astype(v.dtype)
  return (out, (m, l, m0, l0)), (qg, k, v, memory, key_valid, out, m, l)


def _pallas_bwd(st, res, cotangents):
  qg, k, v, memory, key_valid, out, m, l = res
  d_out, _ = cotangents  # the statistics are returned for the memory mass only
  b, t, h_kv, g, d = qg.shape
  t_p = -(-t // math.lcm(st.block_q, st.block_kv)) * math.lcm(st.block_q, st.block_kv)
  fa, _ = _kernel_blocks(st)
  l = jnp.where(l == 0, 1.0, l)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  flat = lambda x, fill: jnp.pad(x, [(0, 0)] * 3 + [(0, t_p - t)], constant_values=fill).reshape(
      b, h_kv * g, t_p)
  do_h = _to_heads(jnp.moveaxis(d_out, 3, 1), g, t_p)
  args = (_to_heads(qg, g, t_p), _to_heads(k, g, t_p), _to_heads(v, g, t_p), None,
          _segments(key_valid, b, t, t_p), flat(l, 1.0), flat(m, 0.0), do_h.astype(v.dtype),
          flat(delta, 0.0))
  common = dict(block_k_major=st.block_kv, block_k=st.block_kv, sm_scale=1.0 / math.sqrt(d),
                causal=True, mask_value=fa.DEFAULT_MASK_VALUE, debug=False)
  dk, dv = fa._flash_attention_bwd_dkv(*args, block_q_major=st.block_q, block_q=st.block_q,
                                       **common)
  dq, _ = fa._flash_attention_bwd_dq(*args, block_q_major=st.block_q, **common)
  ungroup_q = lambda x: jnp.transpose(x.reshape(b, h_kv, g, t_p, d)[:, :, :, :t], (0, 3, 1, 2, 4))
  ungroup_kv = lambda x: jnp.transpose(
      x.reshape(b, h_kv, g, t_p, d)[:, :, :, :t].astype(jnp.float32).sum(2), (0, 2, 1, 3))
  dqg = ungroup_q(dq).astype(jnp.float32)
  d_mem = None
  if memory is not None:
    dqg_mem, d_mem = memory_backward(st, qg, memory, m, l, d_out, delta)
    dqg = dqg + dqg_mem
  return (dqg.astype(qg.dtype), ungroup_kv(dk).astype(k.dtype), ungroup_kv(dv).astype(v.dtype),
          d_mem, None)


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


def attend_pallas_tpu(q: jax.Array, k: jax.Array, v: jax.Array, mask,
                      memory: MemoryKV | None = None, *, query_offset: int = 0,
                      chunk_length: int = 1, memory_heads: Sequence[int] | None = None,
                      return_memory_mass: bool = False, block_q: int = 512,
                      block_kv: int = 512) -> tuple[jax.Array, jax.Array | None]:
  """`attention.attend` with the Pallas TPU flash kernels for the causal context.

  Block sizes are rounded up to multiples of 128 (and down to the padded length);
  the sequence is padded to a whole number of blocks. Other calls run blockwise.
  """
  kw = dict(query_offset=query_offset, chunk_length=chunk_length, memory_heads=memory_heads,
            return_memory_mass=return_memory_mass)
  if not _is_causal_sequence(q, k, mask):
    return attend_blockwise(q, k, v, mask, memory, block_q=block_q, block_kv=block_kv, **kw)
  b, t, h, d = q.shape
  h_kv = k.shape[2]
  if h % h_kv:
    raise ValueError(f"{h} query heads are not a multiple of {h_kv} KV heads")
  lanes = lambda n: -(-n // _LANES) * _LANES
  bq, bk = min(lanes(block_q), lanes(t)), min(lanes(block_kv), lanes(t))
  st = _Static(bq, bk, t, t, query_offset, chunk_length)
  qg = q.reshape(b, t, h_kv, h // h_kv, d)
  out, stats = _pallas(st, qg, k, v, memory, mask.key_valid)
  out = jnp.moveaxis(out, 3, 1).reshape(b, t, h, d)
  mass = memory_mass(stats, query_offset, memory_heads) if (
      memory is not None and return_memory_mass) else None
  return out, mass
