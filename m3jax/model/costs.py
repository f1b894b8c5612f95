"""Parameter, storage and FLOP accounting for a model config.

See docs/model.md "Cost model" (paper §1, §3.3 and Appendix A).

Every number here is computed from a `ModelConfig`; nothing is typed in. The
notation follows the paper's Appendix A:

  L      n_layers                 d_h    head_dim
  H      n_heads                  d      H·d_h (attention width; = d_model in the paper)
  H_kv   n_kv_heads               D      d_model (residual width)
  W      mlp_dim                  n_vocab vocab_size
  L_mem  len(memory_layers)       H_mem  len(memory_heads)
  l_ref  reference_length         l_mem  memory_tokens_per_head (k)
  l_chunk chunk_length            l_train max_seq_len
  P      matmul parameters of one block = D·H·d_h (Q) + 2·D·H_kv·d_h (K, V)
         + H·d_h·D (O) + 3·D·W (gate, up, down); the paper writes 2d² + 2·d·d_h·H_kv + 3·d·W.

FLOPs count a multiply-add as 2; a training step costs 3 forward passes
(forward + backward = 1 + 2), hence the 6 = 3·2 of the paper. Layer norms,
softmax, activations and the embedding lookup are ignored, as in the paper.

Causal attention: a query at position t does QK and AV products against t keys,
2·t·d multiply-adds; averaged over a sequence of T tokens this is 2·(T/2)·d
multiply-adds per token per layer, i.e. forward attention FLOPs per token are
2·2·(T/2)·d = 2·T·d per layer and training attention FLOPs per token are
6·2·(T/2)·d = 6·T·d per layer (the paper's 2·l_ref·(l_train/2)·d term).

Choices where the paper is silent (documented here and in `train_flop_terms`):
- Reference encoding (explicit-memory write and in-step encoding during continual
  training) runs through layers 0..last memory layer (= L_mem layers for the
  paper's first-half layout) with the attention of every one of them and the MLP
  of all but the last (whose output no memory needs), as in Appendix A.2.
- Selection scores are one QK product per query head of a memory KV group:
  l_ref²·H_mem·(H/H_kv)·d_h multiply-adds per memory layer (= l_ref²·d for the paper).
- Memory attention: queries of the H_mem·(H/H_kv) query heads that share a memory KV
  head attend to M·k extra memory keys in each memory layer (useful work: m3jax's
  attention also spends it on masked non-memory heads when H_mem < H_kv).
- With memory on, the P_prefix = len(reference_prefix_ids) sink-prefix tokens are
  prepended to the context in every layer (m3jax.model.transformer): they pass through all
  blocks and every query attends to their keys in every layer.
"""

from __future__ import annotations

import dataclasses
from m3jax.core.config import ModelConfig

# The paper's knowledge base: "about 1.1e8 references" of 128 tokens (14.3B tokens).
# 14.3e9 / 128 = 1.117e8 gives 7.15 PiB / 45.8 TiB / 4.01 TiB; the paper's printed
# 7.17 PiB / 45.9 TiB / 4.02 TiB are reproduced by 1.12e8 (its rounding), so that is
# the default bank size.
PAPER_REFERENCES = 1.12e8
PAPER_KB_TOKENS = 14.3e9

# Bytes per stored key/value element (bf16) and per vector after the paper's
# OPQ20x80-Residual2x14-PQ8x10 quantizer (14 uint8 codes per 80-dim vector).
BYTES_PER_VALUE = 2
QUANTIZED_BYTES_PER_VECTOR = 14

# Remark 8's speed-test sample: 128 input + 128 output tokens.
REMARK8_TOKENS = 256


# ------------------------------------------------------------------ shapes


def attention_width(m: ModelConfig) -> int:
  """d = H·d_h: the width of the query/key products of all query heads."""
  return m.n_heads * m.head_dim


