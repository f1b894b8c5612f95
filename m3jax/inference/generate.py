"""Batched generation with explicit memory, without memory, or with text RAG.

`Generator.generate(prompts, ...)` runs right-padded prompts (token ids, each
starting with the context `<s>`) through one jitted `prefill` and then decodes
with a jitted `jax.lax.while_loop` over `Transformer.decode_step`. With memory,
the memories live in the KV cache (m3jax.model.kv_cache, docs/model.md "Memory
attention"): the loop is cut into SEGMENTS at the chunk boundaries where the
retrieval schedule (m3jax.retrieval.schedule) asks for new memories; each segment
first places the current memories into the cache's memory slots, then generates
its tokens on the device with no host round trip, each step one attention over
the cache. Between segments the host retrieves the next chunk's memories for the
rows that cross a boundary. The query of a boundary (the L tokens before it) is
known one step before the boundary's step, so that step (which still reads the
old chunk's memories) is dispatched first and runs on the device while the host
searches the index and reads the bank. Shapes never change between segments (the
step limit is a traced scalar), so nothing recompiles per chunk: one compile per
(batch, padded prompt length, max_new_tokens, sampling kind, memory on/off).
(Because of that overlap, a row whose eos is the token just before a boundary
still retrieves once; its tokens are unaffected.)

Rows of different lengths stay aligned to the same chunk grid because prompts
are right-padded (chunk c always covers context indices [c*L, (c+1)*L)); a row
therefore crosses chunk boundaries at its own steps, and each boundary of each
row gets its own retrieval.

Sampling: greedy (temperature 0), temperature, and nucleus (top-p); the token
of step s is drawn with `fold_in(key, s)`, so a fixed key gives fixed outputs.
Generation stops at eos (per row; the row then emits pad) or max_new_tokens.
Memory modes (`MEMORY_MODES`): explicit = memories per the schedule; none = the
same model with the `<s>Reference:` sink prefix it was trained with and every
memory masked (the fair no-memory baseline of a continual checkpoint);
none-noprefix = the plain model without the prefix (a labelled extra: out of
distribution for a continual checkpoint, the natural mode of a warmup one); rag =
the retrieved references' text prepended to the prompt (m3jax.retrieval.rag),
then the plain model.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import chat as chat_lib
from m3jax.core.errors import InputError
from m3jax.model import kv_cache as decoding
from m3jax.retrieval import schedule
from m3jax.core.config import ModelConfig
from m3jax.model.transformer import Transformer
from m3jax.retrieval import rag as rag_lib

MEMORY_MODES = ("explicit", "none", "rag", "none-noprefix")
NO_MEMORY_MODES = ("none", "none-noprefix")


def uses_reference_prefix(mode: str) -> bool:
  """Whether a memory mode runs with the `<s>Reference:` sink prefix: explicit memory
  needs it, and `none` keeps it (memories masked) so that a continual checkpoint is
  compared with itself, not with an input it never saw in training."""
  if mode not in MEMORY_MODES:
    raise ValueError(f"memory mode {mode!r}: expected one of {MEMORY_MODES}")
  return mode in ("explicit", "none")


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 = greedy; top_p < 1 = nucleus sampling over the tempered logits."""
  temperature: float = 0.0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0.0:
      raise InputError(f"sampling temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise InputError(f"sampling top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0

  @property
  def nucleus(self) -> bool:
    return not self.greedy and self.top_p < 1.0


def sample_tokens(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
                  *, greedy: bool, nucleus: bool) -> jax.Array:
  """Next tokens [B] from logits [B, V].

  Nucleus: keep the most probable tokens whose cumulative probability before
  them is < top_p (so the best token is always kept: top_p -> 0 is greedy),
  renormalise, sample.
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if nucleus:
    order = jnp.argsort(-logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
    pick = jax.random.categorical(key, sorted_logits, axis=-1)
    return jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class GenerationOutput(NamedTuple):
  tokens: np.ndarray  # int32 [B, max_new_tokens]: generated ids, pad after the end
  lengths: np.ndarray  # int32 [B]: tokens generated, the eos excluded
  stopped_at_eos: np.ndarray  # bool [B]
  retrievals: int  # retrieval queries issued (0 without explicit memory)

  def completions(self) -> list[list[int]]:
    return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


class _DecodeState(NamedTuple):
  cache: decoding.KVCache
  last: jax.Array  # [B] the token to feed next
  out: jax.Array  # [B, N] generated tokens
  done: jax.Array  # [B] bool
  step: jax.Array  # scalar int32: index (in out) of the next token to sample


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def pad_prompts(prompts: Sequence[Sequence[int]], multiple: int, pad_id: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists to a multiple of `multiple`: (tokens [B, T], lengths [B])."""
  if not prompts:
    raise InputError("no prompts")
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min() < 1:
    raise InputError(f"prompt {int(np.argmin(lengths))} is empty; a context starts with <s>")
  t = _round_up(int(lengths.max()), multiple)
  tokens = np.full((len(prompts), t), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = p
  return tokens, lengths


@functools.lru_cache(maxsize=None)
def _compiled(config: ModelConfig):
  """Jitted (prefill, segment) for a model config, shared by every Generator of it."""
  model = Transformer(config)

  def prefill(params, tokens, lengths, memories, memory_mask, key, temperature, top_p, *,
              greedy, nucleus, max_new, max_length, with_prefix, stop_at_eos):
    b = tokens.shape[0]
    cache = decoding.init_cache(config, b, max_length, with_prefix=with_prefix,
                                with_memory=memories is not None)
    logits, cache = model.apply({"params": params}, tokens, cache, lengths=lengths,
                                memories=memories, memory_mask=memory_mask, last_only=True,
                                method=Transformer.prefill)
    tok = sample_tokens(logits, jax.random.fold_in(key, 0), temperature, top_p, greedy=greedy,
                        nucleus=nucleus)
    out = jnp.full((b, max_new), config.pad_id, jnp.int32).at[:, 0].set(tok)
    done = (tok == config.eos_id) if stop_at_eos else jnp.zeros((b,), bool)
    return _DecodeState(cache, tok, out, done, jnp.asarray(1, jnp.int32))

  def segment(params, state, memories, memory_mask, stop, key, temperature, top_p, *, greedy,
              nucleus, stop_at_eos):
    """Places `memories` [B, M, ...] (if any) into the cache's memory slots once, then
    decodes until step `stop` (exclusive) or every row is done: each step is one
    attention over the cache, with no host involvement inside the loop."""
    if memories is not None:
      state = state._replace(cache=decoding.place_memories(config, state.cache, memories,
                                                           memory_mask))

    def cond(s):
      return (s.step < stop) & ~jnp.all(s.done)

    def body(s):
      logits, cache = model.apply({"params": params}, s.last, s.cache,
                                  method=Transformer.decode_step)
      tok = sample_tokens(logits, jax.random.fold_in(key, s.step), temperature, top_p,
                          greedy=greedy, nucleus=nucleus)
      tok = jnp.where(s.done, config.pad_id, tok)
      out = jax.lax.dynamic_update_slice_in_dim(s.out, tok[:, None], s.step, axis=1)
      done = s.done | (tok == config.eos_id) if stop_at_eos else s.done
      return _DecodeState(cache, tok, out, done, s.step + 1)

    return jax.lax.while_loop(cond, body, state)

  return (jax.jit(prefill, static_argnames=("greedy", "nucleus", "max_new", "max_length",
                                            "with_prefix", "stop_at_eos")),
          jax.jit(segment, static_argnames=("greedy", "nucleus", "stop_at_eos"),
                  donate_argnames=("state",)))


class Generator:
  """Jitted prefill + segmented decode loop for one model (see module docstring)."""

  def __init__(self, config: ModelConfig, params: Any):
    self.config = config
    self.params = params
    self._prefill, self._segment = _compiled(config)

  # ------------------------------------------------------------ driver

  def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
               sampling: Sampling = Sampling(), key: jax.Array | None = None,
               memory: schedule.MemoryRetrieval | None = None,
               filter_texts: Sequence[str | None] | None = None, stop_at_eos: bool = True,
               with_prefix: bool | None = None,
               on_first_token: Callable[[np.ndarray], None] | None = None
               ) -> GenerationOutput:
    """Completes a batch of prompts.

    Args:
      prompts: context token ids per row (each starts with `<s>`).
      max_new_tokens: tokens to generate per row at most.
      sampling: greedy / temperature / top-p.
      key: PRNG key (required unless greedy).
      memory: explicit memory (retriever + memory source); None = no memory.
      filter_texts: per row, the text the leakage filter compares references with.
      stop_at_eos: stop a row at its first eos (excluded from `lengths`).
      with_prefix: the `<s>Reference:` prefix (default: only with memory).
      on_first_token: called with the first generated token of every row ([B]
        int32) as soon as it is on the host (time-to-first-token measurements).
    """
    cfg = self.config
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if key is None:
      if not sampling.greedy:
        raise ValueError("sampling with temperature > 0 needs an explicit PRNG key")
      key = jax.random.key(0)
    with_prefix = memory is not None if with_prefix is None else with_prefix
    if memory is not None and not with_prefix:
      raise ValueError("explicit memory needs the <s>Reference: prefix (with_prefix=True)")
    L = cfg.chunk_length
    tokens, lengths = pad_prompts(prompts, L, cfg.pad_id)
    b, t = tokens.shape
    max_length = t + _round_up(max_new_tokens, L)
    n_prompts = lengths.tolist()
    temperature = jnp.asarray(max(sampling.temperature, 1e-6), jnp.float32)
    top_p = jnp.asarray(sampling.top_p, jnp.float32)
    static = dict(greedy=sampling.greedy, nucleus=sampling.nucleus, stop_at_eos=stop_at_eos)

    mem = mask = None
    start_queries = memory.stats["queries"] if memory is not None else 0
    if memory is not None:
      mem, mask = schedule.scheduled_memories(memory, tokens.tolist(), n_prompts, n_prompts,
                                              t // L, filter_texts)
    state = self._prefill(self.params, jnp.asarray(tokens), jnp.asarray(lengths),
                          None if mem is None else jnp.asarray(mem),
                          None if mask is None else jnp.asarray(mask), key, temperature, top_p,
                          max_new=max_new_tokens, max_length=max_length,
                          with_prefix=with_prefix, **static)
    if on_first_token is not None:
      on_first_token(np.asarray(state.last))
    dec_mem = dec_mask = None
    if memory is not None:
      rows = np.arange(b)
      first = np.array([schedule.decode_memory_chunk(n, L) for n in n_prompts])
      dec_mem, dec_mask = mem[rows, first], mask[rows, first]  # [B, M, ...]
    dev_mem = None if dec_mem is None else jnp.asarray(dec_mem)
    dev_mask = None if dec_mask is None else jnp.asarray(dec_mask)

    step = 1
    done = np.asarray(state.done)
    while step < max_new_tokens and not done.all():
      if memory is None:
        state = self._segment(self.params, state, None, None,
                              jnp.asarray(max_new_tokens, jnp.int32), key, temperature, top_p,
                              **static)
        step, done = int(state.step), np.asarray(state.done)
        continue
      # Step s feeds generated token s - 1 (context index n + s - 1) of every row.
      s = self._next_retrieval(step, n_prompts, done, max_new_tokens)
      if s is None or s - 1 > step:
        # Decode up to the step before the next retrieval: after it, the query's
        # last token (context index n + s - 2) is known.
        stop = max_new_tokens if s is None else s - 1
        state = self._segment(self.params, state, dev_mem, dev_mask,
                              jnp.asarray(stop, jnp.int32), key, temperature, top_p, **static)
        step, done = int(state.step), np.asarray(state.done)
        continue
      out = np.asarray(state.out)
      due = [r for r in range(b) if not done[r]
             and schedule.retrieves_before(n_prompts[r] + s - 1, n_prompts[r], L)]
      queries, filters = [], []
      for r in due:
        i = n_prompts[r] + s - 1
        context = np.concatenate([tokens[r, :n_prompts[r]], out[r, :s - 1]])
        queries.append(context[i - L:i].tolist())
        filters.append(None if filter_texts is None else filter_texts[r])
      if step < s:
        # Overlap: the device runs step s - 1 (still the old chunk's memories) while
        # the host retrieves and reads the bank for step s.
        state = self._segment(self.params, state, dev_mem, dev_mask,
                              jnp.asarray(s, jnp.int32), key, temperature, top_p, **static)
      new_mem, new_mask = memory.fetch(queries, None if filter_texts is None else filters)
      dec_mem[due], dec_mask[due] = new_mem, new_mask
      dev_mem, dev_mask = jnp.asarray(dec_mem), jnp.asarray(dec_mask)
      stop = self._next_retrieval(s + 1, n_prompts, np.asarray(state.done), max_new_tokens)
      stop = max_new_tokens if stop is None else stop - 1
      state = self._segment(self.params, state, dev_mem, dev_mask,
                            jnp.asarray(max(stop, s + 1), jnp.int32), key, temperature, top_p,
                            **static)
      step, done = int(state.step), np.asarray(state.done)

    out = np.asarray(state.out)
    is_eos = out == cfg.eos_id if stop_at_eos else np.zeros(out.shape, bool)
    stopped = is_eos.any(axis=1)
    gen_lengths = np.where(stopped, is_eos.argmax(axis=1), min(step, max_new_tokens))
    out = np.where(np.arange(out.shape[1])[None] < gen_lengths[:, None], out, cfg.pad_id)
    retrievals = (memory.stats["queries"] - start_queries) if memory is not None else 0
    return GenerationOutput(out.astype(np.int32), gen_lengths.astype(np.int32), stopped,
                            int(retrievals))

  def _next_retrieval(self, step: int, n_prompts: Sequence[int], done: np.ndarray,
                      max_new_tokens: int) -> int | None:
    """The first step >= `step` at which a row that is not done feeds a token that
    retrieves new memories (`schedule.retrieves_before`), or None before max_new_tokens."""
    L = self.config.chunk_length
    best = None
    for n, finished in zip(n_prompts, done):
      if finished:
        continue
      i = n + step - 1  # the context index step `step` feeds
      i = -(-i // L) * L  # the next chunk-opening index
      if i <= n:  # the chunk after the prompt reuses the last prompt chunk's memories
        i = (n // L + 1) * L
      s = i - n + 1
      best = s if best is None else min(best, s)
    return None if best is None or best >= max_new_tokens else int(best)


# ---------------------------------------------------------------------------
# Text in, text out, in any memory mode.


class Completion(NamedTuple):
  text: str
  tokens: list[int]
  stopped_at_eos: bool


class TextGenerator:
  """Prompts (text) -> completions (text) in one memory mode.

  mode "explicit" needs `retrieval` (m3jax.retrieval.schedule.MemoryRetrieval);
  "rag" needs `retriever` (m3jax.retrieval.retriever.Retriever, its k references per
  prompt) and `references` (a store with tokens_by_ids); "none" (sink prefix kept,
  no memory) and "none-noprefix" need neither.
  Prompts are encoded as `<s>` + tokens. Batches are sorted by length so that
  similar prompts share a compiled shape.

  With a chat `template` (data_pipeline.chat.ChatTemplate), a prompt is a
  conversation (a list of Messages, or a string = one user turn) rendered up to the
  assistant marker, its query text is the conversation's text, and a reply ends
  at `<|end|>`.
  """

  def __init__(self, generator: Generator, tokenizer: Any, mode: str, *,
               retrieval: schedule.MemoryRetrieval | None = None, retriever: Any = None,
               references: Any = None, rag_separator: str = "\n", template: Any = None):
    if mode not in MEMORY_MODES:
      raise ValueError(f"memory mode {mode!r}: expected one of {MEMORY_MODES}")
    if mode == "explicit" and retrieval is None:
      raise ValueError("memory mode 'explicit' needs a MemoryRetrieval (retriever + memories)")
    if mode == "rag" and (retriever is None or references is None):
      raise ValueError("memory mode 'rag' needs a retriever and the reference store")
    self.generator, self.tokenizer, self.mode = generator, tokenizer, mode
    self.retrieval, self.retriever, self.references = retrieval, retriever, references
    self.separator = rag_lib.encode_separator(tokenizer, rag_separator)
    self.template = template
    self.stats = dict(retrievals=0, rag_dropped=0, rag_refs=0)

  def contexts(self, prompts: Sequence[str], queries: Sequence[str] | None = None,
               filter_texts: Sequence[str | None] | None = None) -> list[list[int]]:
    """Context token ids per prompt (`<s>` + prompt; with RAG, the references first)."""
    bos = self.generator.config.bos_id
    if self.template is not None:
      chats = [chat_lib.as_messages(p) for p in prompts]
      contexts = [self.template.prompt(c) for c in chats]
      prompts = [chat_lib.query_text(c) for c in chats]
    else:
      contexts = [[bos] + list(self.tokenizer.encode(p)) for p in prompts]
    if self.mode == "rag":
      got = rag_lib.rag_contexts(self.retriever, self.references, contexts,
                                 list(queries) if queries is not None else list(prompts),
                                 bos_id=bos, separator=self.separator,
                                 filter_texts=filter_texts)
      self.stats["rag_dropped"] += got.n_dropped
      self.stats["rag_refs"] += got.n_refs
      self.stats["retrievals"] += len(prompts)
      contexts = got.contexts
    return contexts

  def complete(self, prompts: Sequence[str], *, max_new_tokens: int,
               sampling: Sampling = Sampling(), key: jax.Array | None = None,
               batch_size: int = 16, queries: Sequence[str] | None = None,
               filter_texts: Sequence[str | None] | None = None,
               stop_at_eos: bool = True,
               on_batch: Callable[[int], None] | None = None) -> list[Completion]:
    """Completions in prompt order.

    queries: RAG query per prompt (default: the prompt). filter_texts: what
    the leakage filter compares references with, per prompt (None: no filter).
    on_batch: called with the number of prompts each finished batch completed.
    """
    n = len(prompts)
    contexts = self.contexts(prompts, queries, filter_texts)
    order = sorted(range(n), key=lambda i: len(contexts[i]))
    out: list[Completion | None] = [None] * n
    key = jax.random.key(0) if key is None else key
    for start in range(0, n, batch_size):
      rows = order[start:start + batch_size]
      got = self.generator.generate(
          [contexts[i] for i in rows], max_new_tokens=max_new_tokens, sampling=sampling,
          key=jax.random.fold_in(key, start), stop_at_eos=stop_at_eos,
          memory=self.retrieval if self.mode == "explicit" else None,
          filter_texts=None if filter_texts is None else [filter_texts[i] for i in rows],
          with_prefix=uses_reference_prefix(self.mode))
      self.stats["retrievals"] += got.retrievals
      for j, i in enumerate(rows):
        toks = got.tokens[j, :got.lengths[j]].tolist()
        stopped = bool(got.stopped_at_eos[j])
        if self.template is not None and self.template.end_id in toks:
          toks, stopped = toks[:toks.index(self.template.end_id)], True
        out[i] = Completion(self.tokenizer.decode(toks), toks, stopped)
      if on_batch is not None:
        on_batch(len(rows))
    return out  # type: ignore[return-value]


def read_prompts(path: str | None, inline: Sequence[str] = ()) -> list[str]:
  """Prompts from `--prompt` values and a `--prompts_file`.

  Inline prompts and lines of a text file may write a newline as the two
  characters `\\n`; a `.jsonl` file holds one {"prompt": ...} object per line.
  """
  prompts = [p.replace("\\n", "\n") for p in inline]
  if path:
    if not os.path.isfile(path):
      raise InputError(f"--prompts_file={path} does not exist")
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        if path.endswith(".jsonl"):
          try:
            prompts.append(str(json.loads(line)["prompt"]))
          except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InputError(f"--prompts_file={path}:{n}: expected a JSON object with a "
                             f"\"prompt\" field ({e})") from e
        else:
          prompts.append(line.rstrip("\n").replace("\\n", "\n"))
  if not prompts:
    raise InputError("no prompts: pass --prompt=... or --prompts_file=...")
  return prompts
