"""The backbone against Hugging Face Llama, and the memory entry points of the model."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.core.config import load_config, model_config
from m3jax.model.transformer import Transformer, init_params, window_memories


@pytest.fixture(scope="module")
def cfg(repo_root):
  return dataclasses.replace(model_config(load_config(str(repo_root / "configs" / "tiny.py"))),
                             init_std=0.1)


@functools.lru_cache(maxsize=None)
def _params(cfg, seed=0):
  """Random params, norm scales perturbed away from 1 so they are tested too."""
  params = init_params(cfg, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, a: a + 0.2 * rng.normal(size=a.shape).astype(np.float32)
      if "scale" in jax.tree_util.keystr(path) else a, params)


@functools.lru_cache(maxsize=None)
def _forward(cfg, with_prefix=None, mutable=False):
  """Jitted LM forward, shared across tests (same shapes -> one compile)."""
  model = Transformer(cfg)
  static = dict(with_prefix=with_prefix, mutable=["intermediates"] if mutable else False)
  return jax.jit(lambda p, tokens, **kw: model.apply({"params": p}, tokens, **kw, **static))


B, T = 2, 32  # two chunks of the tiny config


def _tokens(cfg, seed, shape=(B, T)):
  return jnp.asarray(np.random.default_rng(seed).integers(5, cfg.vocab_size, shape), jnp.int32)


def _hf_model(cfg, params):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.set_num_threads(1)  # the 2 shared cores: thread spinning only slows it down
  hf_cfg = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
      tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=512)
  model = transformers.LlamaForCausalLM(hf_cfg).eval()
  p = jax.tree_util.tree_map(np.asarray, params)
  t = lambda a: torch.tensor(np.ascontiguousarray(a))
  sd = {"model.embed_tokens.weight": t(p["embed"]["embedding"]),
        "model.norm.weight": t(p["final_norm"]["scale"])}
  if not cfg.tie_embeddings:
    sd["lm_head.weight"] = t(p["lm_head"]["kernel"].T)
  for i in range(cfg.n_layers):
    lp, pre = p[f"layers_{i}"], f"model.layers.{i}."
    for name in "qkv":
      w = lp["attn"][name]["kernel"]
      sd[pre + f"self_attn.{name}_proj.weight"] = t(w.reshape(w.shape[0], -1).T)
    o = lp["attn"]["o"]["kernel"]
    sd[pre + "self_attn.o_proj.weight"] = t(o.reshape(-1, o.shape[-1]).T)
    for name in ("gate", "up", "down"):
      sd[pre + f"mlp.{name}_proj.weight"] = t(lp["mlp"][name]["kernel"].T)
    sd[pre + "input_layernorm.weight"] = t(lp["attn_norm"]["scale"])
    sd[pre + "post_attention_layernorm.weight"] = t(lp["mlp_norm"]["scale"])
  missing, unexpected = model.load_state_dict(sd, strict=False)
  assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
  return model


def _hf_logits(model, tokens, position_ids=None):
  import torch
  with torch.no_grad():
    kwargs = {} if position_ids is None else {"position_ids": torch.tensor(position_ids)}
    return model(torch.tensor(np.asarray(tokens)), **kwargs).logits.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_logits_match_hf_llama_without_memory(cfg, tied):
  cfg = dataclasses.replace(cfg, tie_embeddings=tied)
  params = _params(cfg)
  assert ("lm_head" in params) != tied
  tokens = _tokens(cfg, 1)
  ours = _forward(cfg)(params, tokens)
  np.testing.assert_allclose(np.asarray(ours), _hf_logits(_hf_model(cfg, params), tokens),
                             rtol=1e-4, atol=1e-4)


def test_prefix_is_prepended_at_positions_before_the_context_offset(cfg):
  params = _params(cfg)
  tokens = _tokens(cfg, 2)
  ours = _forward(cfg, with_prefix=True)(params, tokens)
  p = cfg.prefix_length
  full = np.concatenate([np.tile(cfg.reference_prefix_ids, (B, 1)), tokens], axis=1)
  positions = np.concatenate([np.arange(p), cfg.context_offset + np.arange(T)])
  want = _hf_logits(_hf_model(cfg, params), full, np.tile(positions, (B, 1)))[:, p:]
  np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-4, atol=1e-4)


def test_attention_mask_hides_padding_keys(cfg):
  params = _params(cfg)
  tokens = np.array(_tokens(cfg, 10))
  tokens[1, 3:] = tokens[0, 3:]  # same text after 3 different (masked) tokens
  keep = np.ones((B, T), bool)
  keep[:, :3] = False
  got = np.asarray(_forward(cfg)(params, tokens, attention_mask=keep))
  np.testing.assert_allclose(got[0, 3:], got[1, 3:], rtol=1e-5, atol=1e-5)
  unmasked = np.asarray(_forward(cfg)(params, tokens))
  assert np.abs(unmasked[0, 3:] - unmasked[1, 3:]).max() > 1e-3


def _random_memories(cfg, seed=0, c=T // 16):
  rng = np.random.default_rng(seed)
  shape = (B, c, cfg.memories_per_chunk) + cfg.memory_shape
  return jnp.asarray(rng.normal(size=shape).astype(np.float32))


def _present(cfg, value=True):
  return jnp.full((B, T // cfg.chunk_length, cfg.memories_per_chunk), value)


def test_all_memories_masked_equals_prefix_only_forward(cfg):
  params = _params(cfg)
  tokens = _tokens(cfg, 3)
  forward = _forward(cfg)
  masked = forward(params, tokens, memories=_random_memories(cfg),
                   memory_mask=_present(cfg, False))
  prefix_only = _forward(cfg, with_prefix=True)(params, tokens)
  np.testing.assert_allclose(np.asarray(masked), np.asarray(prefix_only), rtol=1e-5, atol=1e-5)
  unmasked = forward(params, tokens, memories=_random_memories(cfg), memory_mask=_present(cfg))
  assert np.abs(np.asarray(unmasked) - np.asarray(prefix_only)).max() > 1e-3


def test_memories_of_a_chunk_do_not_reach_earlier_chunks(cfg):
  params = _params(cfg)
  lc = cfg.chunk_length
  tokens = _tokens(cfg, 4)
  mem = _random_memories(cfg)
  changed = mem.at[:, 1].set(_random_memories(cfg, seed=9)[:, 1])
  forward = _forward(cfg)
  a = np.asarray(forward(params, tokens, memories=mem, memory_mask=_present(cfg)))
  b = np.asarray(forward(params, tokens, memories=changed, memory_mask=_present(cfg)))
  np.testing.assert_array_equal(a[:, :lc], b[:, :lc])
  assert np.abs(a[:, lc:] - b[:, lc:]).max() > 1e-3


def test_memory_attention_mass_is_sown_per_memory_layer(cfg):
  params = _params(cfg)
  _, state = _forward(cfg, mutable=True)(params, _tokens(cfg, 5), memories=_random_memories(cfg),
                                         memory_mask=_present(cfg))
  sown = state["intermediates"]
  assert sorted(sown) == [f"layers_{i}" for i in cfg.memory_layers]
  (mass,) = sown["layers_0"]["attn"]["memory_attention_mass"]
  assert mass.shape == (B, T) and 0 < float(mass.min()) and float(mass.max()) < 1


def test_bad_memory_shape_names_the_fields(cfg):
  params = _params(cfg)
  tokens = _tokens(cfg, 0)
  with pytest.raises(ValueError, match="memory_tokens_per_head"):
    Transformer(cfg).apply({"params": params}, tokens, memories=_random_memories(cfg, c=1))
  with pytest.raises(ValueError, match="with_prefix"):
    Transformer(cfg).apply({"params": params}, tokens, memories=_random_memories(cfg),
                           with_prefix=False)


def test_window_memories_gives_chunk_c_the_references_of_c_minus_m():
  b, c, w = 2, 5, 3
  mem = jnp.arange(b * c, dtype=jnp.float32).reshape(b, c, 1, 1) + 1
  valid = jnp.ones((b, c), bool).at[1, 2].set(False)
  out, mask = window_memories(mem, valid, w)
  assert out.shape == (b, c, w, 1, 1) and mask.shape == (b, c, w)
  for bi in range(b):
    for ci in range(c):
      for m in range(w):
        src = ci - m
        if src < 0:
          assert not mask[bi, ci, m] and out[bi, ci, m, 0, 0] == 0
        else:
          assert out[bi, ci, m, 0, 0] == mem[bi, src, 0, 0]
          assert mask[bi, ci, m] == (not (bi == 1 and src == 2))
  fine = jnp.ones((b, c, 2, 1, 4), bool)
  assert window_memories(mem, fine, w)[1].shape == (b, c, w, 2, 1, 4)


def test_memories_from_references_masks_empty_slots_and_missing_references(cfg):
  params = _params(cfg)
  rng = np.random.default_rng(6)
  refs = jnp.asarray(rng.integers(5, cfg.vocab_size, (1, 2, cfg.reference_length)))
  lengths = jnp.array([[2, 0]])  # chunk 0: 2 tokens (< k), chunk 1: no reference
  mem, mask = jax.jit(lambda p, r, n: Transformer(cfg).apply(
      {"params": p}, r, n, method="memories_from_references"))(params, refs, lengths)
  m, k = cfg.memories_per_chunk, cfg.memory_tokens_per_head
  assert mem.shape == (1, 2, m) + cfg.memory_shape
  assert mask.shape == (1, 2, m, cfg.n_memory_layers, cfg.n_memory_heads, k)
  assert mask[0, 0, 0, ..., :2].all() and not mask[0, 0, 0, ..., 2:].any()
  assert not mask[0, 1, 0].any()  # chunk 1's own reference is missing
  assert mask[0, 1, 1, ..., :2].all()  # ... but it sees chunk 0's
  assert not mask[:, :, 2:].any()


@pytest.mark.slow
def test_gradient_through_memories_and_reference_encoding_is_finite(cfg):
  model = Transformer(cfg)
  c = 2

  def loss(params, tokens, refs, lengths):
    mem, mask = model.apply({"params": params}, refs, lengths, method="memories_from_references")
    logits = model.apply({"params": params}, tokens, memories=mem, memory_mask=mask)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

  rng = np.random.default_rng(7)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, c * cfg.chunk_length)))
  refs = jnp.asarray(rng.integers(5, cfg.vocab_size, (2, c, cfg.reference_length)))
  lengths = jnp.array([[cfg.reference_length, 7], [0, 12]])
  grads = jax.jit(jax.grad(loss))(_params(cfg), tokens, refs, lengths)
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert all(float(jnp.abs(g).max()) > 0 for g in leaves)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [False, True], ids=["through", "stopped"])
def test_stop_gradient_cuts_reference_encoding_from_the_graph(cfg, stop):
  model = Transformer(cfg)
  refs = jnp.asarray(np.random.default_rng(8).integers(5, cfg.vocab_size, (1, 2, 8)))

  def f(params):
    mem, _ = model.apply({"params": params}, refs, jnp.array([[8, 5]]), stop_gradient=stop,
                         method="memories_from_references")
    return jnp.sum(mem ** 2)

  g = jax.jit(jax.grad(f))(_params(cfg))
  norm = sum(float(jnp.abs(x).sum()) for x in jax.tree_util.tree_leaves(g))
  assert (norm == 0) == stop


@pytest.mark.slow
def test_remat_policies_give_the_same_gradient(cfg):
  params = _params(cfg)
  tokens = _tokens(cfg, 8, (1, 16))

  def grad(policy):
    model = Transformer(dataclasses.replace(cfg, remat_policy=policy))
    f = lambda p: model.apply({"params": p}, tokens, with_prefix=True).sum()
    return jax.jit(jax.grad(f))(params)

  for a, b in zip(jax.tree_util.tree_leaves(grad("none")), jax.tree_util.tree_leaves(grad("full"))):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max())


def test_bfloat16_compute_keeps_float32_params_and_logits(cfg):
  cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
  params = _params(cfg)
  tokens = _tokens(cfg, 9)
  lo = _forward(cfg16)(params, tokens)
  hi = _forward(cfg)(params, tokens)
  assert lo.dtype == jnp.float32
  assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(params))
  assert np.abs(np.asarray(lo) - np.asarray(hi)).max() < 0.1 * np.abs(np.asarray(hi)).max()
