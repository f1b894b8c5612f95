"""Defaults shared by every m3jax config; experiment files shrink or grow these.

Every field is listed here, so an override of a field that does not exist fails
(ml_collections refuses unknown keys) and `m3jax.core.config.validate` can check all
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
  # auto | reference | blockwise | cudnn | pallas_tpu (docs/model.md "Attention implementations")
  m.attention_impl = "auto"
  m.attention_block_q = 512  # blockwise: queries / keys per block (multiples of 128 for TPUs)
  m.attention_block_kv = 512
  # Explicit memory (docs/model.md "Memory layers and memory heads").
  m.memory_layers = ml_collections.FieldReference(None, field_type=tuple)  # None = first half
  m.memory_heads = ml_collections.FieldReference(None, field_type=tuple)  # None = all KV heads
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
  d.corpus = "knowledge_world"  # knowledge_world | files | tfds | hf
  d.files = ml_collections.FieldReference(None, field_type=tuple)
  d.text_field = "text"
  d.tfds_name = ""
  d.tfds_data_dir = ""
  d.tfds_split = "train"
  d.kb_files = ml_collections.FieldReference(None, field_type=tuple)
  d.kb_tfds_name = ""
  d.kb_tfds_split = "train"
  d.kb_tfds_data_dir = ""  # empty = tfds_data_dir
  d.kb_text_field = ""  # empty = text_field
  # Hugging Face datasets (data_pipeline/hf_corpus.py): a save_to_disk directory, data files
  # (.parquet/.arrow/.json[l], comma-separated, globs allowed) or a Hub name.
  d.hf_path = ""
  d.hf_config = ""
  d.hf_split = "train"
  d.hf_streaming = False  # data files / Hub: read as an IterableDataset (no full copy)
  d.kb_hf_path = ""  # knowledge base from a Hugging Face dataset (same forms as hf_path)
  d.kb_hf_config = ""
  d.kb_hf_split = "train"
  # Knowledge base = kb_files, else kb_hf_path, else kb_tfds_name, else the corpus's own
  # (knowledge_world) or the training text itself (files / tfds / hf).
  d.txt_docs = "blank_line"  # .txt documents: blank_line (blocks) | file (whole file)
  d.max_split_bytes = 256 << 20  # plain files larger than this are read in byte ranges
  # A bad record in data.files / data.kb_files: invalid UTF-8 or JSON, no string text field.
  d.bad_records = "error"  # error (stop at it) | skip (print, count per file in the manifest)
  d.vocab_size = 8192
  d.tokenizer_model_type = "bpe"
  d.tokenizer_sample_chars = 200_000_000  # evenly spaced sample of train + KB text
  d.tokenizer_max_sentences = 10_000_000
  d.chat_tokens = False  # add the chat role markers (data_pipeline/chat.py) when training it
  d.chat_files = ml_collections.FieldReference(None, field_type=tuple)  # SFT chat JSONL
  d.preference_files = ml_collections.FieldReference(None, field_type=tuple)  # DPO pairs JSONL
  d.chat_max_rounds = 8  # chats with more user turns are dropped (counted); 0 = keep all
  d.eval_fraction = 0.01  # documents held out (by index hash) for the eval-loss split
  d.eval_max_docs = 10_000
  d.eval_seed = 0
  d.shard_docs = 20_000  # documents per output shard (bounds memory while writing)
  d.prepare_threads = 0  # tokenizer threads in prepare-data; 0 = all cores
  d.pack_align_chunks = False  # start a chunk-sized document at a chunk boundary (packing.py)
  d.batch_size = 8  # global, sequences
  d.shuffle = True
  d.worker_count = 0
  d.knowledge_world = ml_collections.ConfigDict(
      dict(seed=0, n_seen=600, n_memory_taught=600, n_unseen=300, paraphrases_seen=4,
           qa_per_entity=6, eval_questions_per_entity=2, n_distractors=9))
  d.embedder = "lexical"  # lexical | model
  d.embed_dim = 256
  d.embed_model_layer = -1  # model embedder: layer whose states are pooled; -1 = n_layers // 2
  d.neighbor_shard_size = 1024  # sequences per neighbor-table shard file
  d.neighbors_per_chunk = 1
  d.neighbor_candidates = 10
  d.train_overlap_threshold = 0.9
  d.eval_overlap_threshold = 2.0 / 3.0
  d.exclude_same_doc = False

  # ---------------------------------------------------------------- memory bank
  # `m3jax encode-memory` and m3jax.memory.bank_format (WORKSPACE.md "Memory bank").
  b = c.bank = ml_collections.ConfigDict()
  b.shard_size = 1024  # references per shard file (shard s holds ref_ids [s*S, (s+1)*S))
  b.encode_batch_size = 64  # references per encode step; divides shard_size
  b.quantization = "none"  # none (bfloat16) | int8 | pq
  b.pq_subvectors = (10, 4)  # 8-bit codes per residual stage: bytes per vector = sum
  b.pq_groups = "layer_kv"  # codebook sets: shared | kv | layer_kv | layer_kv_head
  b.pq_train_references = 4096  # uniform sample the codebooks are trained on
  b.pq_iterations = 20  # k-means iterations
  b.pq_opq_iterations = 0  # OPQ rotation rounds (0 = no rotation)
  b.pq_seed = 0
  b.cache_memories = 4096  # RAM LRU cache of decoded memories; 0 = off
  b.prefetch = False  # background thread loading prefetch()ed ids ahead of lookup
  b.verify = "touch"  # none | size (on open) | touch (+ sha256 on a shard's first read) | full

  # ---------------------------------------------------------------- train
  t = c.train = ml_collections.ConfigDict()
  t.stage = "warmup"  # warmup | continual | sft | dpo
  t.use_memory = False  # True for continual; True in warmup = from-scratch ablation
  t.init_from = ""  # warmup checkpoint dir for the continual stage
  # Continual stage: "memory" reads the references as explicit memories; "rag" trains the
  # text-RAG competitor on the same data, the references' text in front of each sequence
  # (m3jax/training/rag_reader.py); rag_separator joins them, as at evaluation.
  t.reader = "memory"
  t.rag_separator = "\n"
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
  t.throughput_window = 100  # steps: logged tokens/s and MFU average the last this many
  t.eval_every = 200
  t.eval_batches = 4
  t.checkpoint_every = 200
  t.keep_checkpoints = 3
  t.peak_flops_per_device = 0.0  # 0 = from the device table
  # Post-training (train.stage sft | dpo; docs/training.md "Post-training").
  t.chat_memory = True  # sft/dpo read explicit memory (each chunk's retrieved reference)
  t.dpo_beta = 0.01  # the paper's β
  return c
