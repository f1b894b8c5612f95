"""The paper's 2.4B Memory³ model (paper §3.4, Appendix A; docs/model.md "Paper sections")."""

from configs import base


def get_config():
  c = base.get_config()
  c.name = "memory3_2p4b"
  m = c.model
  m.vocab_size = 60416
  m.d_model = 3200
  m.n_layers = 44
  m.n_heads = 40
  m.n_kv_heads = 8
  m.head_dim = 80
  m.mlp_dim = 3200
  m.max_seq_len = 2048
  m.memory_layers = tuple(range(22))
  m.memory_tokens_per_head = 8
  m.reference_length = 128
  m.chunk_length = 64
  m.memories_per_chunk = 5
  m.dtype = "bfloat16"
  m.remat_policy = "dots_with_no_batch_dims"
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.data.vocab_size = 60416
  c.data.batch_size = 2048  # ~4M tokens per step at length 2048 (paper §5.1)
  c.train.weight_decay = 0.1
  c.train.schedule = "wsd"
  return c
