"""Checkpoint evaluation: perplexity, multiple choice, knowledge QA, in every memory mode.

Tasks (`TASKS`):

- perplexity: held-out packed sequences (the `validation` split of prepare-data's
  packed dataset): token-level negative log-likelihood and its exp.
- hellaswag / arc / boolq: multiple choice by log-likelihood of each choice as a
  continuation of the context, lm-evaluation-harness style JSONL
  (HellaSwag {ctx, endings, label}; ARC {question, choices{text, label},
  answerKey}; BoolQ {passage, question, answer}). acc picks the largest summed
  log-likelihood, acc_norm the largest per character of the continuation.
- kw_qa: the knowledge world's held-out questions, answered by greedy generation;
  exact match after normalisation (`normalize_answer`), per entity group (seen,
  memory_taught, unseen) and overall.
- kw_mc: the same questions as multiple choice (gold vs its distractors).
- kw_coverage: for the same questions, how often a retrieved reference holds the
  answer and its sparse memory kept the answer's first token, per memory layer
  (m3jax.evaluation.coverage); explicit mode only, since it describes the memories.

Memory modes (m3jax.inference.generate.MEMORY_MODES): explicit (memories per the retrieval
schedule: for scoring, the context's chunks retrieve their own memories with
their own text as a prompt would, and the continuation's chunks follow the
generation rule), none (the plain model) and rag (the references retrieved once
with the question text, prepended). The leakage filter drops references whose
overlap with the question (the context, for perplexity the scored sequence)
exceeds the threshold; each result records how many references it dropped, and
`unfiltered=True` repeats the memory modes with the filter off.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import string
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.model import kv_cache as decoding
from m3jax.inference import generate as gen_lib
from m3jax.retrieval import rag as rag_lib
from m3jax.retrieval import schedule
from m3jax.core.config import ModelConfig
from m3jax.memory.source import pow2_at_least
from m3jax.model.transformer import Transformer

TASKS = ("perplexity", "hellaswag", "arc", "boolq", "kw_qa", "kw_mc", "kw_coverage")
JSONL_TASKS = ("hellaswag", "arc", "boolq")
GROUPS = ("seen", "memory_taught", "unseen")


# ---------------------------------------------------------------------------
# Items


class MCItem(NamedTuple):
  """One multiple-choice question: continuations of `context`, `gold` is correct."""
  context: str
  choices: tuple[str, ...]
  gold: int
  question: str  # the leakage filter's text and the RAG query
  group: str = ""


class QAItem(NamedTuple):
  prompt: str
  answer: str
  question: str
  group: str = ""


class LLRequest(NamedTuple):
  context: str
  continuation: str
  question: str  # leakage-filter text and RAG query


class LLResult(NamedTuple):
  logprob: float  # sum of log p(continuation tokens | context)
  n_tokens: int
  greedy: bool  # every continuation token is the argmax


# ---------------------------------------------------------------------------
# Metrics (pure)


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
  """SQuAD-style: first line, lower case, no punctuation or articles, single spaces."""
  text = text.strip().split("\n", 1)[0] if text.strip() else ""
  text = text.lower().translate(_PUNCT)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
  return normalize_answer(prediction) == normalize_answer(answer)


def choose(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
  """(argmax of summed log-likelihood, argmax per character of the continuation)."""
  lp = np.asarray(logprobs, np.float64)
  chars = np.asarray([max(len(c), 1) for c in choices], np.float64)
  return int(np.argmax(lp)), int(np.argmax(lp / chars))


def _group_means(values: Sequence[float], groups: Sequence[str]) -> dict[str, Any]:
  out = {"all": float(np.mean(values)) if len(values) else float("nan")}
  for g in sorted(set(groups) - {""}):
    sel = [v for v, gg in zip(values, groups) if gg == g]
    out[g] = float(np.mean(sel))
  return out


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
  return dict(n=len(items), acc=_group_means(acc, groups), acc_norm=_group_means(acc_norm, groups))


def score_exact_match(complete: Callable[[Sequence[QAItem]], Sequence[str]],
                      items: Sequence[QAItem]) -> dict[str, Any]:
  """Exact match (overall and per group); `complete(items)` returns one text per item."""
  preds = list(complete(items))
  if len(preds) != len(items):
    raise ValueError(f"{len(preds)} predictions for {len(items)} questions")
  em = [float(exact_match(p, it.answer)) for p, it in zip(preds, items)]
  examples = [dict(question=it.question, answer=it.answer, prediction=p)
              for it, p in list(zip(items, preds))[:5]]
  return dict(n=len(items), exact_match=_group_means(em, [it.group for it in items]),
              examples=examples)


def perplexity_from(nll_sum: float, n_tokens: int) -> dict[str, Any]:
  nll = nll_sum / max(n_tokens, 1)
  return dict(tokens=int(n_tokens), nll=float(nll), perplexity=float(math.exp(nll)))


# ---------------------------------------------------------------------------
# Scoring with the model


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
def _shared_prefix_scores(config: ModelConfig):
  """Jitted scoring of K continuations per context that encodes each context ONCE.

  (params, contexts [B, Tc] right-padded, lengths [B], continuations [B, K, Lc])
  -> (log p of each continuation token [B, K, Lc], token is argmax [B, K, Lc]).
  The context is prefilled into a KV cache, the cache is repeated K times and the
  continuation tokens are fed with decode steps. No memory: for modes none / rag,
  where contexts (with RAG, five references) dwarf the choices.
  """
  model = Transformer(config)

  def score(params, contexts, lengths, conts):
    b, k, lc = conts.shape
    cache = decoding.init_cache(config, b, contexts.shape[1] + lc, with_prefix=False)
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
               references: Any = None, batch_size: int = 8, rag_separator: str = "\n"):
    if mode not in gen_lib.MEMORY_MODES:
      raise ValueError(f"memory mode {mode!r}: expected one of {gen_lib.MEMORY_MODES}")
    if mode == "explicit" and retrieval is None:
      raise ValueError("memory mode 'explicit' needs a MemoryRetrieval")
    if mode == "rag" and (retriever is None or references is None):
      raise ValueError("memory mode 'rag' needs a retriever and the reference store")
    self.config, self.params, self.tokenizer, self.mode = config, params, tokenizer, mode
    self.retrieval, self.retriever, self.references = retrieval, retriever, references
    self.batch_size = batch_size
    self.separator = list(tokenizer.encode(rag_separator)) if rag_separator else []
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

    Explicit memory treats the whole sequence as a prompt (each chunk retrieves
    with its own text), filtered against the sequence's own text; RAG
    retrieves once with the first chunk's text and prepends the references.
    """
    seqs = [list(map(int, s)) for s in sequences]
    texts = [self.tokenizer.decode([t for t in s if t not in self._specials]) for s in seqs]
    prompts, starts = [len(s) for s in seqs], [1] * len(seqs)
    if self.mode == "rag":
      L = self.config.chunk_length
      queries = [self.tokenizer.decode([t for t in s[:L] if t not in self._specials])
                 for s in seqs]
      got = rag_lib.rag_contexts(self.retriever, self.references, seqs, queries,
                                 bos_id=self.config.bos_id, separator=self.separator,
                                 filter_texts=texts)
      self._count_rag(got)
      # Score the sequence's own tokens only: those after the references.
      # (build_context drops a leading <s> of the sequence and adds its own.)
      starts = [len(c) - len(s) + 1 for c, s in zip(got.contexts, seqs)]
      seqs, prompts = got.contexts, [len(c) for c in got.contexts]
    results = self._score(seqs, prompts, starts, texts)
    return -sum(r.logprob for r in results), sum(r.n_tokens for r in results)

  # ------------------------------------------------------------ internals

  @property
  def _specials(self) -> frozenset[int]:
    c = self.config
    return frozenset((c.pad_id, c.bos_id, c.eos_id))

  def _count_rag(self, got: rag_lib.RagContexts) -> None:
    self.stats["rag_retrievals"] += len(got.contexts)
    self.stats["rag_refs"] += int((got.ref_ids >= 0).sum())
    self.stats["rag_dropped"] += int(got.dropped.sum())

  def _retrieve_rag(self, questions: Sequence[str]) -> None:
    todo = [q for q in questions if q not in self._rag_cache]
    if not todo:
      return
    got = self.retriever.retrieve(todo, todo)
    toks, lens = self.references.tokens_by_ids(got.ids)
    toks, lens = np.asarray(toks), np.asarray(lens)
    self.stats["rag_retrievals"] += len(todo)
    self.stats["rag_refs"] += int((got.ids >= 0).sum())
    self.stats["rag_dropped"] += int(got.dropped.sum())
    for row, q in enumerate(todo):
      self._rag_cache[q] = [toks[row, j, :lens[row, j]].tolist()
                            for j in range(got.ids.shape[1]) if got.ids[row, j] >= 0]

  def _score_shared(self, contexts: list[list[int]], conts: list[list[int]]
                    ) -> list[LLResult]:
    """Log-likelihood of each continuation, each distinct context encoded once."""
    cfg, B = self.config, self.batch_size
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, c in enumerate(contexts):
      groups.setdefault(tuple(c), []).append(i)
    keys = sorted(groups, key=len)
    out: list[LLResult | None] = [None] * len(contexts)
    fn = _shared_prefix_scores(cfg)
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
                                 mask, with_prefix=self.mode == "explicit")
      lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
      for j, i in enumerate(rows):
        # Target seq[k] sits at input position k - 1.
        a, b = starts[i] - 1, len(seqs[i]) - 1
        out[i] = LLResult(float(lp[j, a:b].sum()), b - a, bool(greedy[j, a:b].all()))
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# Data


