"""Recall@k, the work model and the choice of search settings for a target recall."""

import numpy as np
import pytest

from m3jax.retrieval import index as ix
from m3jax.retrieval import index_tuning as tuning
from m3jax.retrieval.index import IndexSettings
from support import clustered


def test_recall_at_k_counts_overlap_per_row_and_ignores_missing_ids():
  exact = np.array([[1, 2, 3], [4, 5, -1]])
  approx = np.array([[3, 9, 1], [5, -1, -1]])
  # Row 0: {1, 3} of 3; row 1: {5} of the 2 exact ids that exist.
  assert tuning.recall_at_k(approx, exact, 3) == pytest.approx((2 / 3 + 1 / 2) / 2)
  assert tuning.recall_at_k(approx, exact, 1) == pytest.approx(0.0)
  assert tuning.recall_at_k(exact, exact, 3) == 1.0
  with pytest.raises(ValueError, match="rows"):
    tuning.recall_at_k(approx[:1], exact, 3)


def test_search_work_grows_with_leaves_and_reorder():
  w = lambda lv, r: tuning.search_work(lv, r, count=10_000, num_leaves=100, dim=64,
                                       dims_per_block=2)
  assert w(1, 10) < w(2, 10) < w(2, 20)
  # Searching all leaves scores every vector once: count * dim/2 lookups at AH_COST each.
  assert w(100, 10) - w(50, 10) == pytest.approx(5_000 * 32 * tuning.AH_COST)
  assert w(200, 10) == w(100, 10)  # capped at the leaves that exist


def _synthetic_recall(need):
  """recall_of where a setting reaches 1.0 iff leaves*reorder >= need (monotone in both)."""
  calls = []

  def recall_of(lv, r):
    calls.append((lv, r))
    return min(1.0, lv * r / need)

  return recall_of, calls


def test_choice_is_the_least_work_setting_meeting_the_target():
  recall_of, calls = _synthetic_recall(need=400)
  work_of = lambda lv, r: 100.0 * lv + 0.5 * r  # leaves cost far more than reorder
  choice, tried = tuning.choose_search_settings(recall_of, work_of, 0.99, num_leaves=64, k=5,
                                                leaves_grid=(1, 2, 4, 8, 16),
                                                reorder_grid=(10, 50, 100, 400))
  assert (choice.leaves_to_search, choice.reorder, choice.met) == (1, 400, True)
  # Every cheaper setting that was measured missed the target.
  for c in tried:
    if c.work < choice.work:
      assert c.recall < 0.99
  # Nothing is measured that costs at least as much as a setting already meeting it.
  assert len(calls) == len(tried)


def test_choice_when_nothing_meets_the_target_is_the_best_recall():
  recall_of = lambda lv, r: 0.5 * lv * r / (8 * 20)  # at most 0.5, at (8, 20)
  choice, tried = tuning.choose_search_settings(recall_of, lambda lv, r: lv + r, 0.9,
                                                num_leaves=8, k=5, leaves_grid=(1, 4, 16),
                                                reorder_grid=(10, 20))
  assert not choice.met
  assert (choice.leaves_to_search, choice.reorder) == (8, 20)  # leaves capped at num_leaves
  assert choice.recall == max(c.recall for c in tried)


def test_leaves_stop_rising_once_they_add_no_recall():
  # The reorder caps recall at r / 100; leaves add recall only up to 4.
  recall_of = lambda lv, r: min(r / 100, 0.1 * min(lv, 4))
  _, tried = tuning.choose_search_settings(recall_of, lambda lv, r: lv + 1000 * r, 0.99,
                                           num_leaves=64, k=5, leaves_grid=(1, 2, 4, 8, 16, 32),
                                           reorder_grid=(10, 100))
  # reorder 10: leaves 1 (0.1), then 2 adds nothing -> stop; reorder 100: up to 4, then 8 adds nothing.
  assert [(c.leaves_to_search, c.reorder) for c in tried] == [(1, 10), (2, 10), (1, 100),
                                                               (2, 100), (4, 100), (8, 100)]


def test_reorder_is_at_least_k():
  seen = []
  tuning.choose_search_settings(lambda lv, r: seen.append(r) or 1.0, lambda lv, r: lv + r, 0.5,
                                num_leaves=4, k=25, reorder_grid=(10, 20, 40))
  assert min(seen) == 25




def test_tuned_index_meets_the_target_on_new_queries():
  x, q = clustered(8000, 400)
  settings = IndexSettings(brute_force_below=1000, target_recall=0.96, tune_queries=400)
  index = ix.build_index(x, fingerprint="fp", settings=settings)
  s = index.settings
  assert s["mode"] == "tree_ah" and s["tuning"]["met"]
  assert s["tuning"]["recall"] >= 0.96
  # The chosen setting is cheaper than the untuned default (1/8 of the leaves, reorder 256).
  fixed = IndexSettings(brute_force_below=1000, target_recall=0).resolved(len(x))
  work = lambda lv, r: tuning.search_work(lv, r, count=len(x), num_leaves=s["num_leaves"],
                                          dim=32, dims_per_block=2)
  assert work(s["leaves_to_search"], s["reorder"]) < work(fixed["leaves_to_search"],
                                                          fixed["reorder"])
  # Queries that were never indexed get the recall the held-out sample promised.
  assert ix.measure_recall(index, q, 5, database=x, ids=index.ids) >= 0.95
  # A larger k re-ranks proportionally more candidates and keeps its recall.
  assert index._reorder_for(10) == 2 * s["reorder"]  # pylint: disable=protected-access
  assert ix.measure_recall(index, q, 10, database=x, ids=index.ids) >= 0.95


def test_leave_out_drops_each_rows_own_id():
  ids = np.array([[7, 1, 2], [3, 4, 5], [-1, 9, 9]])
  got = ix._leave_out(ids, np.array([7, 4, 0]), 2)  # pylint: disable=protected-access
  np.testing.assert_array_equal(got, [[1, 2], [3, 5], [-1, 9]])


def test_brute_force_indexes_are_not_tuned():
  x, _ = clustered(500, 1)
  index = ix.build_index(x, fingerprint="fp")
  assert index.settings["mode"] == "brute_force" and "tuning" not in index.settings
  with pytest.raises(ValueError, match="brute-force"):
    index.tune(x, 0.9)
