"""Sparsification: the scoring formula, top-k, and what encode_references stores."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.model import sparsify
from m3jax.core.config import load_config, model_config
from m3jax.model.transformer import Transformer, init_params


def _np_log_scores(q, k, valid):
  """log sum_i sum_(group) exp(q_i . k_j / sqrt(d)), float64, plain loops over heads."""
  n, s, h, d = q.shape
  h_kv = k.shape[2]
  g = h // h_kv
  out = np.full((n, h_kv, s), -np.inf)
  for b in range(n):
    for kv in range(h_kv):
      total = np.zeros(s)
      for qh in range(kv * g, (kv + 1) * g):
        logits = q[b, :, qh].astype(np.float64) @ k[b, :, kv].astype(np.float64).T / math.sqrt(d)
        total += np.exp(logits)[valid[b]].sum(axis=0)  # sum over valid i
      out[b, kv, valid[b]] = np.log(total[valid[b]])
  return out


def _np_top(scores, k):
  """Ascending indices of the k best finite scores, -1 padded at the end."""
  out = []
  for row in scores.reshape(-1, scores.shape[-1]):
    finite = np.flatnonzero(np.isfinite(row))
    best = finite[np.argsort(-row[finite], kind="stable")[:k]]
    out.append(np.concatenate([np.sort(best), -np.ones(k - len(best), int)]))
  return np.array(out).reshape(scores.shape[:-1] + (k,))


def test_scores_and_top_k_match_numpy_formula():
  rng = np.random.default_rng(0)
  n, s, h, h_kv, d, k = 3, 12, 4, 2, 8, 4
  q = rng.normal(size=(n, s, h, d)).astype(np.float32) * 2
  key = rng.normal(size=(n, s, h_kv, d)).astype(np.float32) * 2
  valid = np.zeros((n, s), bool)
  valid[0, 2:12] = True  # prefix of 2, full
  valid[1, 2:7] = True  # padding after 5 tokens
  valid[2, 2:4] = True  # fewer valid tokens than k -> empty slots
  got = np.asarray(sparsify.token_log_scores(q, key, valid))
  want = _np_log_scores(q, key, valid)
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-5)
  idx = np.asarray(sparsify.top_tokens(jnp.asarray(got), k))
  np.testing.assert_array_equal(idx, _np_top(want, k))
  assert (idx[2] == [2, 3, -1, -1]).all()


def test_score_is_stable_for_large_logits():
  q = np.full((1, 4, 1, 2), 300.0, np.float32)
  key = np.full((1, 4, 1, 2), 300.0, np.float32)
  scores = sparsify.token_log_scores(q, key, np.ones((1, 4), bool))
  assert np.isfinite(np.asarray(scores)).all()  # exp would overflow float32


# ---------------------------------------------------------------- encode_references


def _np_rope(x, positions, theta):
  d = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
  ang = positions[:, None] * inv
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
  rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
  return x * cos[:, None] + rot * sin[:, None]


def _np_layer_qkv(params, cfg, tokens, n_layers):
  """A plain float64 Llama forward of one sequence; (q, k, k_rot, v) per layer."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  rms = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * w
  x = p["embed"]["embedding"][tokens]
  s = len(tokens)
  pos = np.arange(s)
  g = cfg.n_heads // cfg.n_kv_heads
  out = []
  for l in range(n_layers):
    lp = p[f"layers_{l}"]
    h = rms(x, lp["attn_norm"]["scale"])
    q = np.einsum("td,dhk->thk", h, lp["attn"]["q"]["kernel"])
    k = np.einsum("td,dhk->thk", h, lp["attn"]["k"]["kernel"])
    v = np.einsum("td,dhk->thk", h, lp["attn"]["v"]["kernel"])
    qr, kr = _np_rope(q, pos, cfg.rope_theta), _np_rope(k, pos, cfg.rope_theta)
    out.append((q, k, kr, v))
    att = np.zeros_like(q)
    for head in range(cfg.n_heads):
      logits = qr[:, head] @ kr[:, head // g].T / math.sqrt(cfg.head_dim)
      logits = np.where(np.tril(np.ones((s, s), bool)), logits, -np.inf)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      att[:, head] = (w / w.sum(-1, keepdims=True)) @ v[:, head // g]
    x = x + np.einsum("thk,hkd->td", att, lp["attn"]["o"]["kernel"])
    h = rms(x, lp["mlp_norm"]["scale"])
    gate = h @ lp["mlp"]["gate"]["kernel"]
    x = x + (gate / (1 + np.exp(-gate)) * (h @ lp["mlp"]["up"]["kernel"])) @ lp["mlp"]["down"][
        "kernel"]
  return out


@pytest.fixture(scope="module")
def encode_setup(repo_root):
  cfg = model_config(load_config(str(repo_root / "configs" / "tiny.py")))
  # Memory layers 0 and 2 of 4, one memory head of two; large weights so that token
  # scores are well separated (top-k is then unambiguous across float precisions).
  cfg = dataclasses.replace(cfg, memory_layers=(0, 2), memory_heads=(1,), init_std=0.3)
  params = init_params(cfg, jax.random.key(1))
  rng = np.random.default_rng(3)
  params = jax.tree_util.tree_map(lambda a: a * (1 + 0.2 * rng.normal(size=a.shape)), params)
  r = cfg.reference_length
  lengths = np.array([r, 9, 2])  # full, padded, shorter than k (empty slots)
  refs = rng.integers(5, cfg.vocab_size, size=(3, r))
  refs[np.arange(r)[None] >= lengths[:, None]] = cfg.pad_id
  mem, pos = jax.jit(lambda p, t, n: Transformer(cfg).apply(
      {"params": p}, t, n, method="encode_references"))(params, refs, lengths)
  return cfg, params, refs, lengths, np.asarray(mem), np.asarray(pos)


@pytest.mark.slow
def test_encode_references_selects_numpy_top_k(encode_setup):
  cfg, params, refs, lengths, mem, pos = encode_setup
  p, k = cfg.prefix_length, cfg.memory_tokens_per_head
  assert mem.shape == (3,) + cfg.memory_shape and pos.shape == (3, 2, 1, k)
  for n in range(3):
    seq = np.concatenate([cfg.reference_prefix_ids, refs[n]])
    layers = _np_layer_qkv(params, cfg, seq, cfg.last_memory_layer + 1)
    valid = np.zeros(len(seq), bool)
    valid[p:p + lengths[n]] = True
    for slot, layer in enumerate(cfg.memory_layers):
      q, key, _, _ = layers[layer]
      scores = _np_log_scores(q[None], key[None], valid[None])[0, list(cfg.memory_heads)]
      want = _np_top(scores, k)
      if lengths[n] > k:  # the k-th and (k+1)-th scores must be distinguishable
        srt = np.sort(scores[np.isfinite(scores)])[::-1]
        assert srt[k - 1] - srt[k] > 1e-3
      np.testing.assert_array_equal(pos[n, slot], want)
  assert (pos[2] == [2, 3, -1, -1]).all()  # positions are P + j


def test_encode_references_stores_rotated_keys_at_kept_positions(encode_setup):
  cfg, params, refs, lengths, mem, pos = encode_setup
  for n in range(3):
    seq = np.concatenate([cfg.reference_prefix_ids, refs[n]])
    layers = _np_layer_qkv(params, cfg, seq, cfg.last_memory_layer + 1)
    for slot, layer in enumerate(cfg.memory_layers):
      _, _, k_rot, v = layers[layer]
      for hm, kv in enumerate(cfg.memory_heads):
        for j, position in enumerate(pos[n, slot, hm]):
          if position < 0:
            assert not mem[n, slot, :, hm, j].any()  # empty slots are zero
            continue
          scale = np.abs(k_rot[:, kv]).max()
          np.testing.assert_allclose(mem[n, slot, 0, hm, j], k_rot[position, kv],
                                     atol=1e-4 * scale)
          np.testing.assert_allclose(mem[n, slot, 1, hm, j], v[position, kv],
                                     atol=1e-4 * np.abs(v[:, kv]).max())


def test_encode_references_rejects_long_references(encode_setup):
  cfg, params, *_ = encode_setup
  too_long = jnp.zeros((1, cfg.reference_length + 1), jnp.int32)
  with pytest.raises(ValueError, match="reference_length"):
    Transformer(cfg).apply({"params": params}, too_long, jnp.array([1]),
                           method="encode_references")
