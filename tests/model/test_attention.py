"""Memory attention against a plain per-query reference (explicit concatenation)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.model import attention as attn_lib

B, H, H_KV, D = 2, 4, 2, 8
P, T, LC = 2, 10, 4  # prefix, context tokens (last chunk partial), chunk length
C, M, K = 3, 2, 3  # chunks, memories per chunk, tokens per memory head


def _inputs(memory_heads, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, P + T, H, D)).astype(np.float32)
  k = rng.normal(size=(B, P + T, H_KV, D)).astype(np.float32)
  v = rng.normal(size=(B, P + T, H_KV, D)).astype(np.float32)
  h_mem = len(memory_heads)
  memories = rng.normal(size=(B, C, M, 1, 2, h_mem, K, D)).astype(np.float32)
  slot_mask = rng.random((B, C, M, 1, h_mem, K)) > 0.3  # empty slots
  slot_mask[0, 1] = False  # a chunk with no memory at all
  return q, k, v, memories, slot_mask


def _naive(q, k, v, memories, slot_mask, memory_heads):
  """Per (b, head, query): concat prefix + causal context + that chunk's memory, softmax."""
  g = H // H_KV
  out = np.zeros((B, P + T, H, D))
  mass = np.zeros((B, P + T, H))
  for b in range(B):
    for h in range(H):
      kv = h // g
      for t in range(P + T):
        keys, vals = [k[b, :t + 1, kv]], [v[b, :t + 1, kv]]  # prefix + causal context
        n_mem = 0
        if t >= P and kv in memory_heads:
          c = (t - P) // LC
          hm = memory_heads.index(kv)
          for m in range(M):
            for j in range(K):
              if slot_mask[b, c, m, 0, hm, j]:
                keys.append(memories[b, c, m, 0, 0, hm, j][None])
                vals.append(memories[b, c, m, 0, 1, hm, j][None])
                n_mem += 1
        keys, vals = np.concatenate(keys), np.concatenate(vals)
        logits = keys.astype(np.float64) @ q[b, t, h] / math.sqrt(D)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out[b, t, h] = p @ vals
        mass[b, t, h] = p[t + 1:].sum() if n_mem else 0.0
  return out, mass


@pytest.mark.parametrize("memory_heads", [(0, 1), (1,)], ids=["all_heads", "head_subset"])
def test_memory_attention_equals_naive_concatenation(memory_heads):
  q, k, v, memories, slot_mask = _inputs(memory_heads)
  full_mask = attn_lib.full_memory_mask(slot_mask, memories.shape)
  memory = attn_lib.layer_memory(jnp.asarray(memories), full_mask, 0, H_KV, memory_heads,
                                 jnp.float32)
  out, mass = attn_lib.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                              attn_lib.causal_mask(P + T), memory, query_offset=P,
                              chunk_length=LC, memory_heads=memory_heads,
                              return_memory_mass=True)
  want, want_mass = _naive(q, k, v, memories, slot_mask, list(memory_heads))
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
  g = H // H_KV
  heads = [h for h in range(H) if h // g in memory_heads]
  np.testing.assert_allclose(np.asarray(mass), want_mass[:, :, heads].mean(-1), atol=1e-6)
  assert float(np.asarray(mass)[:, P:].max()) > 0.05  # memories actually get attention


def test_fully_masked_memory_equals_plain_attention():
  q, k, v, memories, _ = _inputs((0, 1))
  none = np.zeros((B, C, M), bool)
  memory = attn_lib.layer_memory(jnp.asarray(memories),
                                 attn_lib.full_memory_mask(none, memories.shape), 0, H_KV,
                                 (0, 1), jnp.float32)
  mask = attn_lib.causal_mask(P + T)
  with_mem, _ = attn_lib.attend(q, k, v, mask, memory, query_offset=P, chunk_length=LC)
  plain, _ = attn_lib.attend(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(with_mem), np.asarray(plain), rtol=1e-6, atol=1e-6)


def test_full_memory_mask_broadcasts_coarse_and_fine_masks():
  shape = (B, C, M, 2, 2, 3, K, D)
  coarse = np.array(np.random.default_rng(0).random((B, C, M)) > 0.5)
  full = np.asarray(attn_lib.full_memory_mask(coarse, shape))
  assert full.shape == (B, C, M, 2, 3, K)
  assert (full == coarse[..., None, None, None]).all()
  per_token = np.ones((B, C, M, 1, 1, K), bool)
  per_token[..., -1] = False
  assert not np.asarray(attn_lib.full_memory_mask(per_token, shape))[..., -1].any()
  assert np.asarray(attn_lib.full_memory_mask(None, shape)).all()
  with pytest.raises(ValueError, match="does not broadcast"):
    attn_lib.full_memory_mask(np.ones((B, C + 1, M), bool), shape)


def test_too_few_memory_chunks_is_an_error():
  q, k, v, memories, slot_mask = _inputs((0, 1))
  memory = attn_lib.layer_memory(jnp.asarray(memories[:, :2]),
                                 attn_lib.full_memory_mask(slot_mask[:, :2], memories[:, :2].shape),
                                 0, H_KV, (0, 1), jnp.float32)
  with pytest.raises(ValueError, match="ceil"):
    attn_lib.attend(q, k, v, attn_lib.causal_mask(P + T), memory, query_offset=P,
                    chunk_length=LC)
