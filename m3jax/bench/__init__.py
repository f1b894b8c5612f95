"""Benchmarks (`m3jax bench ...`): training step, reference encoding, decoding speed, retrieval
(recall and queries/s against exact search and FAISS)."""
