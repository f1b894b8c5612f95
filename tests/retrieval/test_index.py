"""ScaNN index: exact below the threshold, high recall above, lossless save/load, shards."""

import json
import os

import numpy as np
import pytest

from m3jax.retrieval import index as ix
from m3jax.retrieval.lexical_embedder import LexicalEmbedder
from m3jax.retrieval.index import IndexDirError, IndexSettings
from m3jax.retrieval.sharded_index import ShardedIndex
from support import clustered




TREE = IndexSettings(brute_force_below=1000)


@pytest.fixture(scope="module")
def data():
  return clustered(6000, 200)


@pytest.fixture(scope="module")
def tree_index(data):
  x, _ = data
  return ix.build_index(x, np.arange(len(x)) * 3 + 11, fingerprint="fp-a", settings=TREE)


def test_small_sets_are_searched_exactly(data):
  x, q = data
  ids = np.arange(500, dtype=np.int64) + 1000
  index = ix.build_index(x[:500], ids, fingerprint="fp")
  assert index.settings["mode"] == "brute_force"
  got_ids, got_scores = index.search(q, 10)
  want_ids, want_scores = ix.brute_force_search(x[:500], ids, q, 10)
  np.testing.assert_array_equal(got_ids, want_ids)
  np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
  assert got_ids.dtype == np.int64 and got_scores.dtype == np.float32


def test_tree_recall_against_brute_force_is_high(tree_index, data):
  x, q = data
  assert tree_index.settings["mode"] == "tree_ah"
  recall = ix.measure_recall(tree_index, q, 10, database=x, ids=tree_index.ids)
  assert recall >= 0.95, recall


def test_save_load_round_trip_returns_identical_results(tree_index, data, tmp_path):
  _, q = data
  path = str(tmp_path / "index")
  tree_index.save(path)
  loaded = ix.load_index(path, fingerprint="fp-a", dim=32, verify=True)
  a, b = tree_index.search(q, 10), loaded.search(q, 10)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert loaded.settings == tree_index.settings and loaded.count == 6000
  # The saved float32 copy serves as the recall reference without passing the data.
  assert ix.measure_recall(loaded, q, 10) >= 0.95
  manifest = json.loads(open(os.path.join(path, "manifest.json")).read())
  assert manifest["count"] == 6000 and manifest["dim"] == 32
  assert manifest["embedder_fingerprint"] == "fp-a" and "ids.npy" in manifest["files"]


def test_sharded_merge_equals_single_index_on_union(data):
  x, q = data
  x = x[:3000]
  ids = np.random.default_rng(1).permutation(100_000)[:3000].astype(np.int64)
  whole = ix.build_index(x, ids, fingerprint="fp")
  parts = np.array_split(np.arange(3000), 3)
  sharded = ShardedIndex([ix.build_index(x[p], ids[p], fingerprint="fp") for p in parts])
  assert len(sharded) == 3000
  a, b = whole.search(q, 10), sharded.search(q, 10)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_allclose(a[1], b[1], atol=1e-6)
  assert ix.measure_recall(sharded, q, 10, database=x, ids=ids) == 1.0


def test_sharded_index_refuses_mixed_shards(data):
  x, _ = data
  a = ix.build_index(x[:100], np.arange(100), fingerprint="fp")
  with pytest.raises(IndexDirError, match="share ids"):
    ShardedIndex([a, ix.build_index(x[:100], np.arange(100), fingerprint="fp")])
  with pytest.raises(IndexDirError, match="embedder"):
    ShardedIndex([a, ix.build_index(x[:100], np.arange(100, 200), fingerprint="other")])


def test_fewer_vectors_than_k_pads(data):
  x, q = data
  index = ix.build_index(x[:3], [7, 8, 9], fingerprint="fp")
  ids, scores = index.search(q[:2], 5)
  assert ids.shape == (2, 5)
  np.testing.assert_array_equal(np.sort(ids[:, :3], axis=1), [[7, 8, 9]] * 2)
  assert (ids[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()


def test_query_embedder_must_match(tmp_path):
  texts = ["saffron merchants of the coast", "a glacier in the north", "tokyo is a city"]
  emb = LexicalEmbedder(dim=32).fit(texts)
  index = ix.build_index(emb.embed(texts), [5, 6, 7], fingerprint=emb.fingerprint(),
                         embedder_kind=emb.kind)
  ids, _ = index.search_texts(emb, ["where is the glacier"], 1)
  assert ids[0, 0] == 6
  other = LexicalEmbedder(dim=32).fit(texts[:2])
  with pytest.raises(IndexDirError, match="built with embedder"):
    index.search_texts(other, ["glacier"], 1)
  path = str(tmp_path / "idx")
  index.save(path, embedder=emb)
  with pytest.raises(IndexDirError, match="built with embedder"):
    ix.load_index(path, embedder=other)
  with pytest.raises(IndexDirError, match="32-dim vectors; the embedder gives 64"):
    ix.load_index(path, embedder=LexicalEmbedder(dim=64))
  assert ix.load_index(path, embedder=emb).count == 3


def test_bad_directories_get_clear_errors(data, tmp_path):
  x, q = data
  index = ix.build_index(x[:50], np.arange(50), fingerprint="fp")
  with pytest.raises(IndexDirError, match="does not exist"):
    ix.load_index(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(IndexDirError, match="manifest.json not found"):
    ix.load_index(str(tmp_path / "empty"))
  path = str(tmp_path / "idx")
  index.save(path)
  with pytest.raises(IndexDirError, match="already exists"):
    index.save(path)
  with pytest.raises(IndexDirError, match="expected 16"):
    ix.load_index(path, dim=16)
  ids_file = os.path.join(path, "ids.npy")
  with open(ids_file, "r+b") as f:
    f.truncate(os.path.getsize(ids_file) - 8)
  with pytest.raises(IndexDirError, match="ids.npy"):
    ix.load_index(path)
  with open(os.path.join(path, "manifest.json"), "w") as f:
    f.write("{not json")
  with pytest.raises(IndexDirError, match="not valid JSON"):
    ix.load_index(path)
  with pytest.raises(ValueError, match="32-dim"):
    index.search(q[:, :16], 3)


def test_a_pickled_docid_file_is_refused(data, tmp_path):
  x, _ = data
  path = tmp_path / "idx"
  ix.build_index(x[:50], np.arange(50), fingerprint="fp").save(str(path))
  (path / "scann" / "scann_docids.pkl").write_bytes(b"\x80\x04N.")
  with pytest.raises(IndexDirError, match="unpickle"):
    ix.load_index(str(path))


def test_build_rejects_bad_input():
  with pytest.raises(ValueError, match="non-empty"):
    ix.build_index(np.zeros((0, 8), np.float32), fingerprint="fp")
  with pytest.raises(ValueError, match="not unique"):
    ix.build_index(np.ones((2, 8), np.float32), [1, 1], fingerprint="fp")
