"""CPU quickstart on the embedded knowledge world (`make demo`)."""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "demo"
  m = c.model
  m.vocab_size = 4096
  m.d_model = 256
  m.n_layers = 6
  m.n_heads = 8
  m.n_kv_heads = 2
  m.head_dim = 32
  m.mlp_dim = 768
  m.max_seq_len = 256
  m.memory_layers = None  # first half: 0, 1, 2
  m.memory_tokens_per_head = 8
  m.reference_length = 128
  m.chunk_length = 64
  m.memories_per_chunk = 5
  c.data.vocab_size = 4096
  c.data.batch_size = 16
  return c
