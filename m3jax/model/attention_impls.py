"""Attention implementations chosen by `model.attention_impl`, behind one `attend`.

All implementations compute the same thing, `attention.attend`'s one float32 softmax
over sink prefix + causal context + the chunk's memory tokens (docs/model.md,
"Attention implementations"):

- reference: `attention.attend`, the readable version; materialises [Tq, S] logits.
- blockwise: `attention_blockwise.attend_blockwise`, flash-style online softmax in pure
  JAX on every backend; memory linear in the length.
- cudnn (GPU): cuDNN flash attention for layers without memory, blockwise otherwise
  (`attention_fused.attend_cudnn`).
- pallas_tpu (TPU): the Pallas TPU flash kernels, memory merged through the softmax
  statistics (`attention_fused.attend_pallas_tpu`).

"auto" picks per backend (`resolve`).
"""

from __future__ import annotations

from typing import Sequence

import jax

from m3jax.core.config import ATTENTION_IMPLS, ConfigError, ModelConfig
from m3jax.model import attention as attn_lib
from m3jax.model.attention_blockwise import attend_blockwise
from m3jax.model.attention_fused import attend_cudnn, attend_pallas_tpu

# Implementations that need a particular backend (jax.default_backend() names).
_NEEDS_BACKEND = {"cudnn": "gpu", "pallas_tpu": "tpu"}
_HALF = ("bfloat16", "float16")  # cuDNN flash attention takes only these


def resolve(impl: str, backend: str | None = None, dtype: str = "bfloat16") -> str:
  """The implementation `impl` means on `backend` (default: JAX's default backend) for
  compute dtype `dtype`.

  "auto": the fused kernel where the backend has one (TPU: pallas_tpu; GPU: cudnn for
  half-precision compute, blockwise for float32), else the reference (CPU: short demo
  and test sequences, where the [T, T] logits are small and every CPU figure in the
  README came from it; choose blockwise for long sequences on CPU). A model compiled
  ahead of time for another platform should name its implementation.
  Raises ConfigError (a ValueError, and a user error on the command line) naming
  `model.attention_impl` and the choices when `impl` is unknown or needs a backend
  (or dtype) this process does not have.
  """
  backend = backend or jax.default_backend()
  if impl not in ATTENTION_IMPLS:
    raise ConfigError(f"model.attention_impl={impl!r} is unknown; choose one of "
                     f"{', '.join(ATTENTION_IMPLS)}")
  if impl == "auto":
    if backend == "tpu":
      return "pallas_tpu"
    if backend == "gpu":
      return "cudnn" if dtype in _HALF else "blockwise"
    return "reference"
  need = _NEEDS_BACKEND.get(impl)
  if need is not None and backend != need:
    usable = [i for i in ATTENTION_IMPLS if _NEEDS_BACKEND.get(i, backend) == backend]
    raise ConfigError(f"model.attention_impl={impl!r} needs a {need.upper()} backend but JAX's "
                     f"backend is {backend!r}; choose one of {', '.join(usable)}")
  if impl == "cudnn" and dtype not in _HALF:
    raise ConfigError(f"model.attention_impl='cudnn' needs model.dtype bfloat16 or float16 "
                     f"(got {dtype!r}); choose blockwise for float32")
  return impl


def attend(config: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array,
           mask: jax.Array | attn_lib.SlotMask, memory: attn_lib.MemoryKV | None = None, *,
           query_offset: int = 0, chunk_length: int = 1,
           memory_heads: Sequence[int] | None = None,
           return_memory_mass: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """`attention.attend` (same arguments and results) by `config.attention_impl`."""
  kw = dict(query_offset=query_offset, chunk_length=chunk_length, memory_heads=memory_heads,
            return_memory_mass=return_memory_mass)
  impl = resolve(config.attention_impl, dtype=config.dtype)
  if impl == "reference":
    return attn_lib.attend(q, k, v, mask, memory, **kw)
  fn = {"blockwise": attend_blockwise, "cudnn": attend_cudnn,
        "pallas_tpu": attend_pallas_tpu}[impl]
  return fn(q, k, v, mask, memory, block_q=config.attention_block_q,
            block_kv=config.attention_block_kv, **kw)
