"""KV-cache decoding reproduces full-forward logits, with and without memories."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.model import kv_cache as decoding
from m3jax.core.config import load_config, model_config
from m3jax.model.transformer import Transformer, init_params


@pytest.fixture(scope="module")
def setup(repo_root):
  cfg = dataclasses.replace(model_config(load_config(str(repo_root / "configs" / "tiny.py"))),
                            init_std=0.1)
  return cfg, init_params(cfg, jax.random.key(0))


def _run(cfg, params, seqs, prompt_lengths, n_steps, memories=None, slot_mask=None):
  """Prefill right-padded prompts, then decode teacher-forced; logits per position."""
  model = Transformer(cfg)
  b = seqs.shape[0]
  t_prompt = int(max(prompt_lengths))
  prompts = np.where(np.arange(t_prompt)[None] < prompt_lengths[:, None], seqs[:, :t_prompt],
                     cfg.pad_id)
  cache = decoding.init_cache(cfg, b, seqs.shape[1], with_prefix=memories is not None,
                              with_memory=memories is not None)
  kw = {}
  if memories is not None:
    c = -(-t_prompt // cfg.chunk_length)
    kw = dict(memories=memories[:, :c], memory_mask=slot_mask[:, :c])
  prefill = jax.jit(lambda p, t, cache, n, **kw: model.apply(
      {"params": p}, t, cache, lengths=n, **kw, method="prefill"))
  logits, filled = prefill(params, prompts, cache, prompt_lengths, **kw)
  if memories is not None:  # the last-token-only variant (generation) agrees
    last, _ = jax.jit(lambda p, t, cache, n, **kw: model.apply(
        {"params": p}, t, cache, lengths=n, last_only=True, **kw, method="prefill"))(
            params, prompts, cache, prompt_lengths, **kw)
    np.testing.assert_allclose(last, logits[np.arange(b), prompt_lengths - 1], rtol=1e-5,
                               atol=1e-5)
  cache = filled
  out = np.full((b, seqs.shape[1], cfg.vocab_size), np.nan, np.float32)
  for i in range(b):
    out[i, :prompt_lengths[i]] = logits[i, :prompt_lengths[i]]
  step = jax.jit(lambda p, tok, cache, **kw: model.apply({"params": p}, tok, cache, **kw,
                                                          method="decode_step"))
  for _ in range(n_steps):
    index = np.asarray(cache.length)
    kw = {}
    if memories is not None:
      chunk = np.asarray(decoding.chunk_of_next_token(cfg, cache))
      np.testing.assert_array_equal(chunk, index // cfg.chunk_length)
      kw = dict(memories=memories[np.arange(b), chunk], memory_mask=slot_mask[np.arange(b), chunk])
    logits, cache = step(params, seqs[np.arange(b), index], cache, **kw)
    out[np.arange(b), index] = logits
  assert (np.asarray(cache.length) == prompt_lengths + n_steps).all()
  return out


def test_decode_matches_full_forward_without_memory(setup):
  cfg, params = setup
  seqs = np.random.default_rng(0).integers(5, cfg.vocab_size, (2, 26))
  lengths = np.array([10, 5])
  got = _run(cfg, params, seqs, lengths, n_steps=16)  # crosses position 16
  want = np.asarray(jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t))(params, seqs))
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(got[i, :n + 16], want[i, :n + 16], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_decode_matches_full_forward_with_memories(setup):
  cfg, params = setup
  rng = np.random.default_rng(1)
  b, t, lc = 2, 40, cfg.chunk_length
  c = -(-t // lc)
  seqs = rng.integers(5, cfg.vocab_size, (b, t))
  memories = rng.normal(size=(b, c, cfg.memories_per_chunk) + cfg.memory_shape).astype(np.float32)
  slot_mask = rng.random((b, c, cfg.memories_per_chunk, cfg.n_memory_layers,
                          cfg.n_memory_heads, cfg.memory_tokens_per_head)) > 0.25
  slot_mask[1, 0] = False  # one chunk without any memory
  lengths = np.array([20, 13])  # prompts spanning two chunks / ending inside the first
  got = _run(cfg, params, seqs, lengths, n_steps=20, memories=memories, slot_mask=slot_mask)
  want = np.asarray(jax.jit(lambda p, s, m, k: Transformer(cfg).apply(
      {"params": p}, s, memories=m, memory_mask=k))(params, seqs, memories, slot_mask))
  for i, n in enumerate(lengths):  # decoding crosses chunk boundaries at 16 and/or 32
    np.testing.assert_allclose(got[i, :n + 20], want[i, :n + 20], rtol=1e-4, atol=1e-4)
  # the memories matter: the prefix-only forward differs
  plain = np.asarray(Transformer(cfg).apply({"params": params}, seqs, with_prefix=True))
  assert np.abs(plain - want).max() > 1e-3


def test_cache_layout_and_misuse(setup):
  cfg, params = setup
  cache = decoding.init_cache(cfg, 3, 32, with_prefix=True)
  p = cfg.prefix_length
  assert len(cache.k) == len(cache.v) == cfg.n_layers
  assert cache.k[0].shape == (3, cfg.n_kv_heads, p + 32, cfg.head_dim)
  assert cache.max_length == 32 and decoding.position_offset(cfg, cache) == cfg.context_offset
  plain = decoding.init_cache(cfg, 3, 32, with_prefix=False)
  assert plain.slots == 32 and decoding.position_offset(cfg, plain) == 0
  mem = jnp.zeros((3, 2, cfg.memories_per_chunk) + cfg.memory_shape)
  with pytest.raises(ValueError, match="with_prefix=True"):
    Transformer(cfg).apply({"params": params}, jnp.zeros((3, 20), jnp.int32), plain,
                           memories=mem, method="prefill")
  with pytest.raises(ValueError, match="does not fit"):
    Transformer(cfg).apply({"params": params}, jnp.zeros((3, 33), jnp.int32), plain,
                           method="prefill")


def test_memories_sit_in_the_cache_after_the_context_slots(setup):
  """place_memories writes each memory layer's chunk memories once, as layer_memory lays
  them out, into N slots after the context; other layers have none."""
  from m3jax.model import attention as attn_lib
  cfg, params = setup
  b, m, n_ctx = 2, cfg.memories_per_chunk, 24
  cache = decoding.init_cache(cfg, b, n_ctx, with_prefix=True, with_memory=True)
  n = m * cfg.memory_tokens_per_head
  p = cfg.prefix_length
  assert cache.slots == p + n_ctx and cache.max_length == n_ctx
  for i in range(cfg.n_layers):
    extra = n if i in cfg.memory_layers else 0
    assert cache.k[i].shape == (b, cfg.n_kv_heads, p + n_ctx + extra, cfg.head_dim)
  assert cache.memory_valid.shape == (b, cfg.n_memory_layers, cfg.n_kv_heads, n)
  assert not cache.memory_valid.any()
  rng = np.random.default_rng(4)
  mem = rng.normal(size=(b, m) + cfg.memory_shape).astype(np.float32)
  mask = rng.random((b, m, cfg.n_memory_layers, cfg.n_memory_heads,
                     cfg.memory_tokens_per_head)) > 0.3
  placed = decoding.place_memories(cfg, cache, mem, mask)
  full = attn_lib.full_memory_mask(mask[:, None], mem[:, None].shape)
  for j, layer in enumerate(cfg.memory_layers):
    want = attn_lib.layer_memory(jnp.asarray(mem)[:, None], full, j, cfg.n_kv_heads,
                                 cfg.memory_heads, jnp.float32)
    np.testing.assert_array_equal(placed.k[layer][:, :, p + n_ctx:], want.keys[:, 0])
    np.testing.assert_array_equal(placed.v[layer][:, :, p + n_ctx:], want.values[:, 0])
    np.testing.assert_array_equal(placed.memory_valid[:, j], want.mask[:, 0])
    assert not np.asarray(placed.k[layer][:, :, :p + n_ctx]).any()  # context untouched
  # A decode step's masks: the context up to its slot, then the memory slots' validity.
  ctx, mem_masks = decoding.decode_masks(placed, jnp.asarray([p + 3, p + 5]))
  assert ctx.shape == (b, 1, p + n_ctx) and np.asarray(ctx[1, 0]).sum() == p + 6
  np.testing.assert_array_equal(mem_masks[:, :, :, 0, p + n_ctx:], placed.memory_valid)


def test_decode_placing_memories_once_per_chunk_equals_placing_them_every_step(setup):
  cfg, params = setup
  model = Transformer(cfg)
  rng = np.random.default_rng(5)
  b, t = 2, 12
  mem = rng.normal(size=(b, cfg.memories_per_chunk) + cfg.memory_shape).astype(np.float32)
  cache = decoding.init_cache(cfg, b, 16, with_prefix=True, with_memory=True)
  _, cache = model.apply({"params": params}, jnp.asarray(rng.integers(5, 99, (b, t))), cache,
                         method="prefill")
  step = jax.jit(lambda p, tok, c, m: model.apply({"params": p}, tok, c, memories=m,
                                                  method="decode_step"))
  once = jax.jit(lambda p, tok, c: model.apply({"params": p}, tok, c, method="decode_step"))
  toks = rng.integers(5, 99, (3, b))
  every, placed = cache, decoding.place_memories(cfg, cache, mem)
  for tok in toks:
    a, every = step(params, tok, every, mem)
    c, placed = once(params, tok, placed)
    np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="with_memory=True"):
    model.apply({"params": params}, toks[0],
                decoding.init_cache(cfg, b, 16, with_prefix=True), memories=mem,
                method="decode_step")
  with pytest.raises(ValueError, match="with_prefix=True"):
    decoding.init_cache(cfg, b, 16, with_prefix=False, with_memory=True)
