"""Scoring with the model: log-likelihoods of continuations under each memory mode.

Memory modes (m3jax.inference.generate.MEMORY_MODES): explicit (memories per the retrieval
schedule: the context's chunks retrieve their own memories with their own text
as a prompt would, and the continuation's chunks follow the generation rule),
none (the same model with the `<s>Reference:` sink prefix and every memory
masked), none-noprefix (the plain model, no prefix: a labelled extra) and rag
(the references retrieved once with the question text and prepended,
m3jax.retrieval.rag). Held-out perplexity never retrieves with the tokens it
scores (`Scorer.sequence_nll`). The leakage filter drops references whose
overlap with the question (the context, for perplexity the scored sequence)
exceeds the threshold; `Scorer.stats` counts what it dropped.

`score_multiple_choice` and `score_exact_match` turn a scorer's log-likelihoods
and a generator's completions into task metrics (m3jax.evaluation.text_metrics).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.core.config import ModelConfig
from m3jax.evaluation.tasks import MCItem, QAItem
from m3jax.evaluation.text_metrics import choose, exact_match, group_means
from m3jax.inference import generate as gen_lib
from m3jax.memory.source import pow2_at_least
from m3jax.model import kv_cache as decoding
from m3jax.model.transformer import Transformer
from m3jax.retrieval import rag as rag_lib
from m3jax.retrieval import schedule


# ---------------------------------------------------------------------------
# Requests


class LLRequest(NamedTuple):
  context: str
  continuation: str
  question: str  # leakage-filter text and RAG query


class LLResult(NamedTuple):
  logprob: float  # sum of log p(continuation tokens | context)
  n_tokens: int
  greedy: bool  # every continuation token is the argmax



# ---------------------------------------------------------------------------
# Log-likelihoods under the model


def split_continuation(tokenizer: Any, context: str, continuation: str,
                       context_tokens: Sequence[int] | None = None
                       ) -> tuple[list[int], list[int]]:
  """(context tokens, continuation tokens) as the model sees context + continuation.

  Encoding the continuation on its own is wrong for SentencePiece-style
  tokenizers: " Paris" alone becomes ["▁", "▁Paris"], while after "Answer:" the
  text holds ["▁Paris"]. So the whole string is encoded and split after the
  longest prefix it shares with the encoded context (lm-evaluation-harness does
  the same); when a token straddles the boundary, it goes to the continuation.
  """
  ctx = list(tokenizer.encode(context)) if context_tokens is None else list(context_tokens)
  whole = list(tokenizer.encode(context + continuation))
  n = 0
  while n < min(len(ctx), len(whole)) and ctx[n] == whole[n]:
    n += 1
  if n == len(whole):
    raise ValueError(f"continuation {continuation!r} encodes to no tokens after context "
                     f"{context[-40:]!r}")
  return whole[:n], whole[n:]


def _bucket_length(n: int, chunk_length: int) -> int:
  """Padded length for n tokens: a power of two (>= 16) up to one chunk, then whole
  chunks. Few distinct shapes (few compiles) without padding short items to a chunk."""
  if n <= chunk_length:
    return min(pow2_at_least(n, 16), chunk_length)
  return -(-n // chunk_length) * chunk_length


@functools.lru_cache(maxsize=None)
def _forward(config: ModelConfig):
  """Jitted (per-token log p(target), target is argmax) for a model config."""
  model = Transformer(config)

  def forward(params, tokens, targets, memories, memory_mask, with_prefix):
    logits = model.apply({"params": params}, tokens, memories=memories,
                         memory_mask=memory_mask, with_prefix=with_prefix)
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return token_lp, jnp.argmax(logits, axis=-1) == targets

  return jax.jit(forward, static_argnames=("with_prefix",))


@functools.lru_cache(maxsize=None)
def _shared_prefix_scores(config: ModelConfig, with_prefix: bool):
  """Jitted scoring of K continuations per context that encodes each context ONCE.

  (params, contexts [B, Tc] right-padded, lengths [B], continuations [B, K, Lc])
  -> (log p of each continuation token [B, K, Lc], token is argmax [B, K, Lc]).
  The context is prefilled into a KV cache, the cache is repeated K times and the
  continuation tokens are fed with decode steps. No memory: for modes none /
  none-noprefix / rag, where contexts (with RAG, five references) dwarf the
  choices; `with_prefix` puts the `<s>Reference:` sink in front (mode none).
  """
  model = Transformer(config)

  def score(params, contexts, lengths, conts):
    b, k, lc = conts.shape
    cache = decoding.init_cache(config, b, contexts.shape[1] + lc, with_prefix=with_prefix)
    logits, cache = model.apply({"params": params}, contexts, cache, lengths=lengths,
                                last_only=True, method=Transformer.prefill)
    cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)
    flat = conts.reshape(b * k, lc)
    first = jnp.repeat(logits, k, axis=0)  # [B*K, V] predicts continuation token 0

    def step(cache, tokens):
      logits, cache = model.apply({"params": params}, tokens, cache,
                                  method=Transformer.decode_step)
      return cache, logits

    _, later = jax.lax.scan(step, cache, flat[:, :-1].T)  # [Lc-1, B*K, V]
    logits = jnp.concatenate([first[None], later], axis=0)  # [Lc, B*K, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_lp = jnp.take_along_axis(logp, flat.T[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == flat.T
    return token_lp.T.reshape(b, k, lc), greedy.T.reshape(b, k, lc)

  return jax.jit(score)


class Scorer:
  """Log-likelihoods under one memory mode (see module docstring).

  explicit needs `retrieval` (MemoryRetrieval); rag needs `retriever` and
  `references`. Batches have a fixed size (short ones are padded with empty
  rows) and lengths are bucketed, so the forward compiles a handful of times.
  `stats` counts RAG retrievals and the references the filter dropped there;
  explicit-memory counts live in `retrieval.stats`.
  """

  def __init__(self, config: ModelConfig, params: Any, tokenizer: Any, mode: str, *,
               retrieval: schedule.MemoryRetrieval | None = None, retriever: Any = None,
               references: Any = None, batch_size: int = 8, rag_separator: str = "\n",
               on_scored: Callable[[int], None] | None = None):
    if mode not in gen_lib.MEMORY_MODES:
      raise ValueError(f"memory mode {mode!r}: expected one of {gen_lib.MEMORY_MODES}")
    if mode == "explicit" and retrieval is None:
      raise ValueError("memory mode 'explicit' needs a MemoryRetrieval")
    if mode == "rag" and (retriever is None or references is None):
      raise ValueError("memory mode 'rag' needs a retriever and the reference store")
    self.config, self.params, self.tokenizer, self.mode = config, params, tokenizer, mode
    self.retrieval, self.retriever, self.references = retrieval, retriever, references
    self.batch_size = batch_size
    self.on_scored = on_scored  # called with the sequences each batch scored (progress)
    self.separator = rag_lib.encode_separator(tokenizer, rag_separator)
    self.stats = dict(rag_retrievals=0, rag_refs=0, rag_dropped=0)
    self._forward = _forward(config)
    self._rag_cache: dict[str, list[list[int]]] = {}

  # ------------------------------------------------------------ public

  def loglikelihood(self, requests: Sequence[LLRequest]) -> list[LLResult]:
    """Log-likelihood of each continuation given its context."""
    bos = self.config.bos_id
    ctx_cache: dict[str, list[int]] = {}
    seqs, starts, filters = [], [], []
    if self.mode == "rag":
      self._retrieve_rag(sorted({r.question for r in requests}))
    for r in requests:
      if r.context not in ctx_cache:
        ctx_cache[r.context] = list(self.tokenizer.encode(r.context))
      ctx, cont = split_continuation(self.tokenizer, r.context, r.continuation,
                                     ctx_cache[r.context])
      ctx = [bos] + ctx
      if self.mode == "rag":
        ctx = rag_lib.build_context(self._rag_cache[r.question], ctx, bos_id=bos,
                                    separator=self.separator)
      seqs.append(ctx + cont)
      starts.append(len(ctx))
      filters.append(r.question)
    if self.mode == "explicit":  # memories follow the chunk schedule: full forward
      return self._score(seqs, starts, starts, filters)
    return self._score_shared([s[:n] for s, n in zip(seqs, starts)],
                              [s[n:] for s, n in zip(seqs, starts)])

  def sequence_nll(self, sequences: Sequence[Sequence[int]]) -> tuple[float, int]:
    """(sum of -log p, tokens scored) over every token after the first of each sequence.

    No self-retrieval: the memories (explicit) or references (rag) that chunk c is
    scored with are retrieved with the text BEFORE chunk c, as in generation, never
    with the tokens being scored. Explicit memory follows the generation schedule
    from a one-token prompt (chunk c >= 1 queries with chunk c-1's tokens, chunk 0
    gets none); rag scores each chunk c in its own context, the references
    retrieved with chunk c-1's tokens (none for chunk 0) in front of the sequence up
    to chunk c. The leakage filter compares references with the whole sequence.
    """
    seqs = [list(map(int, s)) for s in sequences]
    texts = [self._text(s) for s in seqs]
    if self.mode == "rag":
      results = self._score_rag_chunks(seqs, texts)
    else:
      results = self._score(seqs, [1] * len(seqs), [1] * len(seqs), texts)
    return -sum(r.logprob for r in results), sum(r.n_tokens for r in results)

  def _score_rag_chunks(self, seqs: list[list[int]], texts: list[str]) -> list[LLResult]:
    """Each chunk of each sequence scored after the references its predecessor retrieves."""
    L = self.config.chunk_length
    where, queries, prefixes, filters = [], [], [], []
    for i, s in enumerate(seqs):
      for c in range(-(-(len(s) - 1) // L)):
        where.append((i, c))
        queries.append(self._text(s[(c - 1) * L:c * L]) if c else "")
        prefixes.append(s[:(c + 1) * L + 1])
        filters.append(texts[i])
    got = rag_lib.rag_contexts(self.retriever, self.references, prefixes, queries,
                               bos_id=self.config.bos_id, separator=self.separator,
                               filter_texts=filters)
    self._count_rag(sum(bool(q.strip()) for q in queries), got)
    # Target s[c*L + 1] (chunk c's first) sits at index len(context) - len(prefix) + c*L + 1
    # (build_context drops a leading <s> of the prefix and adds its own).
    starts = [len(ctx) - len(p) + c * L + 1
              for ctx, p, (_, c) in zip(got.contexts, prefixes, where)]
    scored = self._score(got.contexts, [len(ctx) for ctx in got.contexts], starts, filters)
    out = [LLResult(0.0, 0, True) for _ in seqs]
    for (i, _), r in zip(where, scored):
      o = out[i]
      out[i] = LLResult(o.logprob + r.logprob, o.n_tokens + r.n_tokens, o.greedy and r.greedy)
    return out

  # ------------------------------------------------------------ internals

  @property
  def _specials(self) -> frozenset[int]:
    c = self.config
    return frozenset((c.pad_id, c.bos_id, c.eos_id))

  def _text(self, tokens: Sequence[int]) -> str:
    return self.tokenizer.decode([t for t in tokens if t not in self._specials])

  def _count_rag(self, retrievals: int,
                 got: rag_lib.RagReferences | rag_lib.RagContexts) -> None:
    self.stats["rag_retrievals"] += retrievals
    self.stats["rag_refs"] += got.n_refs
    self.stats["rag_dropped"] += got.n_dropped

  def _retrieve_rag(self, questions: Sequence[str]) -> None:
    """References per question, retrieved once (query and filter text: the question)."""
    todo = [q for q in questions if q not in self._rag_cache]
    if not todo:
      return
    got = rag_lib.retrieve_references(self.retriever, self.references, todo, todo)
    self._count_rag(len(todo), got)
    self._rag_cache.update(zip(todo, got.tokens))

  def _score_shared(self, contexts: list[list[int]], conts: list[list[int]]
                    ) -> list[LLResult]:
    """Log-likelihood of each continuation, each distinct context encoded once."""
    cfg, B = self.config, self.batch_size
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, c in enumerate(contexts):
      groups.setdefault(tuple(c), []).append(i)
    keys = sorted(groups, key=len)
    out: list[LLResult | None] = [None] * len(contexts)
    fn = _shared_prefix_scores(cfg, gen_lib.uses_reference_prefix(self.mode))
    for lo in range(0, len(keys), B):
      batch = keys[lo:lo + B]
      tc = _bucket_length(max(len(c) for c in batch), cfg.chunk_length)
      k = pow2_at_least(max(len(groups[c]) for c in batch))
      lc = pow2_at_least(max(len(conts[i]) for c in batch for i in groups[c]))
      ctx = np.full((B, tc), cfg.pad_id, np.int32)
      lengths = np.ones((B,), np.int32)
      ct = np.full((B, k, lc), cfg.pad_id, np.int32)
      for j, c in enumerate(batch):
        ctx[j, :len(c)], lengths[j] = c, len(c)
        for m, i in enumerate(groups[c]):
          ct[j, m, :len(conts[i])] = conts[i]
      lp, greedy = fn(self.params, jnp.asarray(ctx), jnp.asarray(lengths), jnp.asarray(ct))
      lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
      for j, c in enumerate(batch):
        for m, i in enumerate(groups[c]):
          n = len(conts[i])
          out[i] = LLResult(float(lp[j, m, :n].sum()), n, bool(greedy[j, m, :n].all()))
      if self.on_scored is not None:
        self.on_scored(sum(len(groups[c]) for c in batch))
    return out  # type: ignore[return-value]

  def _score(self, seqs: list[list[int]], n_prompts: list[int], starts: list[int],
             filters: list[str | None]) -> list[LLResult]:
    """Scores targets seq[j] for j >= starts[i] (given seq[:j]) of every sequence."""
    cfg, L, B = self.config, self.config.chunk_length, self.batch_size
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[LLResult | None] = [None] * len(seqs)
    for lo in range(0, len(order), B):
      rows = order[lo:lo + B]
      t = _bucket_length(max(len(seqs[i]) - 1 for i in rows), L)
      tokens = np.full((B, t), cfg.pad_id, np.int32)
      targets = np.full((B, t), cfg.pad_id, np.int32)
      for j, i in enumerate(rows):
        s = seqs[i]
        tokens[j, :len(s) - 1] = s[:-1]
        targets[j, :len(s) - 1] = s[1:]
      mem = mask = None
      if self.mode == "explicit":
        ids = schedule.scheduled_ref_ids(
            self.retrieval, [seqs[i] for i in rows], [min(n_prompts[i], len(seqs[i]) - 1)
                                                      for i in rows],
            [len(seqs[i]) - 1 for i in rows], -(-t // L), [filters[i] for i in rows])
        ids = np.concatenate([ids, np.full((B - len(rows),) + ids.shape[1:], -1, np.int64)])
        mem, mask = self.retrieval.lookup(ids)
        mem, mask = jnp.asarray(mem), jnp.asarray(mask)
      lp, greedy = self._forward(self.params, jnp.asarray(tokens), jnp.asarray(targets), mem,
                                 mask, with_prefix=gen_lib.uses_reference_prefix(self.mode))
      lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
      for j, i in enumerate(rows):
        # Target seq[k] sits at input position k - 1.
        a, b = starts[i] - 1, len(seqs[i]) - 1
        out[i] = LLResult(float(lp[j, a:b].sum()), b - a, bool(greedy[j, a:b].all()))
      if self.on_scored is not None:
        self.on_scored(len(rows))
    return out  # type: ignore[return-value]



# ---------------------------------------------------------------------------
# Task metrics from scores


def score_multiple_choice(scorer: Any, items: Sequence[MCItem]) -> dict[str, Any]:
  """acc / acc_norm (overall and per group) from `scorer.loglikelihood`."""
  requests, owner = [], []
  for i, item in enumerate(items):
    if not item.choices or not 0 <= item.gold < len(item.choices):
      raise ValueError(f"multiple-choice item {i}: gold index {item.gold} outside "
                       f"{len(item.choices)} choices")
    for c in item.choices:
      requests.append(LLRequest(item.context, c, item.question))
      owner.append(i)
  results = scorer.loglikelihood(requests)
  per_item: list[list[float]] = [[] for _ in items]
  for i, r in zip(owner, results):
    per_item[i].append(r.logprob)
  acc, acc_norm = [], []
  for item, lps in zip(items, per_item):
    a, an = choose(lps, item.choices)
    acc.append(float(a == item.gold))
    acc_norm.append(float(an == item.gold))
  groups = [item.group for item in items]
  return dict(n=len(items), acc=group_means(acc, groups), acc_norm=group_means(acc_norm, groups))


def score_exact_match(complete: Callable[[Sequence[QAItem]], Sequence[str]],
                      items: Sequence[QAItem]) -> dict[str, Any]:
  """Exact match (overall and per group); `complete(items)` returns one text per item."""
  preds = list(complete(items))
  if len(preds) != len(items):
    raise ValueError(f"{len(preds)} predictions for {len(items)} questions")
  em = [float(exact_match(p, it.answer)) for p, it in zip(preds, items)]
  examples = [dict(question=it.question, answer=it.answer, prediction=p)
              for it, p in list(zip(items, preds))[:5]]
  return dict(n=len(items), exact_match=group_means(em, [it.group for it in items]),
              examples=examples)

