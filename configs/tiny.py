"""Tiny model for tests: every mechanism of the real model at toy size."""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "tiny"
  m = c.model
  m.vocab_size = 512
  m.d_model = 64
  m.n_layers = 4
  m.n_heads = 4
  m.n_kv_heads = 2
  m.head_dim = 16
  m.mlp_dim = 128
  m.max_seq_len = 64
  m.memory_layers = (0, 1)
  m.memory_tokens_per_head = 4
  m.reference_length = 24
  m.chunk_length = 16
  m.memories_per_chunk = 3
  c.data.vocab_size = 512
  c.data.batch_size = 8
  c.data.embed_dim = 64
  c.train.steps = 20
  c.train.warmup_steps = 4
  c.train.log_every = 5
  c.train.eval_every = 10
  c.train.checkpoint_every = 10
  return c
