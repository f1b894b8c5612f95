"""The retrieval core: texts -> embed -> search -> overlap filter -> top-k.

Query-time retrieval (m3jax.retrieval.retriever) and offline neighbor mining
(m3jax.retrieval.neighbors) run the same sequence and differ only in what a
candidate is filtered against: the retriever drops references whose eq.-6
overlap (m3jax.retrieval.overlap) with the query's filter text exceeds the
evaluation threshold (2/3), mining drops those that copy the training sequence
(0.9) or come from one of its documents. So the sequence lives here once:

  search(embedder, index, texts, n)        each text's n best candidates
  overlapping(tokens, ids, refs, thr)      candidates that overlap a text too much
  keep_best(ids, rejected, k, scores)      each row's k best unrejected candidates
  retrieve(embedder, index, texts, ...)    all three chained, with the filter a callback

Ids are int64 with -1 = none (score -inf); rows stay ranked best first.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from m3jax.retrieval import overlap as overlap_lib

# ids -> their token arrays (one per id, in order).
RefTokens = Callable[[np.ndarray], Sequence[np.ndarray]]
# candidate ids [n, fetch] -> bool [n, fetch], True = filtered out.
Reject = Callable[[np.ndarray], np.ndarray]


def search(embedder: Any, index: Any, texts: Sequence[str],
           n: int) -> tuple[np.ndarray, np.ndarray]:
  """Embeds `texts` and returns each one's `n` best candidates: (int64 ids, float32 scores)."""
  if not len(texts):
    return np.zeros((0, n), np.int64), np.zeros((0, n), np.float32)
  vectors = np.asarray(embedder.embed(list(texts)), np.float32)
  ids, scores = index.search(vectors, n)
  return np.asarray(ids, np.int64), np.asarray(scores, np.float32)


def overlapping(tokens: np.ndarray, cand_ids: np.ndarray, ref_tokens: RefTokens,
                threshold: float) -> np.ndarray:
  """bool mask of `cand_ids` (any shape) whose eq.-6 overlap with `tokens` is strictly
  above `threshold`; each distinct id is measured once, -1 is never marked."""
  cand_ids = np.asarray(cand_ids)
  uniq = np.unique(cand_ids[cand_ids >= 0])
  if not len(uniq):
    return np.zeros(cand_ids.shape, bool)
  over = overlap_lib.exceeds_many(tokens, list(ref_tokens(uniq)), float(threshold))
  return np.isin(cand_ids, uniq[np.asarray(over, bool)])


def keep_best(cand_ids: np.ndarray, rejected: np.ndarray | None, k: int,
              cand_scores: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Each row's first `k` candidates that exist and are not rejected.

  Returns (ids int64 [n, k], scores float32 [n, k], displaced int64 [n]); `displaced`
  counts the rejected candidates ranked above the k-th kept one (all of them when
  fewer than k are kept): those the filter kept from being retrieved.
  """
  cand_ids = np.asarray(cand_ids, np.int64)
  n = len(cand_ids)
  ids = np.full((n, k), -1, np.int64)
  scores = np.full((n, k), -np.inf, np.float32)
  displaced = np.zeros((n,), np.int64)
  for row in range(n):
    present = cand_ids[row] >= 0
    keep = present if rejected is None else present & ~rejected[row]
    sel = np.nonzero(keep)[0][:k]
    ids[row, :len(sel)] = cand_ids[row, sel]
    if cand_scores is not None:
      scores[row, :len(sel)] = cand_scores[row, sel]
    if rejected is not None:
      displaced[row] = _displaced(present, rejected[row], k)
  return ids, scores, displaced


def _displaced(present: np.ndarray, bad: np.ndarray, k: int) -> int:
  """Rejected candidates ranked above the k-th kept one (all of them if fewer are kept)."""
  kept = drops = 0
  for ok, leak in zip(present.tolist(), bad.tolist()):
    if not ok:
      continue
    if leak:
      drops += 1
    else:
      kept += 1
      if kept == k:
        break
  return drops


def retrieve(embedder: Any, index: Any, texts: Sequence[str], *, k: int, fetch: int,
             reject: Reject | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """embed -> search `fetch` candidates -> drop those `reject` marks -> top `k`.

  Returns (ids int64 [n, k], scores float32 [n, k], displaced int64 [n]) as `keep_best`.
  """
  cand_ids, cand_scores = search(embedder, index, texts, fetch)
  rejected = None if reject is None or not len(cand_ids) else np.asarray(reject(cand_ids), bool)
  return keep_best(cand_ids, rejected, k, cand_scores)
