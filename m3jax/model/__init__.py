"""The Memory³ transformer: attention with memory blocks, RoPE, sparsification, KV cache,
sharding, parameter I/O, Hugging Face conversion and the cost model (docs/model.md)."""
