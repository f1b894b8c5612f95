"""Memory sparsification: which reference tokens a memory keeps, per layer and KV head.

Memory³ paper §3.3 (docs/model.md "Memory selection"): in a memory layer, reference token
j of KV head h scores

    w_j = sum_i sum_{query heads g of h} exp(q_{i,g} . k_j / sqrt(d))

with q and k taken BEFORE rotary embedding, with no causal mask, and with the
`<s>Reference:` prefix and padding excluded both as i and as j. The top
`memory_tokens_per_head` tokens are kept. Top-k of w equals top-k of log w, so we
compute log w with a logsumexp (no overflow for large logits). Selection is a
discrete choice: no gradient flows through the scores, only through the kept
keys and values.

The same functions serve offline encoding (`Transformer.encode_references`) and
in-step encoding during continual training, so both sparsify identically.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def token_log_scores(q: jax.Array, k: jax.Array, valid: jax.Array) -> jax.Array:
  """log w_j per KV head: [N, H_kv, S] float32, -inf where token j is not valid.

  Args:
    q: [N, S, H, d] queries without rotary embedding (H = H_kv * group).
    k: [N, S, H_kv, d] keys without rotary embedding.
    valid: [N, S] bool, True for real reference tokens (not prefix, not padding).
  """
  n, s, h, d = q.shape
  h_kv = k.shape[2]
  qg = q.reshape(n, s, h_kv, h // h_kv, d)
  logits = jnp.einsum("nikgd,njkd->nkjgi", qg, k, preferred_element_type=jnp.float32)
  logits = logits / math.sqrt(d)
  logits = jnp.where(valid[:, None, None, None, :], logits, -jnp.inf)
  scores = jax.nn.logsumexp(logits, axis=(-2, -1))  # [N, H_kv, S]
  return jnp.where(valid[:, None, :], scores, -jnp.inf)


def top_tokens(scores: jax.Array, num_tokens: int) -> jax.Array:
  """Indices [N, H, k] int32 of the k best-scoring tokens, ascending; -1 = empty slot.

  A slot is empty when fewer than k tokens are valid (score -inf). Kept indices
  come first in ascending order, empty slots last, so results are deterministic.
  """
  s = scores.shape[-1]
  if num_tokens > s:
    raise ValueError(f"cannot keep {num_tokens} tokens of a {s}-token sequence "
                     f"(model.memory_tokens_per_head > encoded length)")
  top_scores, top_idx = jax.lax.top_k(scores, num_tokens)
  key = jnp.where(top_scores > -jnp.inf, top_idx, s)
  key = jnp.sort(key, axis=-1)
  return jnp.where(key < s, key, -1).astype(jnp.int32)


def select_memory_tokens(q: jax.Array, k: jax.Array, k_rot: jax.Array, v: jax.Array,
                         valid: jax.Array, positions: jax.Array, num_tokens: int,
                         memory_heads: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """Scores, keeps top-k and gathers one layer's memory.

  Args:
    q: [N, S, H, d] and k: [N, S, H_kv, d] before rotary embedding (scoring).
    k_rot: [N, S, H_kv, d] keys after rotary embedding, v: [N, S, H_kv, d] values
      (what is stored).
    valid: [N, S] bool, real reference tokens.
    positions: [N or 1, S] int rotary positions of the sequence.
    num_tokens: tokens kept per KV head.
    memory_heads: KV heads that get memory (sorted).

  Returns:
    memory [N, 2, H_mem, k, d] (keys, values; zeros in empty slots) and
    positions [N, H_mem, k] int32 of the kept tokens (-1 in empty slots).
  """
  n, s, h, d = q.shape
  h_kv = k.shape[2]
  g = h // h_kv
  heads = np.asarray(memory_heads)
  qm = q.reshape(n, s, h_kv, g, d)[:, :, heads].reshape(n, s, len(heads) * g, d)
  scores = token_log_scores(jax.lax.stop_gradient(qm), jax.lax.stop_gradient(k[:, :, heads]),
                            valid)
  idx = top_tokens(scores, num_tokens)  # [N, H_mem, k]
  kept = idx >= 0
  safe = jnp.where(kept, idx, 0)

  def gather(x):  # [N, S, H_kv, d] -> [N, H_mem, k, d]
    x = jnp.transpose(x[:, :, heads], (0, 2, 1, 3))
    out = jnp.take_along_axis(x, safe[..., None], axis=2)
    return jnp.where(kept[..., None], out, jnp.zeros((), x.dtype))

  memory = jnp.stack([gather(k_rot), gather(v)], axis=1)
  pos = jnp.broadcast_to(positions, (n, s)).astype(jnp.int32)
  pos = jnp.broadcast_to(pos[:, None, :], (n, len(heads), s))
  kept_pos = jnp.take_along_axis(pos, safe, axis=2)
  return memory, jnp.where(kept, kept_pos, -1)
