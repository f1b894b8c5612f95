"""When memories are retrieved, and with which text (paper §3.1, §7.5), as pure functions.

A context (`<s>` + prompt + generated tokens) is cut into chunks of
`chunk_length` tokens; the tokens of chunk c (context indices [c*L, (c+1)*L)) go
through the memory layers with chunk c's memories. Of the context, the first
`n_prompt` tokens are the prompt; the rest are generated (or, when scoring, are
the continuation being scored, placed exactly where generation would put them).

The schedule:

* a prompt chunk (one that holds at least one prompt token) retrieves its own
  memories with its own prompt text as the query. A prompt whose length is not a
  multiple of L ends in a PARTIAL chunk: it retrieves with its partial text, and
  generation continues that chunk with the same memories;
* the first fully generated chunk of a prompt that ends exactly on a chunk
  boundary reuses the memories of the last prompt chunk (no retrieval);
* every later chunk c retrieves with the full text of chunk c-1: each time
  generation completes a chunk, those L tokens are the query for the next one.

So 128 context tokens in / 128 out with L = 64 makes 2 + 0 + 1 = 3 retrievals
(chunks 0, 1 from the prompt, chunk 2 reuses chunk 1, chunk 3 queries with chunk
2), the count of the paper's speed protocol. The `<s>` that opens the context
counts as a prompt token (it is context index 0); it is stripped from query text
by the caller's detokenizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class ChunkQuery:
  """How chunk `chunk` gets its memories.

  The query is the text of context tokens [start, end). `reuse` names the
  chunk whose memories are reused instead (then no retrieval happens, and
  start/end repeat that chunk's query span).
  """
  chunk: int
  start: int
  end: int
  reuse: int | None = None

  @property
  def retrieves(self) -> bool:
    return self.reuse is None


def _check(n_prompt: int, n_input: int, chunk_length: int) -> None:
  if chunk_length <= 0:
    raise ValueError(f"chunk_length must be positive, got {chunk_length}")
  if n_prompt < 1:
    raise ValueError(f"the prompt must hold at least one token (the context <s>), got "
                     f"{n_prompt}")
  if n_input < n_prompt:
    raise ValueError(f"n_input={n_input} tokens through the model cannot be fewer than the "
                     f"n_prompt={n_prompt} prompt tokens")


def chunk_query(chunk: int, n_prompt: int, chunk_length: int) -> ChunkQuery:
  """The schedule for one chunk (see the module docstring)."""
  if chunk < 0:
    raise ValueError(f"chunk index must be >= 0, got {chunk}")
  _check(n_prompt, n_prompt, chunk_length)
  L = chunk_length
  start = chunk * L
  if start < n_prompt:  # a prompt chunk, maybe partial
    return ChunkQuery(chunk, start, min(start + L, n_prompt))
  if start == n_prompt:  # first generated chunk after a prompt that filled its chunks
    return ChunkQuery(chunk, start - L, start, reuse=chunk - 1)
  return ChunkQuery(chunk, start - L, start)


def chunk_queries(n_prompt: int, n_input: int, chunk_length: int) -> list[ChunkQuery]:
  """The schedule of every chunk that the first `n_input` context tokens touch.

  n_input counts the tokens that go through the model: when generating N new
  tokens after a prompt of n, that is n + N - 1 (the last sampled token is
  never fed back); when scoring a sequence of n tokens with targets shifted by
  one, n - 1.
  """
  _check(n_prompt, n_input, chunk_length)
  n_chunks = -(-n_input // chunk_length)
  return [chunk_query(c, n_prompt, chunk_length) for c in range(n_chunks)]


def retrieval_count(n_prompt: int, n_input: int, chunk_length: int) -> int:
  """Retrievals one sequence makes (reused chunks do not count)."""
  return sum(q.retrieves for q in chunk_queries(n_prompt, n_input, chunk_length))


def decode_memory_chunk(n_prompt: int, chunk_length: int) -> int:
  """Chunk whose memories the first decoded token uses: the last prompt chunk."""
  _check(n_prompt, n_prompt, chunk_length)
  return (n_prompt - 1) // chunk_length


def retrieves_before(index: int, n_prompt: int, chunk_length: int) -> bool:
  """Whether feeding context token `index` (a generated one) needs new memories.

  True exactly when `index` opens a chunk and the previous chunk held a
  generated token, i.e. `chunk_query(index // L, ...)` retrieves and is not a
  prompt chunk. The query is then tokens [index - L, index).
  """
  return index % chunk_length == 0 and index > n_prompt


# ---------------------------------------------------------------------------
# Fetching the memories the schedule asks for.


class MemoryRetrieval:
  """Turns scheduled queries (token spans) into memory arrays.

  query tokens -> text (`detokenize`, special ids stripped) -> `retriever`
  (top-M ref ids, leakage-filtered against each query's filter text) ->
  `memory_source.lookup` (m3jax.memory.source.MemorySource). With
  `cache_queries` the (query, filter text) -> ids results are memoised (scoring
  many choices that share a context); generation leaves it off so that every
  scheduled retrieval really happens. `stats` counts queries, index searches,
  references retrieved and references the leakage filter dropped.
  """

  def __init__(self, retriever: Any, memory_source: Any,
               detokenize: Callable[[Sequence[int]], str], *, chunk_length: int,
               memory_shape: Sequence[int], special_ids: Sequence[int] = (),
               cache_queries: bool = False):
    self.retriever = retriever
    self.memory_source = memory_source
    self.detokenize = detokenize
    self.chunk_length = int(chunk_length)
    self.memory_shape = tuple(int(s) for s in memory_shape)
    self.special_ids = frozenset(int(i) for i in special_ids)
    self.cache_queries = cache_queries
    self._cache: dict[tuple[str, str | None], np.ndarray] = {}
    self.stats = dict(queries=0, searches=0, refs=0, dropped=0)

  @classmethod
  def for_model(cls, config: Any, retriever: Any, memory_source: Any,
                detokenize: Callable[[Sequence[int]], str], **kwargs: Any) -> "MemoryRetrieval":
    """Chunk length, memory shape and special ids from a ModelConfig."""
    if int(retriever.k) != config.memories_per_chunk:
      raise ValueError(f"the retriever returns {retriever.k} references per query but "
                       f"model.memories_per_chunk={config.memories_per_chunk}")
    return cls(retriever, memory_source, detokenize, chunk_length=config.chunk_length,
               memory_shape=config.memory_shape,
               special_ids=(config.pad_id, config.bos_id, config.eos_id), **kwargs)

  @property
  def k(self) -> int:
    return int(self.retriever.k)

  def reset_stats(self) -> None:
    self.stats = dict.fromkeys(self.stats, 0)

  def query_text(self, tokens: Sequence[int]) -> str:
    return self.detokenize([int(t) for t in tokens if int(t) not in self.special_ids])

  def ref_ids(self, query_tokens: Sequence[Sequence[int]],
              filter_texts: Sequence[str | None] | None = None) -> np.ndarray:
    """int64 [n, M] reference ids for each query (-1 = none), in one retriever call."""
    n = len(query_tokens)
    texts = [self.query_text(t) for t in query_tokens]
    filters = list(filter_texts) if filter_texts is not None else [None] * n
    if len(filters) != n:
      raise ValueError(f"{len(filters)} filter texts for {n} queries")
    out = np.full((n, self.k), -1, np.int64)
    keys = list(zip(texts, filters))
    todo: list[int] = []  # rows to search; with the cache on, one row per distinct key
    first: dict[tuple[str, str | None], int] = {}
    for i, key in enumerate(keys):
      if self.cache_queries and key in self._cache:
        out[i] = self._cache[key]
      elif self.cache_queries and key in first:
        continue
      else:
        first[key] = i
        todo.append(i)
    self.stats["queries"] += n
    if todo:
      self.stats["searches"] += len(todo)
      got = self.retriever.retrieve([texts[i] for i in todo],
                                    None if filter_texts is None else [filters[i] for i in todo])
      for row, i in enumerate(todo):
        out[i] = got.ids[row]
        self.stats["refs"] += int(np.sum(got.ids[row] >= 0))
        self.stats["dropped"] += int(got.dropped[row])
        if self.cache_queries:
          self._cache[keys[i]] = got.ids[row].copy()
      if self.cache_queries:
        for i, key in enumerate(keys):
          out[i] = self._cache[key]
    return out

  def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ids [..., M] -> memories [..., M, *memory_shape], mask [..., M, L_mem, H_mem, k].

    Each distinct id is looked up once per call (adjacent chunks often share
    references); -1 gives zeros and an all-False mask.
    """
    ids = np.asarray(ids, np.int64)
    flat = ids.reshape(-1)
    uniq, inverse = np.unique(flat, return_inverse=True)
    mem, mask = self.memory_source.lookup(uniq)
    mem, mask = np.asarray(mem), np.asarray(mask, bool)
    if mem.shape[1:] != self.memory_shape:
      raise ValueError(f"the memory source returned memories of shape {mem.shape[1:]}; the "
                       f"model needs {self.memory_shape} (a bank of another model config?)")
    l, _, h, k, _ = self.memory_shape
    mem, mask = mem[inverse], mask[inverse]
    return mem.reshape(ids.shape + self.memory_shape), mask.reshape(ids.shape + (l, h, k))

  def fetch(self, query_tokens: Sequence[Sequence[int]],
            filter_texts: Sequence[str | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Memories [n, M, ...] and token mask [n, M, L_mem, H_mem, k] for n queries."""
    return self.lookup(self.ref_ids(query_tokens, filter_texts))


def scheduled_ref_ids(retrieval: MemoryRetrieval, contexts: Sequence[Sequence[int]],
                      n_prompts: Sequence[int], n_inputs: Sequence[int], n_chunks: int,
                      filter_texts: Sequence[str | None] | None = None) -> np.ndarray:
  """Reference ids [B, n_chunks, M] per chunk, following the schedule (one retriever call).

  Row b's context tokens are `contexts[b]`; its first n_prompts[b] are the
  prompt and its first n_inputs[b] go through the model. Chunks past a row's
  last input chunk (padding up to `n_chunks`) get no reference (-1).
  """
  b, m = len(contexts), retrieval.k
  requests, where, reuse = [], [], []
  for row in range(b):
    plan = chunk_queries(int(n_prompts[row]), int(n_inputs[row]), retrieval.chunk_length)
    if len(plan) > n_chunks:
      raise ValueError(f"row {row}: {len(plan)} chunks do not fit n_chunks={n_chunks}")
    for q in plan:
      if q.retrieves:
        requests.append(list(contexts[row][q.start:q.end]))
        where.append((row, q.chunk))
      else:
        reuse.append((row, q.chunk, q.reuse))
  ids = np.full((b, n_chunks, m), -1, np.int64)
  if requests:
    filters = None if filter_texts is None else [filter_texts[r] for r, _ in where]
    for (row, c), row_ids in zip(where, retrieval.ref_ids(requests, filters)):
      ids[row, c] = row_ids
  for row, c, src in reuse:
    ids[row, c] = ids[row, src]
  return ids


def scheduled_memories(retrieval: MemoryRetrieval, contexts: Sequence[Sequence[int]],
                       n_prompts: Sequence[int], n_inputs: Sequence[int], n_chunks: int,
                       filter_texts: Sequence[str | None] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
  """`scheduled_ref_ids`, looked up: memories [B, C, M, *memory_shape] and mask
  [B, C, M, L_mem, H_mem, k], ready for `Transformer.__call__` / `prefill`."""
  return retrieval.lookup(scheduled_ref_ids(retrieval, contexts, n_prompts, n_inputs, n_chunks,
                                            filter_texts))
