"""Several ScaNN indexes (m3jax.retrieval.index) searched as one.

E.g. one index per host's slice of the references: each shard returns its
top-k and the merge keeps the overall top-k, exactly as one index would.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from m3jax.retrieval import index as index_lib
from m3jax.retrieval.index import Index, IndexDirError


class ShardedIndex:
  """Several indexes (e.g. one per host's slice of the bank) searched as one.

  Each shard returns its top-k; the merge keeps the overall top-k by score
  (ties: smaller id). Shards must share dim and embedder, and ids must be disjoint.
  """

  def __init__(self, shards: Sequence[Index], check_disjoint: bool = True):
    if not shards:
      raise ValueError("ShardedIndex needs at least one shard")
    self.shards = list(shards)
    first = self.shards[0]
    for s in self.shards[1:]:
      if s.dim != first.dim:
        raise IndexDirError(f"shard {s.path or '?'} has dim {s.dim}, shard "
                            f"{first.path or '?'} has {first.dim}")
      if s.fingerprint != first.fingerprint:
        raise IndexDirError(f"shard {s.path or '?'} was built with embedder {s.fingerprint}, "
                            f"shard {first.path or '?'} with {first.fingerprint}")
    if check_disjoint:
      all_ids = np.concatenate([s.ids for s in self.shards])
      if len(np.unique(all_ids)) != len(all_ids):
        raise IndexDirError("index shards share ids; each reference must live in one shard")
    self.dim = first.dim
    self.fingerprint = first.fingerprint

  @classmethod
  def load(cls, paths: Sequence[str], **kwargs: Any) -> "ShardedIndex":
    return cls([index_lib.load_index(p, **kwargs) for p in paths])

  def __len__(self) -> int:
    return sum(len(s) for s in self.shards)

  @property
  def count(self) -> int:
    return len(self)

  @property
  def ids(self) -> np.ndarray:
    return np.concatenate([s.ids for s in self.shards])

  def check_embedder(self, embedder: Any) -> None:
    self.shards[0].check_embedder(embedder)

  def search(self, queries: np.ndarray, k: int, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    q = index_lib.normalise_queries(queries, self.dim, "sharded index")
    results = [s.search(q, k, **kwargs) for s in self.shards]
    return index_lib.top_k(np.concatenate([r[1] for r in results], axis=1),
                 np.concatenate([r[0] for r in results], axis=1), k)

  def search_texts(self, embedder: Any, texts: Sequence[str],
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    self.check_embedder(embedder)
    return self.search(embedder.embed(texts), k)

  def vectors(self) -> np.ndarray:
    return np.concatenate([np.asarray(s.vectors()) for s in self.shards])
