"""Benchmarks (`m3jax bench ...`): training step, reference encoding and decoding speed."""