def parse_tasks(specs: Sequence[str]) -> dict[str, str | None]:
  """`--task` values: ["perplexity", "arc=f.jsonl"] -> {"perplexity": None, "arc": "f.jsonl"}."""
  out: dict[str, str | None] = {}
  for spec in specs:
    name, _, path = spec.partition("=")
    name = name.strip()
    if name not in TASKS:
      raise ValueError(f"--task: unknown task {name!r}; expected one of {TASKS}")
    if name in JSONL_TASKS and not path:
      raise ValueError(f"--task: {name} needs a JSONL file: --task={name}=PATH")
    if name not in JSONL_TASKS and path:
      raise ValueError(f"--task: {name} takes no file (got {path!r})")
    out[name] = path or None
  if not out:
    raise ValueError("--task: no tasks given")
  return out


def _read_jsonl(path: str) -> Iterable[tuple[int, dict[str, Any]]]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"task file {path} does not exist")
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          yield n, json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e


def _field(rec: dict[str, Any], name: str, where: str) -> Any:
  if name not in rec:
    raise ValueError(f"{where}: missing field `{name}` (have {sorted(rec)})")
  return rec[name]


def _hellaswag_text(text: str) -> str:
  """lm-evaluation-harness's HellaSwag clean-up of WikiHow artefacts."""
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def load_mc_jsonl(task: str, path: str, limit: int | None = None) -> list[MCItem]:
  """Multiple-choice items from an lm-evaluation-harness style JSONL file."""
  items = []
  for n, rec in _read_jsonl(path):
    where = f"{path}:{n}"
    if task == "hellaswag":
      if "ctx_a" in rec and "ctx_b" in rec:
        ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
        if rec.get("activity_label"):
          ctx = f"{rec['activity_label']}: {ctx}"
      else:
        ctx = _field(rec, "ctx", where)
      ctx = _hellaswag_text(ctx)
      endings = _field(rec, "endings", where)
      choices = tuple(" " + _hellaswag_text(e) for e in endings)
      gold = int(_field(rec, "label", where))
      items.append(MCItem(ctx, choices, gold, ctx))
    elif task == "arc":
      question = _field(rec, "question", where)
      choices = rec.get("choices")
      if isinstance(question, dict):  # the original ARC layout {stem, choices: [...]}
        choices = [{"text": c["text"], "label": c["label"]} for c in question["choices"]]
        question = question["stem"]
      if isinstance(choices, dict):
        texts, labels = list(choices["text"]), [str(x) for x in choices["label"]]
      elif isinstance(choices, list):
        texts, labels = [c["text"] for c in choices], [str(c["label"]) for c in choices]
      else:
        raise ValueError(f"{where}: field `choices` must be {{text, label}} or a list")
      key = str(_field(rec, "answerKey", where))
      if key not in labels:
        raise ValueError(f"{where}: answerKey {key!r} is not among the labels {labels}")
      items.append(MCItem(f"Question: {question}\nAnswer:", tuple(" " + t for t in texts),
                          labels.index(key), question))
    elif task == "boolq":
      question = str(_field(rec, "question", where)).strip()
      passage = str(_field(rec, "passage", where)).strip()
      answer = _field(rec, "answer", where)
      if isinstance(answer, str):
        if answer.lower() not in ("true", "false", "yes", "no"):
          raise ValueError(f"{where}: field `answer` must be a boolean, got {answer!r}")
        answer = answer.lower() in ("true", "yes")
      q = question[0].upper() + question[1:] if question else question
      items.append(MCItem(f"{passage}\nQuestion: {q}?\nAnswer:", (" no", " yes"),
                          int(bool(answer)), question))
    else:
      raise ValueError(f"unknown multiple-choice task {task!r}; expected one of {JSONL_TASKS}")
    if limit and len(items) >= limit:
      break
  if not items:
    raise ValueError(f"task file {path} holds no items")
  return items


