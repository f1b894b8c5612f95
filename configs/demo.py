"""CPU quickstart on the embedded knowledge world (`make demo`, m3jax/demo/pipeline.py).

Sized so that the whole pipeline (prepare-data, warmup, index + neighbors,
continual, encode-memory, eval, bench decode) fits ~15 minutes on 2 CPU cores.
Memory structure as in the paper: 5 memories per chunk, 8 tokens per KV head,
memory layers = the first half. Deviations, and why:

* The knowledge base is one sentence per reference (knowledge_world.KB_SENTENCES,
  10-25 tokens), so reference_length = 32 (paper: 128). 4 KV heads x 8 tokens keep
  the answer's first token in ~90% of memories (layer 0); a 53-token biography per
  reference kept it in 25-45%, which capped any reader below the target.
* Chunks of 32 tokens (paper: 64) and training sequences of one chunk, with
  `data.pack_align_chunks`: a knowledge-world QA line is ~22 tokens (99.6% fit in
  32), so each sequence holds one line and its chunk's mined reference is the
  sentence that answers it. With 64-token chunks a line filled 38% of its chunk;
  halving the chunk doubles the QA lines per step at the same FLOPs, and unseen
  accuracy went from 18.8% to 55.0% in 640 steps at lr 1e-3.
  Sequences of five chunks, where a chunk also reads the four previous chunks'
  references (other people: distractors), learnt to read much later (13.8% at 640).
* n_kv_heads = n_heads = 4 (no grouping).
* The world leans on memory_taught entities (3000 of 3300) with one QA line per
  trained attribute: many people, few lines each, so answers cannot be memorised
  and the continual stage teaches reading.
* Optimiser: lr 2e-3 with Adam b2 = 0.99, batches of 64 sequences (2,048 tokens).
  The warmup stage is short (40 steps: the QA format); the budget goes to the
  continual stage (1000 steps), where reading is learnt. 1000 steps at lr 1e-3
  reached 64.4% on unseen people, at 2e-3 70.0% (160 questions per group).
"""

import ml_collections

from configs import base


def get_config():
  c = base.get_config()
  c.name = "demo"
  m = c.model
  m.vocab_size = 2048
  m.d_model = 128
  m.n_layers = 4
  m.n_heads = 4
  m.n_kv_heads = 4
  m.head_dim = 32
  m.mlp_dim = 384
  m.max_seq_len = 32
  m.memory_layers = None  # first half: 0, 1
  m.memory_tokens_per_head = 8
  m.reference_length = 32
  m.chunk_length = 32
  m.memories_per_chunk = 5
  d = c.data
  d.vocab_size = 2048
  d.batch_size = 64
  d.pack_align_chunks = True
  d.chat_tokens = True  # the chat role markers, for `make demo-posttrain`
  d.eval_fraction = 0.05
  d.knowledge_world = dict(seed=0, n_seen=100, n_memory_taught=3000, n_unseen=200,
                           paraphrases_seen=2, qa_per_entity=6, eval_questions_per_entity=2,
                           n_distractors=9, qa_by_person=0)
  t = c.train
  t.lr = 2e-3
  t.b2 = 0.99
  t.decay_fraction = 0.2
  t.log_every = 10
  t.eval_batches = 2
  # Stage-specific train.* fields and the eval / benchmark sizes (m3jax/demo/pipeline.py).
  c.demo = ml_collections.ConfigDict(dict(
      warmup=dict(steps=40, warmup_steps=10, eval_every=20, checkpoint_every=20),
      continual=dict(steps=1000, warmup_steps=10, lr=2e-3, eval_every=250,
                     checkpoint_every=250),
      eval_limit=480, eval_batch_size=32, eval_max_new_tokens=12, perplexity_limit=48,
      bench_batch=8, bench_prompt_len=128, bench_new_tokens=64, bench_runs=2,
      # `make demo-posttrain` (m3jax/demo/posttrain.py): SFT, then DPO, of the continual model.
      posttrain=dict(sft=dict(steps=300, lr=1e-3, warmup_steps=10),
                     dpo=dict(steps=100, lr=1e-4, warmup_steps=10, dpo_beta=0.1),
                     eval_per_group=160)))
  return c
