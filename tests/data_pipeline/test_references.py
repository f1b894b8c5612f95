"""References: cutting within documents, stable ids, decoded text, ReferenceStore."""

import pickle

import numpy as np
import pytest

from data_pipeline import knowledge_world
from data_pipeline import references as refs
from data_pipeline import tfds_builders
from data_pipeline import tokenizer as tok_lib

R = 24


def _kb_texts():
  world = knowledge_world.generate(dict(n_seen=10, n_memory_taught=10, n_unseen=10))
  texts = [d.text for d in world.kb_documents]
  # Longer documents (several references each), odd characters, a one-token document.
  texts += [" ".join(texts[i:i + 4]) for i in range(0, 16, 4)]
  texts += ["Ünïcödé 日本語 🙂 " * 12 + "end.", "x", "a" * 300]
  return texts


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("refs")
  texts = _kb_texts()
  tok = tok_lib.train_tokenizer(texts, str(root / "tok"), vocab_size=512)
  rows = [dict(text=t, source=f"doc{i}") for i, t in enumerate(texts)]
  path = tfds_builders.write_dataset(
      tfds_builders.M3jaxDocuments, str(root / "docs"), features=tfds_builders.DOCUMENT_FEATURES,
      shards={"kb": [lambda: enumerate(rows)]})
  spec = dict(path=path, split="kb", text_field="text")
  ref_path, stats = refs.write_references(str(root / "r1"), spec, tok, R, shard_docs=7)
  return dict(root=root, texts=texts, tok=tok, spec=spec, path=ref_path, stats=stats,
              store=refs.ReferenceStore(ref_path))


def _all(store):
  return [store.get(i) for i in range(len(store))]


def test_references_never_exceed_max_tokens(setup):
  store = setup["store"]
  lengths = [len(r["tokens"]) for r in _all(store)]
  assert max(lengths) <= R and min(lengths) >= 1
  assert setup["stats"]["documents_split"] > 0  # the test exercises cutting


def test_references_stay_within_documents_and_cover_them(setup):
  tok, texts = setup["tok"], setup["texts"]
  by_doc = {}
  for r in _all(setup["store"]):
    by_doc.setdefault(r["doc_id"], []).append(r)
  assert sorted(by_doc) == list(range(len(texts)))
  for doc_id, pieces in by_doc.items():
    assert [p["piece"] for p in pieces] == list(range(len(pieces)))
    joined = np.concatenate([p["tokens"] for p in pieces])
    assert joined.tolist() == tok.encode(texts[doc_id])


def test_ref_ids_are_dense_in_document_then_piece_order(setup):
  rs = _all(setup["store"])
  assert [r["ref_id"] for r in rs] == list(range(len(rs)))
  assert [(r["doc_id"], r["piece"]) for r in rs] == sorted((r["doc_id"], r["piece"]) for r in rs)


def test_ids_tokens_and_texts_are_stable_across_runs(setup):
  again, _ = refs.write_references(str(setup["root"] / "r2"), setup["spec"], setup["tok"], R,
                                   shard_docs=3)
  a, b = _all(setup["store"]), _all(refs.ReferenceStore(again))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x["ref_id"] == y["ref_id"] and x["text"] == y["text"]
    assert x["tokens"].tolist() == y["tokens"].tolist()


def test_text_is_the_decoding_of_the_tokens(setup):
  tok = setup["tok"]
  for r in _all(setup["store"]):
    assert r["text"] == tok.decode(r["tokens"])
    assert "\ufffd" not in r["text"]  # never cut inside a UTF-8 character


def test_doc_key_matches_document_text(setup):
  from data_pipeline import corpus
  store, texts = setup["store"], setup["texts"]
  ids = np.arange(len(store))
  assert [int(k) for k in store.doc_keys(ids)] == [
      corpus.doc_key(texts[d]) for d in store.doc_ids(ids)]


def test_cuts_prefer_sentence_ends(setup):
  tok = setup["tok"]
  classes = refs.PieceClasses.from_tokenizer(tok)
  text = "Alpha beta gamma delta. " * 10
  ids = np.asarray(tok.encode(text), np.int32)
  pieces = refs.split_document(ids, R, classes)
  assert len(pieces) > 1
  for p in pieces[:-1]:
    assert tok.decode(p).rstrip().endswith(".")


def test_cut_points_fall_back_to_a_hard_cut():
  classes = refs.PieceClasses(ends_sentence=np.zeros(10, bool), starts_word=np.zeros(10, bool),
                              can_start=np.ones(10, bool))
  assert refs.cut_points(np.full(50, 5, np.int32), 16, classes) == [16, 32, 48, 50]


def test_tokens_by_ids_pads_and_handles_missing(setup):
  store, tok = setup["store"], setup["tok"]
  toks, lens = store.tokens_by_ids([3, -1, 0])
  assert toks.shape == (3, R) and toks.dtype == np.int32 and lens.dtype == np.int32
  assert lens[1] == 0 and (toks[1] == tok.pad_id).all()
  for row, rid in ((0, 3), (2, 0)):
    ref = store.get(rid)["tokens"]
    assert lens[row] == len(ref)
    assert toks[row, :lens[row]].tolist() == ref.tolist()
    assert (toks[row, lens[row]:] == tok.pad_id).all()
  grid, glens = store.tokens_by_ids(np.array([[0, -1], [1, 2]]))
  assert grid.shape == (2, 2, R) and glens.shape == (2, 2)


def test_texts_and_doc_ids_by_ids(setup):
  store = setup["store"]
  assert store.texts_by_ids([1, -1]) == [store.get(1)["text"], ""]
  assert store.doc_ids([-1, 0]).tolist() == [-1, 0]


def test_out_of_range_id_is_refused(setup):
  store = setup["store"]
  with pytest.raises(IndexError, match=f"ref_id {len(store)} out of range"):
    store.tokens_by_ids([len(store)])


def test_store_pickles_by_path(setup):
  store = setup["store"]
  clone = pickle.loads(pickle.dumps(store))
  assert len(clone) == len(store)
  assert clone.tokens_by_ids([2])[0].tolist() == store.tokens_by_ids([2])[0].tolist()


def test_store_refuses_another_tokenizer(setup, tmp_path):
  store = setup["store"]
  store.check_tokenizer(setup["tok"])
  other = tok_lib.train_tokenizer(setup["texts"][:20], str(tmp_path / "other"), vocab_size=512)
  with pytest.raises(tok_lib.TokenizerMismatchError, match="reference dataset"):
    store.check_tokenizer(other)


def test_a_long_documents_records_report_progress_and_a_short_ones_do_not():
  from data_pipeline import tfds_builders
  lines = []
  n = tfds_builders.LONG_DOCUMENT_RECORDS
  got = list(tfds_builders.document_records(range(n), n, "references of document 7", "refs",
                                            every_s=0.0, printer=lines.append))
  assert got == list(range(n)) and len(lines) == n + 1
  assert lines[-1].startswith(f"references of document 7: {n}/{n} refs (100.0%)")
  lines.clear()
  got = list(tfds_builders.document_records(range(n - 1), n - 1, "x", "refs", every_s=0.0,
                                            printer=lines.append))
  assert got == list(range(n - 1)) and lines == []
