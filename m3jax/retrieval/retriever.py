"""Query-time retrieval: query texts -> the top-k reference ids, leakage-filtered.

`Retriever.retrieve(queries, filter_texts)` embeds the queries with the embedder
that built the index, searches the index, and (when a threshold is set) drops
every candidate whose eq.-6 overlap (m3jax.retrieval.overlap) with that query's filter
text exceeds the threshold: the paper's evaluation-time leakage filter, which
removes references that contain the evaluation question (default 2/3). It
fetches `k + overfetch` candidates so that dropped ones are replaced by the next
best; rows are padded with id -1 (score -inf). Overlap is measured on token ids
(the filter text is tokenized with the model's tokenizer, references come from
the reference store). The embed -> search -> filter -> top-k sequence itself is
m3jax.retrieval.search, shared with neighbor mining.
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import numpy as np

from m3jax.retrieval import embedder_factory
from m3jax.retrieval import index as index_lib
from m3jax.retrieval import search as search_lib


class Retrieval(NamedTuple):
  """Result of one batch of queries."""
  ids: np.ndarray  # int64 [n, k], best first, -1 = none
  scores: np.ndarray  # float32 [n, k], -inf where id is -1
  dropped: np.ndarray  # int64 [n], candidates the leakage filter removed (see Retriever)


class Searcher(Protocol):
  """What the retriever needs from an index (m3jax.retrieval.index.Index,
  m3jax.retrieval.sharded_index.ShardedIndex)."""

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ...


class TokenSource(Protocol):
  """References by id (data_pipeline.references.ReferenceStore)."""

  def tokens_by_ids(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
    ...


class Retriever:
  """Embedder + index + leakage filter.

  Args:
    embedder: has `embed(texts) -> float32 [n, dim]` (m3jax.retrieval.embedder).
    index: has `search(vectors, k) -> (ids, scores)` (m3jax.retrieval.index).
    k: references per query (model.memories_per_chunk).
    references: token source for the filter (needed when a threshold is set).
    tokenize: text -> token ids, for filter texts (needed with a threshold).
    overlap_threshold: drop references whose overlap with the filter text is
      strictly above it; None turns the filter off.
    overfetch: extra candidates searched when the filter is on.
  """

  def __init__(self, embedder: Any, index: Searcher, *, k: int = 5,
               references: TokenSource | None = None,
               tokenize: Callable[[str], Sequence[int]] | None = None,
               overlap_threshold: float | None = 2.0 / 3.0, overfetch: int = 10):
    if k <= 0:
      raise ValueError(f"Retriever: k must be positive, got {k}")
    if overfetch < 0:
      raise ValueError(f"Retriever: overfetch must be >= 0, got {overfetch}")
    self.embedder = embedder
    self.index = index
    self.k = int(k)
    self.references = references
    self.tokenize = tokenize
    self.overlap_threshold = overlap_threshold
    self.overfetch = int(overfetch)

  @property
  def filters(self) -> bool:
    return self.overlap_threshold is not None

  def with_threshold(self, threshold: float | None) -> "Retriever":
    """The same retriever with another leakage-filter threshold (None = off)."""
    return Retriever(self.embedder, self.index, k=self.k, references=self.references,
                     tokenize=self.tokenize, overlap_threshold=threshold,
                     overfetch=self.overfetch)

  def with_k(self, k: int) -> "Retriever":
    """The same retriever returning `k` references per query."""
    return Retriever(self.embedder, self.index, k=k, references=self.references,
                     tokenize=self.tokenize, overlap_threshold=self.overlap_threshold,
                     overfetch=self.overfetch)

  def retrieve(self, queries: Sequence[str],
               filter_texts: Sequence[str | None] | None = None) -> Retrieval:
    """Top-k references per query, leakage-filtered against `filter_texts[i]`.

    A query that is empty (after stripping whitespace) retrieves nothing. A
    filter text of None (or no filter_texts, or no threshold) filters nothing.
    `dropped[i]` counts the filtered candidates that ranked above the last
    kept reference, i.e. those that would otherwise have been retrieved.
    """
    queries = list(queries)
    n = len(queries)
    if filter_texts is not None and len(filter_texts) != n:
      raise ValueError(f"retrieve: {len(filter_texts)} filter texts for {n} queries")
    ids = np.full((n, self.k), -1, np.int64)
    scores = np.full((n, self.k), -np.inf, np.float32)
    dropped = np.zeros((n,), np.int64)
    live = [i for i, q in enumerate(queries) if q.strip()]
    if not live:
      return Retrieval(ids, scores, dropped)
    use_filter = self.filters and filter_texts is not None
    fetch = self.k + (self.overfetch if use_filter else 0)

    def reject(cand_ids: np.ndarray) -> np.ndarray:
      bad = np.zeros(cand_ids.shape, bool)
      for row, i in enumerate(live):
        if filter_texts[i] is not None:
          bad[row] = self._leaks(filter_texts[i], cand_ids[row])
      return bad

    got = search_lib.retrieve(self.embedder, self.index, [queries[i] for i in live], k=self.k,
                              fetch=fetch, reject=reject if use_filter else None)
    ids[live], scores[live], dropped[live] = got
    return Retrieval(ids, scores, dropped)

  def _leaks(self, filter_text: str, cand_ids: np.ndarray) -> np.ndarray:
    if self.references is None or self.tokenize is None:
      raise ValueError("Retriever: the leakage filter needs `references` (a reference store) "
                       "and `tokenize`; pass them or set overlap_threshold=None")
    text = np.asarray(self.tokenize(filter_text), np.int64)
    return search_lib.overlapping(text, cand_ids, self._ref_tokens,
                                  float(self.overlap_threshold))

  def _ref_tokens(self, ids: np.ndarray) -> list[np.ndarray]:
    toks, lens = self.references.tokens_by_ids(ids)
    return [t[:l] for t, l in zip(np.asarray(toks), np.asarray(lens))]


def load_retriever(index_dir: str, *, k: int, references: TokenSource | None = None,
                   tokenize: Callable[[str], Sequence[int]] | None = None,
                   overlap_threshold: float | None = 2.0 / 3.0, embedder: Any = None,
                   model_config: Any = None, params: Any = None,
                   tokenizer_hash: str = "") -> Retriever:
  """A Retriever over the index at `index_dir`, with the embedder saved beside it.

  A model embedder (data.embedder = "model") needs `model_config`, `params` and
  `tokenize`; pass `embedder` to use one you built yourself (its fingerprint is
  checked against the index).
  """
  if embedder is None:
    state = os.path.join(index_dir, index_lib.EMBEDDER_STATE)
    if not os.path.isfile(state):
      raise FileNotFoundError(f"{state} not found: the index at {index_dir} was saved without "
                              "its embedder; pass the embedder explicitly")
    embedder = embedder_factory.load_embedder(state, model_config=model_config, params=params,
                                              encode=tokenize, tokenizer_hash=tokenizer_hash)
  index = index_lib.load_index(index_dir, embedder=embedder)
  return Retriever(embedder, index, k=k, references=references, tokenize=tokenize,
                   overlap_threshold=overlap_threshold)
