"""The index of an edited knowledge base: the base index, minus masked ids, plus a delta.

A live knowledge edit (m3jax.memory.bank_update) never touches the base ScaNN index
that build-index wrote. Replaced and deleted references are *masked* (their base
vectors are skipped), and the vectors of replaced and added references live in a small
*delta* index of their own (exact, brute force), rebuilt by every edit from the stored
vectors of all edited references, so an edit costs O(edited references), never
O(knowledge base). A search asks the base for `k + |masked|` candidates, so k unmasked
ones survive whatever the mask removes, asks the delta for k, and keeps the overall
top k (ties: smaller id), as one index over the edited vectors would.

Why not ScaNN's own `upsert`/`delete`: they mutate a loaded searcher, and writing it
back would rewrite the whole serialized index under readers that are using it; an
edit must be atomic (readers see the old knowledge base or the new one) and cheap.
When the mask grows to a sizable share of the base, rebuild the index (build-index)
and re-encode the bank.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from m3jax.retrieval import index as index_lib
from m3jax.retrieval.index import Index, IndexDirError, IndexSettings

DELTA_SETTINGS = IndexSettings(force_brute_force=True)


def build_delta(vectors: np.ndarray, ids: np.ndarray, fingerprint: str,
                embedder_kind: str = "") -> Index | None:
  """An exact index over the edited references' vectors (None when there are none)."""
  if len(ids) == 0:
    return None
  return Index.build(vectors, ids, fingerprint=fingerprint, settings=DELTA_SETTINGS,
                     embedder_kind=embedder_kind)


class EditedIndex:
  """`base` searched without `masked` ids, merged with `delta` (None = no vectors)."""

  def __init__(self, base: Any, delta: Index | None, masked: Sequence[int]):
    if delta is not None:
      if delta.dim != base.dim:
        raise IndexDirError(f"delta index {delta.path or '?'} holds {delta.dim}-dim vectors, "
                            f"the base index {base.dim}")
      if delta.fingerprint != base.fingerprint:
        raise IndexDirError(f"delta index {delta.path or '?'} was built with embedder "
                            f"{delta.fingerprint}, the base index with {base.fingerprint}")
    self.base = base
    self.delta = delta
    self.masked = np.unique(np.asarray(masked, np.int64))
    self.dim = base.dim
    self.fingerprint = base.fingerprint
    self.path = getattr(base, "path", None)

  @property
  def ids(self) -> np.ndarray:
    live = self.base.ids[~np.isin(self.base.ids, self.masked)]
    return live if self.delta is None else np.concatenate([live, self.delta.ids])

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def count(self) -> int:
    return len(self)

  def check_embedder(self, embedder: Any) -> None:
    self.base.check_embedder(embedder)

  def search(self, queries: np.ndarray, k: int, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (ids int64 [q, k], scores float32 [q, k]) of the edited vectors; -1 / -inf pad."""
    q = index_lib.normalise_queries(queries, self.dim, f"edited index {self.path or ''}")
    ids, scores = self.base.search(q, k + len(self.masked), **kwargs)
    gone = np.isin(ids, self.masked)
    ids = np.where(gone, -1, ids)
    scores = np.where(gone, -np.inf, scores).astype(np.float32)
    if self.delta is not None:
      d_ids, d_scores = self.delta.search(q, k)
      ids = np.concatenate([ids, d_ids], axis=1)
      scores = np.concatenate([scores, d_scores], axis=1)
    return index_lib.top_k(scores, ids, k)

  def search_texts(self, embedder: Any, texts: Sequence[str],
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    self.check_embedder(embedder)
    return self.search(embedder.embed(texts), k)
