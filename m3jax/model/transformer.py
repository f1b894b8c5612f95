"""The Memory³ transformer: a Llama backbone whose memory layers read explicit memories.

One Flax module, `Transformer(config)`, with four entry points on the same
parameters (call them with `model.apply(variables, ..., method=...)`):

- `__call__`: language-model logits for context tokens, optionally with per-chunk
  memories. With memories (or `with_prefix=True`) the `<s>Reference:` prefix is
  prepended internally (every layer, every head: the attention sink) and the
  context starts at rotary position `config.context_offset`.
- `encode_references`: references -> sparse memories (layers up to the last memory
  layer only; top-k tokens per memory layer and KV head, see `m3jax.model.sparsify`).
- `memories_from_references`: encode + window, for continual training inside the
  jitted step.
- `prefill` / `decode_step`: incremental decoding with a `m3jax.model.kv_cache.KVCache`.

Semantics when memory is off equal Hugging Face `LlamaForCausalLM` (parameter
tree and logical axis names in docs/architecture.md). Parameters are float32; activations
use `config.dtype`; norms and softmax run in float32; logits are float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m3jax.model import attention as attn_lib
from m3jax.model import attention_impls
from m3jax.model import rope
from m3jax.model import sparsify
from m3jax.core.config import ModelConfig
from m3jax.model.dtypes import JNP_DTYPES
from m3jax.model.kv_cache import KVCache, position_offset

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Logical axes of activations.
_EMBED_ACT = ("batch", "length", "embed")
_HEADS_ACT = ("batch", "length", "heads", "head_dim")
_KV_ACT = ("batch", "length", "kv_heads", "head_dim")
_MLP_ACT = ("batch", "length", "mlp")
_LOGITS_ACT = ("batch", "length", "vocab")
_MEMORY_ACT = ("batch", None, "kv_heads", "mem_tokens", "head_dim")


def _constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint; a no-op unless axis rules and a mesh are active."""
  return nn.with_logical_constraint(x, tuple(axes))


@dataclasses.dataclass(frozen=True)
class Mode:
  """Static (hashable) options of one pass through a block.

  query_offset: queries before it are the prefix and see no memory.
  chunk_length: queries are grouped into memory chunks of this many tokens.
  decode: write one token per sequence at its cache slot and attend over the cache.
  select: this layer sparsifies its keys/values into a memory (encoding).
  """
  query_offset: int = 0
  chunk_length: int = 1
  decode: bool = False
  select: bool = False


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) * scale, in float32; returns the compute dtype."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), JNP_DTYPES[cfg.param_dtype])
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
    return (y * scale.astype(jnp.float32)).astype(JNP_DTYPES[cfg.dtype])


class Projection(nn.Module):
  """A bias-free linear map `einsum(equation, x, kernel)` with a logically named kernel."""
  config: ModelConfig
  shape: tuple[int, ...]
  axes: tuple[str, ...]
  equation: str
  out_dtype: Any = None  # None: compute dtype; float32 for logits

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), self.axes)
    kernel = self.param("kernel", init, self.shape, JNP_DTYPES[cfg.param_dtype])
    dt = JNP_DTYPES[cfg.dtype]
    return jnp.einsum(self.equation, x.astype(dt), kernel.astype(dt),
                      preferred_element_type=self.out_dtype)


class Embed(nn.Module):
  """Token embedding [V, D]; `attend` gives tied-embedding logits x @ E^T (float32)."""
  config: ModelConfig

  def setup(self):
    cfg = self.config
    init = nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), ("vocab", "embed"))
    self.embedding = self.param("embedding", init, (cfg.vocab_size, cfg.d_model),
                                JNP_DTYPES[cfg.param_dtype])

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding, tokens, axis=0).astype(JNP_DTYPES[self.config.dtype])

  def attend(self, x: jax.Array) -> jax.Array:
    emb = self.embedding.astype(JNP_DTYPES[self.config.dtype])
    return jnp.einsum("btd,vd->btv", x, emb, preferred_element_type=jnp.float32)


