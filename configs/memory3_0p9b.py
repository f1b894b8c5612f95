"""The paper's 0.92B ablation model (its Fig. 11; docs/model.md): L=40, H=32, d_h=64."""

from configs import memory3_2p4b


def get_config():
  c = memory3_2p4b.get_config()
  c.name = "memory3_0p9b"
  m = c.model
  m.d_model = 2048
  m.n_layers = 40
  m.n_heads = 32
  m.n_kv_heads = 8
  m.head_dim = 64
  m.mlp_dim = 2048
  m.memory_layers = tuple(range(20))
  return c