def load_knowledge_qa(data_root: str, limit: int | None = None,
                      seed: int = 0) -> tuple[list[QAItem], list[MCItem]]:
  """The knowledge world's held-out questions (prepare-data's `qa` dataset, split eval).

  Returns (QA items for exact match, MC items with the gold answer among its
  distractors at a seeded random position). `limit` keeps an equal share per group.
  """
  from data_pipeline import prepare as prepare_lib
  from data_pipeline import tfds_builders
  path = prepare_lib.dataset_path(data_root, "qa")
  source = tfds_builders.open_split(path, "eval")
  dec = lambda x: x.decode("utf-8") if isinstance(x, bytes) else str(x)
  records = [source[i] for i in range(len(source))]
  if limit:
    by_group: dict[str, list[Any]] = {}
    for r in records:
      by_group.setdefault(dec(r["group"]), []).append(r)
    share = max(1, limit // max(len(by_group), 1))
    records = [r for g in sorted(by_group) for r in by_group[g][:share]]
  rng = np.random.default_rng(seed)
  qa, mc = [], []
  for r in records:
    question, prompt, answer = dec(r["question"]), dec(r["prompt"]), dec(r["answer"])
    group = dec(r["group"])
    qa.append(QAItem(prompt, answer, question, group))
    options = [answer] + [dec(d) for d in r["distractors"]]
    perm = rng.permutation(len(options))
    mc.append(MCItem(prompt, tuple(" " + options[j] for j in perm),
                     int(np.nonzero(perm == 0)[0][0]), question, group))
  if not qa:
    raise ValueError(f"{path}: the eval split holds no questions")
  return qa, mc


def load_heldout_sequences(data_root: str, limit: int | None = None) -> list[np.ndarray]:
  """Held-out packed sequences (tokens + next_token) from prepare-data's validation split.

  Padding is dropped: it is never text, and packing with `data.pack_align_chunks`
  puts it inside sequences, where scoring it would count tokens no model predicts.
  """
  from data_pipeline import loader as loader_lib
  from data_pipeline import prepare as prepare_lib
  source = loader_lib.PackedSource(prepare_lib.dataset_path(data_root, "packed"), "validation")
  n = len(source) if not limit else min(limit, len(source))
  out = []
  for i in range(n):
    r = source[i]
    seq = np.concatenate([r["tokens"], [r["next_token"]]]).astype(np.int64)
    seq = seq[seq != source.pad_id]
    if len(seq) > 1:
      out.append(seq)
  return out


# ---------------------------------------------------------------------------
# Running tasks in every mode


@dataclasses.dataclass
class EvalSetup:
  """Everything the evaluation needs; memory pieces may be None for mode 'none' only."""
  config: ModelConfig
  params: Any
  tokenizer: Any
  retriever: Any = None  # m3jax.retrieval.retriever.Retriever (leakage filter on, by default)
  references: Any = None  # reference store (RAG text, leakage filter)
  memory_source: Any = None  # m3jax.memory.source.MemorySource (explicit)
  batch_size: int = 8
  max_new_tokens: int = 16


def _mode_objects(setup: EvalSetup, mode: str, retriever: Any):
  retrieval = None
  if mode == "explicit":
    if retriever is None or setup.memory_source is None:
      raise ValueError("memory mode 'explicit' needs an index (retriever) and a memory "
                       "source (bank)")
    retrieval = schedule.MemoryRetrieval.for_model(
        setup.config, retriever, setup.memory_source,
        lambda ids: setup.tokenizer.decode(ids), cache_queries=True)
  if mode == "rag" and (retriever is None or setup.references is None):
    raise ValueError("memory mode 'rag' needs an index (retriever) and the references")
  return retrieval


def run_task(setup: EvalSetup, task: str, data: Any, mode: str, *,
             retriever: Any = None) -> dict[str, Any]:
  """One task in one memory mode; returns its metrics plus retrieval counts."""
  if task == "kw_coverage":
    if mode != "explicit":
      raise ValueError(f"kw_coverage describes explicit memories; mode {mode!r} has none")
    from m3jax.evaluation import coverage as memory_coverage
    return memory_coverage.answer_coverage(data, setup.config, setup.params, setup.tokenizer,
                                           retriever, setup.references)
  retrieval = _mode_objects(setup, mode, retriever)
  scorer = Scorer(setup.config, setup.params, setup.tokenizer, mode, retrieval=retrieval,
                  retriever=retriever, references=setup.references,
                  batch_size=setup.batch_size)
  if task == "perplexity":
    nll, n = scorer.sequence_nll(data)
    result = perplexity_from(nll, n)
  elif task in JSONL_TASKS or task == "kw_mc":
    result = score_multiple_choice(scorer, data)
  elif task == "kw_qa":
    textgen = gen_lib.TextGenerator(gen_lib.Generator(setup.config, setup.params),
                                    setup.tokenizer, mode, retrieval=retrieval,
                                    retriever=retriever, references=setup.references)

    def complete(items):
      done = textgen.complete([it.prompt for it in items], max_new_tokens=setup.max_new_tokens,
                              batch_size=setup.batch_size,
                              queries=[it.question for it in items],
                              filter_texts=[it.question for it in items])
      return [c.text for c in done]

    result = score_exact_match(complete, data)
    scorer.stats["rag_retrievals"] += textgen.stats["retrievals"] if mode == "rag" else 0
    scorer.stats["rag_refs"] += textgen.stats["rag_refs"]
    scorer.stats["rag_dropped"] += textgen.stats["rag_dropped"]
  else:
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
  if mode == "explicit":
    st = retrieval.stats
    result["retrieval"] = dict(queries=st["queries"], searches=st["searches"], refs=st["refs"],
                               dropped_by_filter=st["dropped"])
  elif mode == "rag":
    result["retrieval"] = dict(queries=scorer.stats["rag_retrievals"],
                               refs=scorer.stats["rag_refs"],
                               dropped_by_filter=scorer.stats["rag_dropped"])
  return result


def run_all(setup: EvalSetup, tasks: dict[str, Any], modes: Sequence[str], *,
            unfiltered: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Every task in every mode; with `unfiltered`, memory modes again with the filter off.

  Returns {task: {mode: metrics}}; unfiltered runs appear as mode "<mode>/unfiltered".
  """
  results: dict[str, Any] = {}
  for task, data in tasks.items():
    results[task] = {}
    for mode in modes:
      if task == "kw_coverage" and mode != "explicit":
        continue
      log(f"eval: {task} / {mode}")
      results[task][mode] = run_task(setup, task, data, mode, retriever=setup.retriever)
      if unfiltered and mode != "none" and setup.retriever is not None:
        log(f"eval: {task} / {mode} (leakage filter off)")
        results[task][f"{mode}/unfiltered"] = run_task(
            setup, task, data, mode, retriever=setup.retriever.with_threshold(None))
  return results


_HEADLINE = dict(perplexity=("perplexity",), hellaswag=("acc", "acc_norm"),
                 arc=("acc", "acc_norm"), boolq=("acc",), kw_qa=("exact_match",),
                 kw_mc=("acc", "acc_norm"))


def format_table(results: dict[str, Any]) -> str:
  """A plain-text table: one row per task metric (and group), one column per mode."""
  modes: list[str] = []
  for per_mode in results.values():
    modes += [m for m in per_mode if m not in modes]
  rows = []
  for task, per_mode in results.items():
    headline = _HEADLINE.get(task) or tuple(
        k for r in per_mode.values() for k in r if k.startswith("answer_"))
    for metric in dict.fromkeys(headline):
      keys = ["all"]
      for r in per_mode.values():
        v = r.get(metric)
        if isinstance(v, dict):
          keys += [k for k in v if k not in keys]
      for key in keys:
        label = (task if metric == task else f"{task} {metric}") + (
            f" [{key}]" if key != "all" else "")
        cells = []
        for m in modes:
          v = per_mode.get(m, {}).get(metric)
          v = v.get(key) if isinstance(v, dict) else (v if key == "all" else None)
          cells.append("-" if v is None else (f"{v:.3f}" if metric != "perplexity"
                                              else f"{v:.2f}"))
        rows.append([label] + cells)
    dropped = [str(per_mode.get(m, {}).get("retrieval", {}).get("dropped_by_filter", "-"))
               for m in modes]
    if any(d != "-" for d in dropped):
      rows.append([f"{task} refs dropped by filter"] + dropped)
  header = ["task / metric"] + modes
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
  line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
