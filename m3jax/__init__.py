"""m3jax: language models with explicit memory (Memory³) in JAX/Flax."""

__version__ = "0.1.0"
