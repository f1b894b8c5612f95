"""Rotary position embeddings in the rotate-half layout (Hugging Face Llama).

The two halves of the head dimension form the rotation pairs (i, i + d/2), so a
checkpoint converted from `LlamaForCausalLM` needs no permutation of q/k weights.
Angles are computed in float32 and the rotation happens in the input's dtype,
as Hugging Face does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
  """theta^(-2i/d) for i < d/2, float32 (`inv_freq` of Hugging Face Llama)."""
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
  return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables [..., d] for integer positions [...]."""
  inv_freq = jnp.asarray(inverse_frequencies(head_dim, theta))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: jax.Array) -> jax.Array:
  """(x1, x2) -> (-x2, x1) over the last axis."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates x [B, T, H, d] by its positions [B or 1, T] (int)."""
  cos, sin = cos_sin(positions, x.shape[-1], theta)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotate_half(x) * sin
