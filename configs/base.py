"""Defaults shared by every m3jax config; experiment files shrink or grow these.

Every field is listed here, so an override of a field that does not exist fails
(ml_collections refuses unknown keys) and `m3jax.config.validate` can check all
cross-field constraints in one place.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "base"
  c.seed = 0

  # ---------------------------------------------------------------- model
  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 8192
  m.d_model = 256
  m.n_layers = 4
  m.n_heads = 4
  m.n_kv_heads = 2
  m.head_dim = 64
  m.mlp_dim = 512
  m.rope_theta = 10000.0
  m.norm_eps = 1e-5
  m.tie_embeddings = False
  m.init_std = 0.02
  m.max_seq_len = 512  # training sequence length (multiple of chunk_length)
  m.param_dtype = "float32"
  m.dtype = "float32"  # compute dtype; bfloat16 on accelerators
  m.remat_policy = "none"  # none | full | dots_saveable | dots_with_no_batch_dims
  # Explicit memory (DESIGN.md "Model semantics").
  m.memory_layers = ml_collections.FieldReference(None, field_type=list)  # None = first half
  m.memory_heads = ml_collections.FieldReference(None, field_type=list)  # None = all KV heads
  m.memory_tokens_per_head = 8
  m.reference_length = 128  # max tokens of a reference, prefix excluded
  m.chunk_length = 64
  m.memories_per_chunk = 5
  # Token ids of the "<s>Reference:" sink prefix; set from the tokenizer.
  m.reference_prefix_ids = (2, 4)
  m.bos_id = 2
  m.eos_id = 3
  m.pad_id = 0

  # ---------------------------------------------------------------- mesh
  mesh = c.mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1 = the remaining devices
  mesh.fsdp = 1
  mesh.tensor = 1
  # Logical axis -> mesh axes. ONE table; parallelism strategies edit only this.
  c.logical_axis_rules = (
      ("batch", ("data", "fsdp")),
      ("length", None),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("head_dim", None),
      ("mlp", "tensor"),
      ("vocab", "tensor"),
      ("layers", None),
      ("mem_refs", None),
      ("mem_tokens", None),
      ("norm", None),
  )

  # ---------------------------------------------------------------- data
  d = c.data = ml_collections.ConfigDict()
  d.workdir_data = "data"  # relative to the workdir unless absolute
  d.tokenizer = ""  # path to a .model; empty = <workdir>/data/tokenizer.model
  d.corpus = "knowledge_world"  # knowledge_world | files | tfds
  d.files = ml_collections.FieldReference(None, field_type=list)
  d.text_field = "text"
  d.tfds_name = ""
  d.tfds_data_dir = ""
  d.tfds_split = "train"
  d.kb_files = ml_collections.FieldReference(None, field_type=list)
  d.kb_tfds_name = ""
  d.kb_tfds_split = "train"
  d.vocab_size = 8192
  d.tokenizer_model_type = "bpe"
  d.batch_size = 8  # global, sequences
  d.shuffle = True
  d.worker_count = 0
  d.knowledge_world = ml_collections.ConfigDict(
      dict(seed=0, n_seen=600, n_memory_taught=600, n_unseen=300, paraphrases_seen=4,
           qa_per_entity=6, eval_questions_per_entity=2, n_distractors=9))
  d.embedder = "lexical"  # lexical | model
  d.embed_dim = 256
  d.neighbors_per_chunk = 1
  d.neighbor_candidates = 10
  d.train_overlap_threshold = 0.9
  d.eval_overlap_threshold = 2.0 / 3.0
  d.exclude_same_doc = False

  # ---------------------------------------------------------------- train
  t = c.train = ml_collections.ConfigDict()
  t.stage = "warmup"  # warmup | continual
  t.use_memory = False  # True for continual; True in warmup = from-scratch ablation
  t.init_from = ""  # warmup checkpoint dir for the continual stage
  t.steps = 1000
  t.lr = 3e-4
  t.min_lr_ratio = 0.1
  t.schedule = "wsd"  # wsd | cosine | constant
  t.warmup_steps = 100
  t.decay_fraction = 0.1  # WSD: last fraction of steps decays
  t.weight_decay = 0.1
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.grad_clip = 1.0
  t.grad_accum = 1
  t.grad_through_references = True
  t.log_every = 10
  t.eval_every = 200
  t.eval_batches = 4
  t.checkpoint_every = 200
  t.keep_checkpoints = 3
  t.peak_flops_per_device = 0.0  # 0 = from the device table
  return c