class Attention(nn.Module):
  """GQA self-attention with rotary embedding, KV cache, memory block and sparsification."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, memory, cache, slot, select_valid, mode: Mode):
    cfg = self.config
    d, h, h_kv, dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q = Projection(cfg, (d, h, dh), ("embed", "heads", "head_dim"), "btd,dhk->bthk", name="q")(x)
    k = Projection(cfg, (d, h_kv, dh), ("embed", "kv_heads", "head_dim"), "btd,dhk->bthk",
                   name="k")(x)
    v = Projection(cfg, (d, h_kv, dh), ("embed", "kv_heads", "head_dim"), "btd,dhk->bthk",
                   name="v")(x)
    q, k, v = _constrain(q, _HEADS_ACT), _constrain(k, _KV_ACT), _constrain(v, _KV_ACT)
    q_rot = rope.apply_rope(q, positions, cfg.rope_theta)
    k_rot = rope.apply_rope(k, positions, cfg.rope_theta)

    selected = None
    if mode.select:
      selected = sparsify.select_memory_tokens(q, k, k_rot, v, select_valid, positions,
                                               cfg.memory_tokens_per_head, cfg.memory_heads)

    keys, values, new_cache = k_rot, v, None
    if cache is not None:
      ck, cv = cache
      if mode.decode:  # one new token per sequence, at its own slot (in place)
        rows = jnp.arange(ck.shape[0])
        ck = ck.at[rows, slot].set(k_rot[:, 0].astype(ck.dtype))
        cv = cv.at[rows, slot].set(v[:, 0].astype(cv.dtype))
        keys, values = ck.astype(k_rot.dtype), cv.astype(v.dtype)
      else:  # prefill: the whole (prefix +) prompt from slot 0
        ck = jax.lax.dynamic_update_slice_in_dim(ck, k_rot.astype(ck.dtype), 0, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), 0, axis=1)
      new_cache = (ck, cv)

    want_mass = memory is not None and self.is_mutable_collection("intermediates")
    out, mass = attention_impls.attend(cfg, q_rot, keys, values, mask, memory,
                                       query_offset=mode.query_offset,
                                       chunk_length=mode.chunk_length,
                                       memory_heads=cfg.memory_heads,
                                       return_memory_mass=want_mass)
    if mass is not None:
      self.sow("intermediates", "memory_attention_mass", mass[:, mode.query_offset:])
    out = Projection(cfg, (h, dh, d), ("heads", "head_dim", "embed"), "bthk,hkd->btd",
                     name="o")(_constrain(out, _HEADS_ACT))
    return _constrain(out, _EMBED_ACT), new_cache, selected


class MLP(nn.Module):
  """SwiGLU: down(silu(gate x) * up x)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    d, f = cfg.d_model, cfg.mlp_dim
    gate = Projection(cfg, (d, f), ("embed", "mlp"), "btd,df->btf", name="gate")(x)
    up = Projection(cfg, (d, f), ("embed", "mlp"), "btd,df->btf", name="up")(x)
    hidden = _constrain(jax.nn.silu(gate) * up, _MLP_ACT)
    out = Projection(cfg, (f, d), ("mlp", "embed"), "btf,fd->btd", name="down")(hidden)
    return _constrain(out, _EMBED_ACT)


