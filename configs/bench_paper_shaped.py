"""A paper-shaped ~30M-parameter model for `m3jax bench decode` (one short command).

The demo config (configs/demo.py) is sized for a 15-minute CPU pipeline: 4 layers of width
128, 32-token chunks and 32-token references, where fixed per-chunk costs weigh more than
they would at the paper's scale. This config keeps the demo's vocabulary and data settings
and gives the model the paper's memory shape (paper §3.1, §3.3): 64-token chunks, 128-token
references, memory layers = the first half (0..3 of 8), 8 tokens per KV head, 5 memories per
chunk, all 8 KV heads carrying memory; width 512, head dimension 64, MLP 1536, sequences of
256 tokens. It is for benchmarks only (random parameters):

  m3jax bench decode --config=configs/bench_paper_shaped.py --runs=3
"""

from configs import demo


def get_config():
  c = demo.get_config()
  c.name = "bench_paper_shaped"
  m = c.model
  m.d_model = 512
  m.n_layers = 8
  m.n_heads = 8
  m.n_kv_heads = 8
  m.head_dim = 64
  m.mlp_dim = 1536
  m.chunk_length = 64
  m.reference_length = 128
  m.max_seq_len = 256
  return c
