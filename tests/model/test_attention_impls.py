"""Every attention implementation that runs on CPU equals `attention.attend` (forward, grads),
and the implementation is chosen by config with a clear error where a kernel cannot run."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.core.config import ConfigError, load_config, model_config
from m3jax.model import attention as attn_lib
from m3jax.model import attention_impls
from m3jax.model.attention_blockwise import attend_blockwise
from m3jax.model.attention_fused import attend_pallas_tpu
from m3jax.model.transformer import Transformer, init_params

B, D = 2, 8
P, T, LC = 2, 37, 8  # prefix, context (last chunk partial), chunk length
C, M, K = -(-T // LC), 2, 3  # chunks, memories per chunk, tokens per memory head
BLOCKS = dict(block_q=16, block_kv=8)  # several blocks, partial last ones


def _arrays(h, h_kv, memory_heads, dtype=jnp.float32, seed=0, tq=P + T, s=P + T):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, tq, h, D)), dtype)
  k = jnp.asarray(rng.normal(size=(B, s, h_kv, D)), dtype)
  v = jnp.asarray(rng.normal(size=(B, s, h_kv, D)), dtype)
  memory = None
  if memory_heads is not None:
    c = C if tq > 1 else 1
    memories = rng.normal(size=(B, c, M, 1, 2, len(memory_heads), K, D)).astype(np.float32)
    slot_mask = rng.random((B, c, M, 1, len(memory_heads), K)) > 0.3  # empty slots
    slot_mask[0, 0] = False  # a chunk with no memory at all
    memory = attn_lib.layer_memory(jnp.asarray(memories),
                                   attn_lib.full_memory_mask(slot_mask, memories.shape), 0,
                                   h_kv, memory_heads, dtype)
  return q, k, v, memory


def _run(impl, q, k, v, memory, mask, **kw):
  fn = {"reference": attn_lib.attend,
        "blockwise": functools.partial(attend_blockwise, **BLOCKS),
        "pallas_tpu": attend_pallas_tpu}[impl]
  return jax.jit(lambda *a: fn(*a, **kw))(q, k, v, mask, memory)


def _assert_parity(q, k, v, memory, mask, rtol=2e-5, atol=2e-5, impl="blockwise", **kw):
  """Outputs, memory mass and gradients (q, k, v, memory keys and values) agree."""
  want_mass = memory is not None
  ref, ref_mass = _run("reference", q, k, v, memory, mask, return_memory_mass=want_mass, **kw)
  out, mass = _run(impl, q, k, v, memory, mask, return_memory_mass=want_mass, **kw)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32),
                             rtol=rtol, atol=atol)
  if want_mass:
    np.testing.assert_allclose(mass, ref_mass, rtol=rtol, atol=atol)
  w = jnp.asarray(np.random.default_rng(1).normal(size=ref.shape), jnp.float32)

  def loss(impl, q, k, v, mk, mv):
    mem = None if memory is None else attn_lib.MemoryKV(mk, mv, memory.mask)
    return jnp.sum(_run(impl, q, k, v, mem, mask, **kw)[0].astype(jnp.float32) * w)

  mk, mv = (None, None) if memory is None else (memory.keys, memory.values)
  argnums = (0, 1, 2) if memory is None else (0, 1, 2, 3, 4)
  grads_ref = jax.jit(jax.grad(lambda *a: loss("reference", *a), argnums))(q, k, v, mk, mv)
  grads = jax.jit(jax.grad(lambda *a: loss(impl, *a), argnums))(q, k, v, mk, mv)
  for name, g, g_ref in zip("q k v mem_k mem_v".split(), grads, grads_ref):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32),
                               rtol=rtol, atol=atol, err_msg=f"d{name}")


@pytest.mark.parametrize("heads, memory_heads, slot_mask", [
    ((4, 2), (0, 1), True),  # GQA, memories on every KV head
    ((4, 2), (1,), False),  # memories on a subset of KV heads (others see none)
    ((2, 2), None, True),  # MHA, no memory
    ((4, 2), None, False),
], ids=["gqa-memory-slotmask", "gqa-memory_subset-dense", "mha-no_memory-slotmask",
        "gqa-no_memory-dense"])
def test_blockwise_equals_reference(heads, memory_heads, slot_mask):
  q, k, v, memory = _arrays(*heads, memory_heads)
  mask = attn_lib.causal_slot_mask(P + T) if slot_mask else attn_lib.causal_mask(P + T)
  _assert_parity(q, k, v, memory, mask, query_offset=P, chunk_length=LC)


def test_blockwise_left_padding_keys():
  """Key padding (False in key_valid) after the prefix, in both mask forms."""
  q, k, v, memory = _arrays(4, 2, (0, 1))
  valid = np.ones((B, P + T), bool)
  valid[0, P:P + 5] = False  # left padding of row 0 (its prefix stays visible)
  slot_mask = attn_lib.causal_slot_mask(P + T, jnp.asarray(valid))
  _assert_parity(q, k, v, memory, slot_mask, query_offset=P, chunk_length=LC)


def test_blockwise_decode_step_shapes():
  """One query per row over a cache of S slots, each row at its own slot, with memories."""
  s = 29
  q, k, v, memory = _arrays(4, 2, (1,), tq=1, s=s)
  slot = jnp.asarray([5, 21])
  dense = (jnp.arange(s)[None, :] <= slot[:, None])[:, None, :]  # what decode_step builds
  _assert_parity(q, k, v, memory, dense, chunk_length=1)
  out, _ = _run("blockwise", q, k, v, memory, attn_lib.SlotMask(slot[:, None]), chunk_length=1)
  ref, _ = _run("reference", q, k, v, memory, dense, chunk_length=1)
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.slow  # the TPU kernels interpreted on CPU: ~15 s of CPU
@pytest.mark.parametrize("memory_heads", [(0, 1), None], ids=["memory", "no_memory"])
def test_pallas_tpu_kernels_interpreted_equal_reference(memory_heads):
  """Forward, memory mass and gradients of the Pallas TPU path (kernels run in
  interpret mode), with GQA, masked memories, prefix rows and left padding."""
  pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
  q, k, v, memory = _arrays(4, 2, memory_heads)
  valid = np.ones((B, P + T), bool)
  valid[0, P:P + 5] = False
  with pltpu.force_tpu_interpret_mode():
    _assert_parity(q, k, v, memory, attn_lib.causal_slot_mask(P + T, jnp.asarray(valid)),
                   impl="pallas_tpu", query_offset=P, chunk_length=LC)


def test_blockwise_bfloat16_compute():
  q, k, v, memory = _arrays(4, 2, (0, 1), dtype=jnp.bfloat16)
  _assert_parity(q, k, v, memory, attn_lib.causal_slot_mask(P + T), rtol=3e-2, atol=3e-2,
                 query_offset=P, chunk_length=LC)


def test_blockwise_rejects_bad_blocks():
  q, k, v, _ = _arrays(4, 2, None)
  with pytest.raises(ValueError, match="block sizes"):
    attend_blockwise(q, k, v, attn_lib.causal_mask(P + T), block_q=0)


def _grad_temp_bytes(impl: str, t: int) -> int:
  """Compiled temp bytes of forward + backward of one memory attention at length t."""
  h, h_kv, d, lc = 4, 2, 32, 64
  sds = jax.ShapeDtypeStruct
  c = -(-t // lc)
  args = (sds((1, P + t, h, d), jnp.float32), sds((1, P + t, h_kv, d), jnp.float32),
          sds((1, P + t, h_kv, d), jnp.float32), sds((1, c, h_kv, M * K, d), jnp.float32),
          sds((1, c, h_kv, M * K, d), jnp.float32))

  def loss(q, k, v, mk, mv):
    memory = attn_lib.MemoryKV(mk, mv, jnp.ones(mk.shape[:-1], bool))
    mask = attn_lib.causal_slot_mask(P + t)
    kw = dict(query_offset=P, chunk_length=lc)
    if impl == "reference":
      out, _ = attn_lib.attend(q, k, v, mask, memory, **kw)
    else:
      out, _ = attend_blockwise(q, k, v, mask, memory, block_q=128, block_kv=128, **kw)
    return jnp.sum(out * out)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow  # compiles four fwd+bwd graphs, up to T = 2048
def test_blockwise_temp_memory_grows_linearly():
  """4x the length: blockwise temp memory (forward + backward) grows ~4x, not 16x."""
  ratio = _grad_temp_bytes("blockwise", 2048) / _grad_temp_bytes("blockwise", 512)
  assert ratio < 4.5, ratio
  assert _grad_temp_bytes("reference", 2048) > 10 * _grad_temp_bytes("blockwise", 2048)


# ---------------------------------------------------------------- selection by config


def test_auto_picks_per_backend():
  assert attention_impls.resolve("auto", "cpu") == "reference"
  assert attention_impls.resolve("auto", "tpu") == "pallas_tpu"
  assert attention_impls.resolve("auto", "gpu", "bfloat16") == "cudnn"
  assert attention_impls.resolve("auto", "gpu", "float32") == "blockwise"
  assert attention_impls.resolve("blockwise", "tpu") == "blockwise"
  assert attention_impls.resolve("reference", "gpu") == "reference"


@pytest.mark.parametrize("impl, backend", [("cudnn", "cpu"), ("pallas_tpu", "cpu"),
                                           ("cudnn", "tpu"), ("pallas_tpu", "gpu")])
def test_fused_kernel_on_the_wrong_backend_is_a_clear_error(impl, backend):
  with pytest.raises(ValueError, match=rf"model.attention_impl='{impl}' needs a .* backend but "
                                       rf"JAX's backend is '{backend}'; choose one of "
                                       rf"auto, reference, blockwise"):
    attention_impls.resolve(impl, backend)


def test_cudnn_needs_half_precision_compute():
  with pytest.raises(ValueError, match="model.attention_impl='cudnn' needs model.dtype"):
    attention_impls.resolve("cudnn", "gpu", "float32")


def test_model_on_cpu_rejects_a_gpu_kernel(repo_root):
  cfg = dataclasses.replace(model_config(load_config(str(repo_root / "configs" / "tiny.py"))),
                            attention_impl="cudnn")
  with pytest.raises(ValueError, match="model.attention_impl='cudnn' needs a GPU backend"):
    jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def test_unknown_implementation_is_a_config_error(repo_root):
  cfg = load_config(str(repo_root / "configs" / "tiny.py"))
  cfg.model.attention_impl = "flash9"
  with pytest.raises(ConfigError, match="model.attention_impl"):
    model_config(cfg)
  with pytest.raises(ValueError, match="model.attention_impl='flash9' is unknown; choose one"):
    attention_impls.resolve("flash9", "cpu")


@pytest.mark.slow  # two jitted model gradients: ~25 s of CPU
def test_model_with_blockwise_attention_equals_reference(repo_root):
  """The whole model (memories, prefix, padding mask) and its gradient, both ways."""
  base = dataclasses.replace(model_config(load_config(str(repo_root / "configs" / "tiny.py"))),
                             init_std=0.1, attention_block_q=16, attention_block_kv=8)
  params = init_params(base, jax.random.key(0))
  rng = np.random.default_rng(3)
  b, t = 2, 2 * base.chunk_length
  tokens = jnp.asarray(rng.integers(5, base.vocab_size, (b, t)), jnp.int32)
  memories = jnp.asarray(rng.normal(size=(b, 2, base.memories_per_chunk) + base.memory_shape),
                         jnp.float32)
  memory_mask = jnp.asarray(rng.random((b, 2, base.memories_per_chunk)) > 0.3)
  padding = jnp.asarray(np.arange(t)[None, :] >= np.array([[0], [3]]))  # left padding, row 1

  def loss_and_grad(impl):
    model = Transformer(dataclasses.replace(base, attention_impl=impl))

    def loss(p):
      logits = model.apply({"params": p}, tokens, memories=memories, memory_mask=memory_mask,
                           attention_mask=padding)
      return jnp.sum(jnp.where(padding[..., None], logits, 0.0) ** 2), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, ref_logits), ref_grads = loss_and_grad("reference")
  (_, logits), grads = loss_and_grad("blockwise")
  np.testing.assert_allclose(np.where(padding[..., None], logits, 0),
                             np.where(padding[..., None], ref_logits, 0), rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.abs(b).max()))