class Block(nn.Module):
  """Pre-norm decoder layer. Returns (x, updated layer cache or None, memory or None)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask, memory, cache, slot, select_valid, mode: Mode):
    cfg = self.config
    attn_out, new_cache, selected = Attention(cfg, name="attn")(
        RMSNorm(cfg, name="attn_norm")(x), positions, mask, memory, cache, slot, select_valid,
        mode)
    x = x + attn_out
    x = x + MLP(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x))
    return x, new_cache, selected


def _block_class(policy: str):
  """Block, wrapped in nn.remat with the configured checkpoint policy."""
  if policy == "none":
    return Block
  if policy not in _REMAT_POLICIES:
    raise ValueError(f"model.remat_policy: unknown policy {policy!r}")
  # Argument 8 (counting self) is the static Mode.
  return nn.remat(Block, policy=_REMAT_POLICIES[policy], prevent_cse=True, static_argnums=(8,))


class Transformer(nn.Module):
  """Llama decoder with Memory³ explicit memory (see module docstring)."""
  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.embed = Embed(cfg)
    block = _block_class(cfg.remat_policy)
    self.layers = [block(cfg) for _ in range(cfg.n_layers)]  # named layers_{i}
    self.final_norm = RMSNorm(cfg)
    if not cfg.tie_embeddings:
      self.lm_head = Projection(cfg, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                "btd,dv->btv", out_dtype=jnp.float32)

  # ------------------------------------------------------------------ pieces

  def _prefixed(self, tokens: jax.Array, with_prefix: bool):
    """Embeds (prefix +) tokens; returns x, positions [1, P+T], prefix length P."""
    cfg = self.config
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    if with_prefix:
      p = cfg.prefix_length
      prefix = jnp.broadcast_to(jnp.asarray(cfg.reference_prefix_ids, jnp.int32), (b, p))
      tokens = jnp.concatenate([prefix, tokens], axis=1)
      positions = np.concatenate([np.arange(p), cfg.context_offset + np.arange(t)])
    else:
      p = 0
      positions = np.arange(t)
    x = _constrain(self.embed(tokens), _EMBED_ACT)
    return x, jnp.asarray(positions, jnp.int32)[None], p

  def _check_memories(self, memories, memory_mask, n_tokens: int, batch: int,
                      n_chunks: int | None = None):
    """Validates [B, C, M, L_mem, 2, H_mem, k, d] memories; returns them and a full mask."""
    cfg = self.config
    if cfg.n_memory_layers == 0:
      raise ValueError("memories given but model.memory_layers is empty")
    memories = jnp.asarray(memories)
    want_c = n_chunks if n_chunks is not None else -(-n_tokens // cfg.chunk_length)
    if (memories.ndim != 8 or memories.shape[0] != batch or memories.shape[1] != want_c
        or memories.shape[3:] != cfg.memory_shape):
      raise ValueError(
          f"memories have shape {memories.shape}; expected [B={batch}, C={want_c}, M, "
          f"L_mem, 2, H_mem, k, d_h] with (L_mem, 2, H_mem, k, d_h) = {cfg.memory_shape} "
          f"(model.memory_layers / memory_heads / memory_tokens_per_head / head_dim)")
    mask = attn_lib.full_memory_mask(memory_mask, memories.shape)
    return memories, mask

  def _layers(self, x, positions, mask, mode: Mode, *, memories=None, memory_mask=None,
              cache: KVCache | None = None, slot=None, select_valid=None,
              n_layers: int | None = None):
    """Runs layers 0..n_layers-1; returns (x, (k, v) per-layer caches or None, memories)."""
    cfg = self.config
    mem_slot = {layer: i for i, layer in enumerate(cfg.memory_layers)}
    ck, cv = (list(cache.k), list(cache.v)) if cache is not None else (None, None)
    selected = []
    for i in range(cfg.n_layers if n_layers is None else n_layers):
      memory = None
      if memories is not None and i in mem_slot:
        memory = attn_lib.layer_memory(memories, memory_mask, mem_slot[i], cfg.n_kv_heads,
                                       cfg.memory_heads, JNP_DTYPES[cfg.dtype])
        memory = attn_lib.MemoryKV(_constrain(memory.keys, _MEMORY_ACT),
                                   _constrain(memory.values, _MEMORY_ACT), memory.mask)
      layer_mode = dataclasses.replace(mode, select=mode.select and i in mem_slot)
      layer_cache = (ck[i], cv[i]) if cache is not None else None
      x, new_cache, sel = self.layers[i](x, positions, mask, memory, layer_cache, slot,
                                         select_valid if layer_mode.select else None, layer_mode)
      if new_cache is not None:
        ck[i], cv[i] = new_cache
      if sel is not None:
        selected.append(sel)
    return x, ((tuple(ck), tuple(cv)) if cache is not None else None), selected

  def _logits(self, x: jax.Array) -> jax.Array:
    x = self.final_norm(x)
    if self.config.tie_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.lm_head(x)
    return _constrain(logits, _LOGITS_ACT)

  # ------------------------------------------------------------------ entry points

  def __call__(self, tokens: jax.Array, *, memories: jax.Array | None = None,
               memory_mask: jax.Array | None = None, with_prefix: bool | None = None,
               attention_mask: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V] (float32) for context tokens [B, T].

    Args:
      tokens: [B, T] context token ids (memory on: starts with <s>, the separator).
      memories: [B, C, M, L_mem, 2, H_mem, k, d_h], C = ceil(T / chunk_length):
        chunk c's queries see memories [:, c]. None = no memory.
      memory_mask: None (all present), [B, C, M], or broadcastable to
        [B, C, M, L_mem, H_mem, k] (True = present; mask empty slots of short
        references with `positions >= 0` from `encode_references`).
      with_prefix: prepend the `<s>Reference:` sink and shift the context to
        `context_offset` (default: whether memories are given). Required with memories.
      attention_mask: optional [B, T] bool, False for padding keys (e.g. left padding).
    """
    cfg = self.config
    b, t = tokens.shape
    with_prefix = memories is not None if with_prefix is None else with_prefix
    if memories is not None and not with_prefix:
      raise ValueError("memories need the reference prefix: with_prefix=False is not allowed "
                       "with memories (their keys sit at positions after the prefix)")
    if memories is not None:
      memories, memory_mask = self._check_memories(memories, memory_mask, t, b)
    x, positions, p = self._prefixed(tokens, with_prefix)
    keys_ok = None
    if attention_mask is not None:
      keys_ok = jnp.concatenate([jnp.ones((b, p), bool), attention_mask.astype(bool)], axis=1)
    mask = attn_lib.causal_slot_mask(p + t, keys_ok)  # no [T, T] array (blockwise attention)
    x, _, _ = self._layers(x, positions, mask, Mode(query_offset=p, chunk_length=cfg.chunk_length),
                           memories=memories, memory_mask=memory_mask)
    return self._logits(x[:, p:])

  def encode_references(self, ref_tokens: jax.Array,
                        ref_lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Encodes references into sparse memories.

    The sequence `<s>Reference:` + reference runs causally at positions 0.. through
    layers 0..last memory layer only. In each memory layer and memory KV head the
    `memory_tokens_per_head` best tokens (m3jax.model.sparsify) are kept with their keys
    after rotary embedding (positions P + j) and their values.

    Args:
      ref_tokens: [N, R] int, right-padded (R <= model.reference_length).
      ref_lengths: [N] int, real tokens per reference (0 = no reference).

    Returns:
      memories [N, L_mem, 2, H_mem, k, d_h] (compute dtype; zeros in empty slots)
      and positions [N, L_mem, H_mem, k] int32: rotary position P + j of each kept
      token (j = index in the reference), ascending, -1 for empty slots.
    """
    cfg = self.config
    n, r = ref_tokens.shape
    if cfg.n_memory_layers == 0:
      raise ValueError("encode_references: model.memory_layers is empty")
    if r > cfg.reference_length:
      raise ValueError(f"references have {r} tokens > model.reference_length="
                       f"{cfg.reference_length}; memories would overlap the context positions")
    p = cfg.prefix_length
    prefix = jnp.broadcast_to(jnp.asarray(cfg.reference_prefix_ids, jnp.int32), (n, p))
    tokens = jnp.concatenate([prefix, jnp.asarray(ref_tokens, jnp.int32)], axis=1)
    x = _constrain(self.embed(tokens), _EMBED_ACT)
    positions = jnp.arange(p + r, dtype=jnp.int32)[None]
    valid = jnp.arange(r)[None, :] < jnp.asarray(ref_lengths)[:, None]
    valid = jnp.concatenate([jnp.zeros((n, p), bool), valid], axis=1)
    _, _, selected = self._layers(x, positions, attn_lib.causal_slot_mask(p + r),
                                  Mode(select=True), select_valid=valid,
                                  n_layers=cfg.last_memory_layer + 1)
    memories = jnp.stack([m for m, _ in selected], axis=1)
    kept = jnp.stack([pos for _, pos in selected], axis=1)
    return memories, kept

  def memories_from_references(self, ref_tokens: jax.Array, ref_lengths: jax.Array, *,
                               window: int | None = None,
                               stop_gradient: bool = False) -> tuple[jax.Array, jax.Array]:
    """Per-chunk references -> windowed memories for `__call__` (continual training).

    Args:
      ref_tokens: [B, C, R] the reference retrieved for each chunk (right-padded).
      ref_lengths: [B, C] its length; 0 where the chunk has no reference.
      window: memories per chunk M (default model.memories_per_chunk): chunk c sees
        the references of chunks c, c-1, ..., c-M+1.
      stop_gradient: cut gradients through reference encoding (cheaper backward).

    Returns:
      memories [B, C, M, L_mem, 2, H_mem, k, d_h] and mask [B, C, M, L_mem, H_mem, k].
    """
    b, c, r = ref_tokens.shape
    mem, pos = self.encode_references(ref_tokens.reshape(b * c, r), ref_lengths.reshape(b * c))
    mem = mem.reshape((b, c) + mem.shape[1:])
    valid = (pos >= 0).reshape((b, c) + pos.shape[1:])
    if stop_gradient:
      mem = jax.lax.stop_gradient(mem)
    return window_memories(mem, valid, window or self.config.memories_per_chunk)

  def prefill(self, tokens: jax.Array, cache: KVCache, *, lengths: jax.Array | None = None,
              memories: jax.Array | None = None, memory_mask: jax.Array | None = None,
              last_only: bool = False) -> tuple[jax.Array, KVCache]:
    """Runs a prompt into an EMPTY cache; returns (logits, cache).

    tokens [B, T] may be right-padded; `lengths` [B] (default T) says how many are
    real, and decoding continues after them. Memories as in `__call__` (one set
    per prompt chunk); they require a cache made with `with_prefix=True`.
    Logits are [B, T, V], or [B, V] at each row's last real token with
    `last_only=True` (skips the LM head elsewhere).
    """
    cfg = self.config
    b, t = tokens.shape
    with_prefix = cache.prefix_length > 0
    if memories is not None:
      if not with_prefix:
        raise ValueError("prefill with memories needs a cache made with with_prefix=True")
      memories, memory_mask = self._check_memories(memories, memory_mask, t, b)
    if cache.prefix_length + t > cache.slots:
      raise ValueError(f"prompt of {t} tokens does not fit a cache of {cache.max_length}")
    x, positions, p = self._prefixed(tokens, with_prefix)
    x, (k, v), _ = self._layers(x, positions, attn_lib.causal_slot_mask(p + t),
                                Mode(query_offset=p, chunk_length=cfg.chunk_length),
                                memories=memories, memory_mask=memory_mask, cache=cache)
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    if last_only:
      last = jnp.take_along_axis(x, (p + lengths - 1)[:, None, None], axis=1)
      return self._logits(last)[:, 0], cache.replace(k=k, v=v, length=lengths)
    return self._logits(x[:, p:]), cache.replace(k=k, v=v, length=lengths)

  def decode_step(self, tokens: jax.Array, cache: KVCache, *, memories: jax.Array | None = None,
                  memory_mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
    """Appends one token per sequence; returns (logits [B, V], cache).

    tokens [B] sit at context index `cache.length`. memories [B, M, L_mem, 2, H_mem,
    k, d_h] are those of that token's chunk (`decoding.chunk_of_next_token`),
    memory_mask [B, M] or broadcastable to [B, M, L_mem, H_mem, k]. The caller
    keeps `cache.length < cache.max_length` (writes past the end are dropped).
    """
    cfg = self.config
    b = tokens.shape[0]
    if memories is not None:
      if not cache.prefix_length:
        raise ValueError("decode_step with memories needs a cache made with with_prefix=True")
      memories = jnp.asarray(memories)[:, None]
      if memory_mask is not None:
        memory_mask = jnp.asarray(memory_mask)[:, None]
      memories, memory_mask = self._check_memories(memories, memory_mask, 1, b, n_chunks=1)
    slot = cache.prefix_length + cache.length  # [B]
    positions = (position_offset(cfg, cache) + cache.length)[:, None].astype(jnp.int32)
    x = _constrain(self.embed(jnp.asarray(tokens, jnp.int32)[:, None]), _EMBED_ACT)
    mask = (jnp.arange(cache.slots)[None, :] <= slot[:, None])[:, None, :]  # [B, 1, S]
    x, (k, v), _ = self._layers(x, positions, mask, Mode(chunk_length=1, decode=True),
                                memories=memories, memory_mask=memory_mask, cache=cache,
                                slot=slot)
    return self._logits(x)[:, 0], cache.replace(k=k, v=v, length=cache.length + 1)


def window_memories(chunk_memories: jax.Array, chunk_valid: jax.Array,
                    window: int) -> tuple[jax.Array, jax.Array]:
  """Per-chunk memories [B, C, ...] -> each chunk's window [B, C, M, ...] + mask.

  Slot m of chunk c holds the memory of chunk c - m (m = 0 is the chunk's own
  reference); slots before the first chunk are zero and masked. chunk_valid is
  [B, C] or finer [B, C, L_mem, H_mem, k]; the mask comes out [B, C, M] or
  [B, C, M, L_mem, H_mem, k] accordingly. A static loop over M slots, not chunks.
  """
  c = chunk_memories.shape[1]
  if chunk_valid.shape[:2] != chunk_memories.shape[:2]:
    raise ValueError(f"chunk_valid {chunk_valid.shape} does not match chunk_memories "
                     f"{chunk_memories.shape} in [B, C]")

  def shift(x, m):
    if m >= c:
      return jnp.zeros_like(x)
    return jnp.pad(x[:, :c - m], [(0, 0), (m, 0)] + [(0, 0)] * (x.ndim - 2))

  mems = jnp.stack([shift(chunk_memories, m) for m in range(window)], axis=2)
  valid = jnp.stack([shift(chunk_valid.astype(bool), m) for m in range(window)], axis=2)
  return mems, valid


@functools.lru_cache(maxsize=8)
def _jitted_init(config: ModelConfig):
  tokens = np.zeros((1, config.chunk_length), np.int32)  # numpy: safe to cache under a trace
  return jax.jit(lambda r: nn.unbox(Transformer(config).init(r, tokens)["params"]))


def init_params(config: ModelConfig, rng: jax.Array) -> dict:
  """Fresh float32 parameters (unboxed), the tree of docs/architecture.md (single device;
  see `m3jax.model.sharding.init_params` for parameters born sharded)."""
  return _jitted_init(config)(rng)