def memory_query_width(m: ModelConfig) -> int:
  """Width of the query heads that read memory: H_mem·(H/H_kv)·d_h (= d when all KV heads)."""
  return m.n_memory_heads * (m.n_heads // m.n_kv_heads) * m.head_dim


def encoder_layers(m: ModelConfig) -> int:
  """Layers a reference passes through when encoded: 0..last memory layer."""
  _require_memory(m)
  return m.last_memory_layer + 1


def _require_memory(m: ModelConfig) -> None:
  if not m.memory_layers or not m.memory_heads:
    raise ValueError("memory costs need memory: model.memory_layers / model.memory_heads "
                     "is empty")


def attention_params_per_layer(m: ModelConfig) -> int:
  """Q, K, V, O kernels of one block: 2·D·H·d_h + 2·D·H_kv·d_h (paper: 2d² + 2·d·d_h·H_kv)."""
  return 2 * m.d_model * m.n_heads * m.head_dim + 2 * m.d_model * m.n_kv_heads * m.head_dim


def mlp_params_per_layer(m: ModelConfig) -> int:
  """Gate, up and down kernels of one block: 3·D·W."""
  return 3 * m.d_model * m.mlp_dim


def matmul_params_per_layer(m: ModelConfig) -> int:
  """P: all matmul parameters of one block (55,296,000 for the 2.4B model)."""
  return attention_params_per_layer(m) + mlp_params_per_layer(m)


# ------------------------------------------------------------------ parameters


@dataclasses.dataclass(frozen=True)
class ParamCounts:
  """Parameter counts of the m3jax parameter tree for a config."""

  per_layer_matmul: int  # P
  block_matmul: int  # L·P, the paper's "non-embedding" figure
  norms: int  # (2L + 1)·D norm scales
  non_embedding: int  # L·P + norms: everything but the embedding and LM head
  embedding: int  # embedding [V, D] plus the LM head [D, V] unless tied
  total: int


def param_counts(m: ModelConfig) -> ParamCounts:
  """Counts the parameters of the tree of docs/architecture.md (unrolled layers, no biases)."""
  p = matmul_params_per_layer(m)
  blocks = m.n_layers * p
  norms = (2 * m.n_layers + 1) * m.d_model
  emb = m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
  return ParamCounts(p, blocks, norms, blocks + norms, emb, blocks + norms + emb)


def matmul_params(m: ModelConfig) -> int:
  """N_matmul: parameters every token multiplies, L·P + D·V (the LM head, tied or not)."""
  return m.n_layers * matmul_params_per_layer(m) + m.d_model * m.vocab_size


# ------------------------------------------------------------------ storage


def dense_kv_bytes_per_reference(m: ModelConfig, bytes_per_value: int = BYTES_PER_VALUE) -> int:
  """Full KV cache of one reference: L·2·H·l_ref·d_h·bytes.

  Like the paper's dense baseline, this counts all H query heads (as if no GQA).
  """
  return m.n_layers * 2 * m.n_heads * m.reference_length * m.head_dim * bytes_per_value


def memory_bytes_per_reference(m: ModelConfig, bytes_per_value: int = BYTES_PER_VALUE) -> int:
  """One sparse memory (L_mem, 2, H_mem, k, d_h) in bf16: L_mem·2·H_mem·k·d_h·bytes."""
  n_vectors = m.n_memory_layers * 2 * m.n_memory_heads * m.memory_tokens_per_head
  return n_vectors * m.head_dim * bytes_per_value


def quantized_memory_bytes_per_reference(
    m: ModelConfig, bytes_per_vector: int = QUANTIZED_BYTES_PER_VECTOR) -> int:
  """One sparse memory with each d_h-vector quantized to `bytes_per_vector` bytes."""
  n_vectors = m.n_memory_layers * 2 * m.n_memory_heads * m.memory_tokens_per_head
  return n_vectors * bytes_per_vector


@dataclasses.dataclass(frozen=True)
class Sparsity:
  """Compression factors of a memory against the dense KV cache (paper §3.3)."""

  layers: float  # L / L_mem
  heads: float  # H / H_mem
  tokens: float  # l_ref / k
  total: float  # layers·heads·tokens (160 for the paper)
  quantization: float  # 2·d_h bytes / bytes_per_vector (80/7 ≈ 11.4)
  total_quantized: float  # ≈ 1830 for the paper


def sparsity(m: ModelConfig,
             bytes_per_vector: int = QUANTIZED_BYTES_PER_VECTOR) -> Sparsity:
  _require_memory(m)
  layers = m.n_layers / m.n_memory_layers
  heads = m.n_heads / m.n_memory_heads
  tokens = m.reference_length / m.memory_tokens_per_head
  vq = BYTES_PER_VALUE * m.head_dim / bytes_per_vector
  total = layers * heads * tokens
  return Sparsity(layers, heads, tokens, total, vq, total * vq)


# ------------------------------------------------------------------ Appendix A costs


def forward_flops(m: ModelConfig, n_tokens: int, *, lm_head: bool = False) -> float:
  """Forward FLOPs of `n_tokens` causal tokens through all L blocks (Remark 8's count).

  2·[L·(n·P + 2·(n²/2)·d)] (+ 2·n·D·V with the LM head). With n = 256 this is the
  paper's 1.264 TFLOPs.
  """
  n = n_tokens
  d = attention_width(m)
  macs = m.n_layers * (n * matmul_params_per_layer(m) + 2 * (n * n / 2) * d)
  if lm_head:
    macs += n * m.d_model * m.vocab_size
  return 2.0 * macs


def implicit_write_flops(m: ModelConfig, l_train: int | None = None) -> float:
  """Cost of writing one reference into the parameters (Appendix A.1).

  The training compute of l_ref tokens inside an l_train-token sample:
  6·[L·(l_ref·P + 2·l_ref·(l_train/2)·d) + l_ref·n_vocab·D]  (2.2385e12 for the paper).
  """
  l_train = m.max_seq_len if l_train is None else l_train
  l_ref = m.reference_length
  d = attention_width(m)
  per_layer = l_ref * matmul_params_per_layer(m) + 2 * l_ref * (l_train / 2) * d
  return 6.0 * (m.n_layers * per_layer + l_ref * m.vocab_size * m.d_model)


def _encode_reference_macs(m: ModelConfig, n_tokens: int) -> tuple[float, float]:
  """(layer MACs, selection-score MACs) of encoding one reference of `n_tokens`.

  Layers 0..last memory layer: Q/K/V/O and causal attention in each, the MLP in
  all but the last; selection scores l²·H_mem·(H/H_kv)·d_h in each memory layer.
  """
  n = n_tokens
  n_enc = encoder_layers(m)
  d = attention_width(m)
  layers = (n_enc * (n * attention_params_per_layer(m) + 2 * (n * n / 2) * d)
            + (n_enc - 1) * n * mlp_params_per_layer(m))
  selection = m.n_memory_layers * n * n * memory_query_width(m)
  return layers, selection


def explicit_write_flops(m: ModelConfig) -> float:
  """Cost of encoding one reference into a sparse memory (Appendix A.2).

  2·[L_mem·(l_ref·(2d² + 2·d·d_h·H_kv) + 2·(l_ref²/2)·d) + (L_mem − 1)·l_ref·3·d·W
     + L_mem·l_ref²·d]  (3.0818e11 for the paper; the sink prefix is not counted).
  """
  layers, selection = _encode_reference_macs(m, m.reference_length)
  return 2.0 * (layers + selection)


def explicit_read_flops(m: ModelConfig) -> float:
  """Cost of one use of one memory: a chunk's QK and AV against its k tokens per layer.

  2·L_mem·2·l_chunk·l_mem·d  (1.4418e8 for the paper).
  """
  _require_memory(m)
  return (2.0 * m.n_memory_layers * 2 * m.chunk_length * m.memory_tokens_per_head
          * memory_query_width(m))


def rag_read_flops(m: ModelConfig) -> float:
  """Lower bound on one use of a plain-text reference in the context (Appendix A.3).

  One l_chunk chunk attends to the reference, which attends only to itself; all L
  layers, L − 1 MLPs, no LM head:
  2·[L·(l_ref·(2d² + 2·d·d_h·H_kv) + 2·l_ref·(l_ref/2 + l_chunk)·d) + (L − 1)·l_ref·3·d·W]
  (6.2422e11 for the paper, which labels it cost_write by mistake).
  """
  l_ref = m.reference_length
  d = attention_width(m)
  macs = (m.n_layers * (l_ref * attention_params_per_layer(m)
                        + 2 * l_ref * (l_ref / 2 + m.chunk_length) * d)
          + (m.n_layers - 1) * l_ref * mlp_params_per_layer(m))
  return 2.0 * macs


def total_costs(m: ModelConfig, uses: float) -> tuple[float, float, float]:
  """(implicit, explicit, RAG) lifetime FLOPs of one reference used `uses` times.

  c_implicit(n) = write (read lower-bounded by 0); c_explicit(n) = write + n·read;
  c_rag(n) = n·read.
  """
  return (implicit_write_flops(m),
          explicit_write_flops(m) + uses * explicit_read_flops(m),
          uses * rag_read_flops(m))


def advantage_interval(m: ModelConfig) -> tuple[float, float]:
  """Usage counts between which explicit memory is the cheapest format.

  Lower end: explicit = RAG, n = w_exp / (r_rag − r_exp)  (0.4938);
  upper end: explicit = implicit, n = (w_imp − w_exp) / r_exp  (13,388).
  """
  w_exp, r_exp = explicit_write_flops(m), explicit_read_flops(m)
  lo = w_exp / (rag_read_flops(m) - r_exp)
  hi = (implicit_write_flops(m) - w_exp) / r_exp
  return lo, hi


def remark8(m: ModelConfig, n_tokens: int = REMARK8_TOKENS) -> tuple[float, float, float]:
  """(memory read FLOPs, sample FLOPs, read fraction) of Remark 8's speed-test sample.

  A sample of n tokens retrieves M memories per l_chunk chunk: (n/l_chunk)·M reads
  (20 for the paper), against `forward_flops(n)` (1.264 TFLOPs): 0.228%.
  """
  reads = n_tokens / m.chunk_length * m.memories_per_chunk * explicit_read_flops(m)
  total = forward_flops(m, n_tokens)
  return reads, total, reads / total


# ------------------------------------------------------------------ training / inference


def train_flop_terms(m: ModelConfig, *, use_memory: bool, grad_through_references: bool = True,
                     seq_len: int | None = None) -> dict[str, float]:
  """Training FLOPs per context token, term by term (sum = `train_flops_per_token`).

  With T = seq_len (default max_seq_len):
  - matmul:    6·N_matmul = 6·(L·P + D·V)
  - attention: 6·L·2·(T/2)·d = 6·L·T·d  (causal)
  - memory_attention (memory on): per memory layer, each query's QK and AV against
    M·k memory keys: 2·2·M·k·d_mem per layer forward, times 3 (fwd + bwd), or times 2
    without gradients into the memories (the dK, dV products are skipped).
  - prefix (memory on): the P_prefix sink tokens through all blocks, shared by the T
    context tokens, 6·L·P·P_prefix/T, and every query's QK and AV against their keys
    in all layers, 6·L·2·P_prefix·d.
  - reference_encoding (memory on): each l_chunk chunk brings one reference of
    l_ref + P_prefix tokens through the encoder layers (see `_encode_reference_macs`),
    2·MACs forward, times 3 when gradients flow through it; divided by l_chunk.
  - selection (memory on): the top-k scores, forward only, 2·MACs / l_chunk.
  """
  T = m.max_seq_len if seq_len is None else seq_len
  d = attention_width(m)
  terms = {"matmul": 6.0 * matmul_params(m), "attention": 6.0 * m.n_layers * T * d}
  if use_memory:
    n_mem = m.memories_per_chunk * m.memory_tokens_per_head
    passes = 3.0 if grad_through_references else 2.0
    terms["memory_attention"] = passes * 2 * 2 * m.n_memory_layers * n_mem * memory_query_width(m)
    terms["prefix"] = 6.0 * m.n_layers * (matmul_params_per_layer(m) * m.prefix_length / T
                                          + 2 * m.prefix_length * d)
    layers, selection = _encode_reference_macs(m, m.reference_length + m.prefix_length)
    enc_passes = 3.0 if grad_through_references else 1.0
    terms["reference_encoding"] = enc_passes * 2 * layers / m.chunk_length
    terms["selection"] = 2.0 * selection / m.chunk_length
  return terms


def train_flops_per_token(m: ModelConfig, *, use_memory: bool,
                          grad_through_references: bool = True,
                          seq_len: int | None = None) -> float:
  """Model FLOPs of one training step per context token (for MFU).

  Warmup (use_memory=False): 6·N_matmul + 6·L·T·d. Continual (use_memory=True) adds
  memory attention, in-step reference encoding and selection; see `train_flop_terms`.
  Reference tokens are not counted as tokens (the paper's 4M tokens per step are
  context tokens), so their cost shows up as FLOPs per context token.
  """
  return sum(train_flop_terms(m, use_memory=use_memory,
                              grad_through_references=grad_through_references,
                              seq_len=seq_len).values())


def forward_flops_per_token(m: ModelConfig, *, seq_len: int | None = None,
                            use_memory: bool = False) -> float:
  """Forward (evaluation) FLOPs per token of a T-token causal sequence, LM head included.

  2·N_matmul + 2·L·T·d, plus memory attention 2·2·(L_mem·M·k·d_mem + L·P_prefix·d)
  with memory on (the prefix tokens' own block FLOPs, P_prefix/T of the rest, are
  left out). Memories are assumed precomputed (warm start), so no encoding.
  """
  T = m.max_seq_len if seq_len is None else seq_len
  flops = 2.0 * matmul_params(m) + 2.0 * m.n_layers * T * attention_width(m)
  if use_memory:
    flops += _memory_read_flops_per_token(m)
  return flops


def decode_flops_per_token(m: ModelConfig, *, context_length: int,
                           use_memory: bool = False) -> float:
  """FLOPs of generating one token with `context_length` cached keys.

  2·N_matmul + 2·2·L·context_length·d, plus 2·2·(L_mem·M·k·d_mem + L·P_prefix·d)
  with memory on (memories precomputed; retrieval and loading not counted).
  """
  flops = 2.0 * matmul_params(m) + 4.0 * m.n_layers * context_length * attention_width(m)
  if use_memory:
    flops += _memory_read_flops_per_token(m)
  return flops


def _memory_read_flops_per_token(m: ModelConfig) -> float:
  """Forward QK + AV against the M·k memory keys (memory layers) and the prefix (all)."""
  n_mem = m.memories_per_chunk * m.memory_tokens_per_head
  return 4.0 * (m.n_memory_layers * n_mem * memory_query_width(m)
                + m.n_layers * m.prefix_length * attention_width(m))
