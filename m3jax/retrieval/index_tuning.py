"""Search settings chosen for a target recall: how many leaves to search, how many to re-rank.

A tree + asymmetric-hashing index (m3jax.retrieval.index) answers a query in three
steps: score the leaf centres, score every vector of the `leaves_to_search` best
leaves with the 4-bit quantized (AH) scores, then re-score the `reorder` best of
those exactly in float32. Both knobs trade recall for work, and how much recall a
setting gives depends on the data. So instead of fixed fractions, the index picks
them when it is built: it measures recall@k for a grid of settings on a sample of
queries against exact search and keeps the setting of least work that reaches the
target.

Work is counted, not timed (`search_work`), so the choice is the same on every run
and every machine: quantized scores cost `AH_COST` of one float32 multiply-add each
(a 16-entry lookup table per pair of dimensions, 32 lookups per AVX2 instruction),
and a re-ranked vector costs `dim` multiply-adds plus a random read of its row
(`REORDER_ROW_COST`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

# Relative cost of one quantized (4-bit LUT16) subspace lookup-add vs one float32
# multiply-add, and of fetching one re-ranked row (a cache miss), in multiply-adds.
AH_COST = 1 / 16
REORDER_ROW_COST = 256.0

# Leaves searched and candidates re-ranked that the choice considers (each capped at what
# the index holds); both ascend.
LEAVES_GRID: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256,
                                384, 512)
REORDER_GRID: tuple[int, ...] = (10, 15, 20, 30, 40, 60, 80, 120, 160, 256, 512)


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
  """Mean over rows of |approx top-k ∩ exact top-k| / (exact ids that exist, at most k).

  Ids are ints with -1 = none; rows are ranked best first.
  """
  approx, exact = np.asarray(approx)[:, :k], np.asarray(exact)[:, :k]
  if approx.shape[0] != exact.shape[0]:
    raise ValueError(f"recall_at_k: {approx.shape[0]} approximate rows, {exact.shape[0]} exact")
  if not len(exact):
    return float("nan")
  hits = [len(np.intersect1d(a[a >= 0], e[e >= 0])) / max(1, int(np.sum(e >= 0)))
          for a, e in zip(approx, exact)]
  return float(np.mean(hits))


def search_work(leaves_to_search: int, reorder: int, *, count: int, num_leaves: int, dim: int,
                dims_per_block: int) -> float:
  """Float32 multiply-adds (or their equivalent) one query costs with these settings."""
  centres = num_leaves * dim
  scored = count * min(leaves_to_search, num_leaves) / num_leaves
  quantized = scored * (dim / dims_per_block) * AH_COST
  reranked = min(reorder, count) * (dim + REORDER_ROW_COST)
  return float(centres + quantized + reranked)


@dataclasses.dataclass(frozen=True)
class Choice:
  """A search setting with the recall it reached on the sample and its work per query."""
  leaves_to_search: int
  reorder: int
  recall: float
  work: float
  met: bool


def choose_search_settings(recall_of: Callable[[int, int], float],
                           work_of: Callable[[int, int], float], target: float, *,
                           num_leaves: int, k: int,
                           leaves_grid: Sequence[int] = LEAVES_GRID,
                           reorder_grid: Sequence[int] = REORDER_GRID,
                           min_gain: float = 1e-3) -> tuple[Choice, list[Choice]]:
  """The least-work (leaves_to_search, reorder) whose `recall_of` reaches `target`.

  For each reorder (at least k), in ascending order, the leaves are raised until the
  target is met, or until more leaves stop adding recall (gain < `min_gain`: this
  reorder, not the leaves, is the limit); the cheapest setting meeting the target wins.
  Settings that cost at least as much as the best one found so far are not measured
  (work grows with both knobs). When nothing
  reaches the target, the setting of highest recall is returned with `met=False`. Also
  returns every setting measured, in order.
  """
  leaves = sorted({max(1, min(int(v), num_leaves)) for v in leaves_grid} | {num_leaves})
  reorders = sorted({max(int(v), k) for v in reorder_grid})
  tried: list[Choice] = []
  best: Choice | None = None
  for r in reorders:
    previous = -1.0
    for lv in leaves:
      work = float(work_of(lv, r))
      if best is not None and work >= best.work:
        break
      recall = float(recall_of(lv, r))
      c = Choice(lv, r, recall, work, recall >= target)
      tried.append(c)
      if c.met:
        best = c
        break
      if recall - previous < min_gain:
        break
      previous = recall
  if best is not None:
    return best, tried
  return max(tried, key=lambda c: (c.recall, -c.work)), tried
