"""Attention implementations chosen by `model.attention_impl`, behind one `attend`.

All implementations compute the same thing, `attention.attend`'s one float32 softmax
over sink prefix + causal context + the chunk's memory tokens (docs/model.md,
"Attention implementations"):

- reference: `attention.attend`, the readable version; materialises [Tq, S] logits.
- blockwise: `attention_blockwise.attend_blockwise`, flash-style online softmax in pure
  JAX on every backend; memory linear in the length.

"auto" picks per backend (`resolve`).
"""

from __future__ import annotations

from typing import Sequence

import jax

from m3jax.core.config import ATTENTION_IMPLS, ModelConfig
from m3jax.model import attention as attn_lib
from m3jax.model.attention_blockwise import attend_blockwise

# Implementations that need a particular backend (jax.default_backend() names).
_NEEDS_BACKEND: dict[str, str] = {}
# "auto" per backend; anything else gets the reference (CPU: short demo/test sequences,
# where the [T, T] logits are small and every CPU figure in the README came from it).
_AUTO = {"gpu": "blockwise", "tpu": "blockwise"}


def resolve(impl: str, backend: str | None = None) -> str:
  """The implementation `impl` means on `backend` (default: JAX's default backend).

  Raises ValueError naming `model.attention_impl` and the choices when `impl` is unknown
  or needs a backend this process does not have.
  """
  backend = backend or jax.default_backend()
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention_impl={impl!r} is unknown; choose one of "
                     f"{', '.join(ATTENTION_IMPLS)}")
  if impl == "auto":
    return _AUTO.get(backend, "reference")
  need = _NEEDS_BACKEND.get(impl)
  if need is not None and backend != need:
    usable = [i for i in ATTENTION_IMPLS if _NEEDS_BACKEND.get(i, backend) == backend]
    raise ValueError(f"model.attention_impl={impl!r} needs a {need.upper()} backend but JAX's "
                     f"backend is {backend!r}; choose one of {', '.join(usable)}")
  return impl


def attend(config: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array,
           mask: jax.Array | attn_lib.SlotMask, memory: attn_lib.MemoryKV | None = None, *,
           query_offset: int = 0, chunk_length: int = 1,
           memory_heads: Sequence[int] | None = None,
           return_memory_mass: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """`attention.attend` (same arguments and results) by `config.attention_impl`."""
  kw = dict(query_offset=query_offset, chunk_length=chunk_length, memory_heads=memory_heads,
            return_memory_mass=return_memory_mass)
  impl = resolve(config.attention_impl)
  if impl == "blockwise":
    return attend_blockwise(q, k, v, mask, memory, block_q=config.attention_block_q,
                            block_kv=config.attention_block_kv, **kw)
  return attn_lib.attend(q, k, v, mask, memory, **kw)
