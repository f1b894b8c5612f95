"""Neighbor mining: the 0.9 overlap rule, same-document exclusion, resumable shards."""

import os

import jax
import numpy as np
import pytest

from data_pipeline import prepared
from data_pipeline import tfds_builders
from m3jax.core import workspace
from m3jax.core.config import apply_override, model_config
from m3jax.model import params_io
from m3jax.model import transformer as model_lib
from m3jax.retrieval import index as ix
from m3jax.retrieval import neighbor_table as nt
from m3jax.retrieval import neighbors as nb
from m3jax.retrieval import overlap as ov
from m3jax.retrieval import reference_index
from m3jax.retrieval.lexical_embedder import LexicalEmbedder

CHUNK = 16

FACTS = [
    "the zorvath glacier in the kelmari range retreats forty metres every year",
    "every year the kelmari range zorvath glacier loses forty metres of its ice",  # paraphrase of 0
    "quarnish merchants traded saffron and copper along the velloran coast",
    "the velloran coast saw quarnish traders carry copper and saffron south",  # paraphrase of 2
    "marie curie studied radioactivity and won two nobel prizes",
    "the eiffel tower stands on the champ de mars in paris",
    "tokyo is the capital of japan and a very large city",
    "the mitochondrion makes energy for the cell from glucose",
    "a dog slept by the door while the cat sat on the mat",
    "the river ombra floods the plains of sundar each spring",
]
FILLER = "and so on it goes with many plain words for a while here".split()


class WordTokenizer:
  """Word-level ids (>= 5); 0 is padding, as in m3jax tokenizers."""

  def __init__(self, texts):
    words = sorted({w for t in texts for w in t.split()})
    self.ids = {w: i + 5 for i, w in enumerate(words)}
    self.words = {i: w for w, i in self.ids.items()}

  def encode(self, text):
    return [self.ids[w] for w in text.split()]

  def decode_batch(self, batch):
    return [" ".join(self.words[int(i)] for i in ids if int(i) in self.words) for ids in batch]


@pytest.fixture(scope="module")
def world():
  tok = WordTokenizer(FACTS + [" ".join(FILLER)])
  ref_tokens = [np.array(tok.encode(f), np.int32) for f in FACTS]
  emb = LexicalEmbedder(dim=128).fit(FACTS)
  index = ix.build_index(emb.embed(FACTS), np.arange(len(FACTS)), fingerprint=emb.fingerprint())
  return tok, ref_tokens, emb, index


def _chunk(tok, text):
  ids = tok.encode(text)[:CHUNK]
  pad = (FILLER * 2)[:CHUNK - len(ids)]
  return ids + tok.encode(" ".join(pad))


def _sequence(tok, texts):
  return np.array([t for text in texts for t in _chunk(tok, text)], np.int32)


def _settings(**kw):
  return nt.MiningSettings(chunk_length=CHUNK, candidates=5, shard_size=2, **kw)


def _lookup(ref_tokens):
  return lambda ids: [ref_tokens[i] for i in ids]


def test_verbatim_reference_is_dropped_and_paraphrase_kept(world):
  tok, ref_tokens, emb, index = world
  # Chunk 0 holds fact 0 verbatim; its best candidate (fact 0) must give way to the
  # paraphrase (fact 1). Chunk 1 talks about saffron without copying any fact.
  seq = _sequence(tok, [FACTS[0], "saffron and copper along the coast", FILLER[0], FILLER[1]])
  ids, _ = index.search(emb.embed(tok.decode_batch([seq[:CHUNK]])), 2)
  assert ids[0].tolist() == [0, 1]  # the retriever alone would pick the copy
  rows = nb.mine_block(seq[None], decode=tok.decode_batch, embedder=emb, index=index,
                       ref_tokens=_lookup(ref_tokens), settings=_settings())
  assert rows.shape == (1, 4, 1)
  assert rows[0, 0, 0] == 1
  assert rows[0, 1, 0] in (2, 3)


def test_overlap_is_measured_against_the_whole_sequence(world):
  tok, ref_tokens, _, _ = world
  # Fact 5 is copied in chunk 3; offered as chunk 0's best candidate it must be refused.
  seq = _sequence(tok, [FILLER[0], FILLER[1], FILLER[2], FACTS[5]])
  cands = np.array([[5, 6], [-1, -1], [-1, -1], [-1, -1]])
  got = nb.select_neighbors(seq, cands, dict(enumerate(ref_tokens)), _settings())
  assert got[:, 0].tolist() == [6, -1, -1, -1]


def test_same_document_references_can_be_excluded(world):
  tok, ref_tokens, _, _ = world
  seq = _sequence(tok, FILLER[:4])
  cands = np.array([[4, 7]] * 4)
  doc_of = {4: 100, 7: 200}
  keep = nb.select_neighbors(seq, cands, dict(enumerate(ref_tokens)), _settings(),
                             sequence_doc_keys=np.array([100, 100, -1, 5]), ref_doc_keys=doc_of)
  assert (keep[:, 0] == 4).all()  # exclusion off: same-document refs allowed
  drop = nb.select_neighbors(seq, cands, dict(enumerate(ref_tokens)),
                             _settings(exclude_same_doc=True),
                             sequence_doc_keys=np.array([100, 100, -1, 5]), ref_doc_keys=doc_of)
  assert (drop[:, 0] == 7).all()


def test_padding_chunks_get_no_neighbor(world):
  tok, ref_tokens, emb, index = world
  seq = _sequence(tok, [FACTS[6], FACTS[7], FILLER[0], FILLER[0]])
  seq[2 * CHUNK:] = 0
  rows = nb.mine_block(seq[None], decode=tok.decode_batch, embedder=emb, index=index,
                       ref_tokens=_lookup(ref_tokens), settings=_settings())
  assert rows[0, 2:, 0].tolist() == [-1, -1]
  assert (rows[0, :2, 0] >= 0).all()


def test_several_neighbors_per_chunk(world):
  tok, ref_tokens, emb, index = world
  seq = _sequence(tok, [FACTS[0], FACTS[2], FACTS[4], FACTS[9]])
  rows = nb.mine_block(seq[None], decode=tok.decode_batch, embedder=emb, index=index,
                       ref_tokens=_lookup(ref_tokens), settings=_settings(neighbors_per_chunk=3))
  assert rows.shape == (1, 4, 3)
  for c in range(4):
    picked = rows[0, c][rows[0, c] >= 0]
    assert len(set(picked.tolist())) == len(picked)  # no repeats within a chunk
  assert 0 not in rows[0, 0]  # the verbatim copy never appears


def _corpus(tok, n=7, seed=0):
  rng = np.random.default_rng(seed)
  texts = FACTS + [" ".join(FILLER)]
  return np.stack([_sequence(tok, [texts[i] for i in rng.integers(0, len(texts), 4)])
                   for _ in range(n)])


def _mine(world, out, seqs, **kw):
  tok, ref_tokens, emb, index = world
  return nb.mine_neighbors(str(out), sequences=seqs, decode=tok.decode_batch, embedder=emb,
                           index=index, ref_tokens=_lookup(ref_tokens),
                           settings=kw.pop("settings", _settings()),
                           inputs=dict(corpus="toy", embedder=emb.fingerprint()),
                           progress_every_s=None, **kw)


def _files(path):
  return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def test_killed_run_resumes_to_identical_files(world, tmp_path):
  seqs = _corpus(world[0])
  _mine(world, tmp_path / "full", seqs)
  full = _files(tmp_path / "full")
  assert sorted(full) == ["manifest.json"] + [nt.shard_name(i) for i in range(4)]

  part = tmp_path / "part"
  _mine(world, part, seqs, max_shards=2)  # "killed" after two shards ...
  (part / (nt.shard_name(2) + ".tmp-99999")).write_bytes(b"half a shard")  # ... mid-write
  assert not (part / nt.shard_name(2)).exists()
  with pytest.raises(nt.NeighborTableError, match="incomplete: 2 of 4"):
    nt.NeighborTable(str(part))
  _mine(world, part, seqs)
  assert _files(part) == full  # byte-identical, no temporary left behind

  table = nt.NeighborTable(str(part))
  assert len(table) == 7 and table[6].shape == (4,) and table[6].dtype == np.int32
  np.testing.assert_array_equal(table.rows(0, 7), np.stack([table[i] for i in range(7)]))


def test_processes_split_shards(world, tmp_path):
  seqs = _corpus(world[0])
  _mine(world, tmp_path / "one", seqs)
  for p in range(2):
    _mine(world, tmp_path / "two", seqs, process_index=p, process_count=2)
  assert _files(tmp_path / "two") == _files(tmp_path / "one")


def test_rerun_with_other_settings_is_refused(world, tmp_path):
  seqs = _corpus(world[0])
  _mine(world, tmp_path / "t", seqs)
  with pytest.raises(nt.NeighborTableError, match="overlap_threshold"):
    _mine(world, tmp_path / "t", seqs, settings=_settings(overlap_threshold=0.5))


def test_reader_refuses_a_mismatched_manifest(world, tmp_path):
  seqs = _corpus(world[0])
  _mine(world, tmp_path / "t", seqs)
  nt.NeighborTable(str(tmp_path / "t"), expect={"inputs": {"corpus": "toy"}, "n_sequences": 7})
  with pytest.raises(nt.NeighborTableError, match="inputs.corpus"):
    nt.NeighborTable(str(tmp_path / "t"), expect={"inputs": {"corpus": "other"}})
  with pytest.raises(nt.NeighborTableError, match="no neighbor table"):
    nt.NeighborTable(str(tmp_path / "missing"))
  with pytest.raises(IndexError):
    nt.NeighborTable(str(tmp_path / "t"))[7]


def test_embedder_must_match_the_index(world, tmp_path):
  tok, ref_tokens, _, index = world
  other = LexicalEmbedder(dim=128)
  with pytest.raises(ix.IndexDirError, match="built with embedder"):
    nb.mine_neighbors(str(tmp_path / "t"), sequences=_corpus(tok), decode=tok.decode_batch,
                      embedder=other, index=index, ref_tokens=_lookup(ref_tokens),
                      settings=_settings(), inputs={}, progress_every_s=None)


# ---------------------------------------------------------------- a prepared workdir

def test_workdir_index_and_mining_end_to_end(tiny_prepared, tmp_path):
  cfg, workdir = tiny_prepared
  root = workspace.data_root(cfg, str(workdir))
  refs = prepared.open_references(root)
  idx_dir, out = str(tmp_path / "index"), str(tmp_path / "neighbors")
  index = reference_index.build_reference_index(cfg, str(workdir), out=idx_dir,
                                                progress_every_s=None)
  assert index.count == len(refs) and index.dim == cfg.data.embed_dim
  again = reference_index.build_reference_index(cfg, str(workdir), out=idx_dir,
                                                progress_every_s=None)
  assert again.fingerprint == index.fingerprint  # reused, not rebuilt
  other = cfg.copy_and_resolve_references()
  apply_override(other, "data.embed_dim", "32")
  with pytest.raises(ix.IndexDirError, match="other inputs"):
    reference_index.build_reference_index(other, str(workdir), out=idx_dir, progress_every_s=None)

  manifest = nb.mine_workdir(cfg, str(workdir), index_path=idx_dir, out=out,
                             progress_every_s=None)
  table = nt.open_neighbor_table(cfg, root, path=out)
  packed = tfds_builders.open_split(prepared.dataset_path(root, "packed"), "train")
  C = cfg.model.max_seq_len // cfg.model.chunk_length
  assert len(table) == len(packed) == manifest["n_sequences"]
  rows = table.rows(0, len(table))
  assert rows.shape == (len(packed), C) and (rows >= 0).mean() > 0.9
  for s in range(0, len(packed), max(1, len(packed) // 40)):
    seq = np.asarray(packed[s]["tokens"])
    seq = seq[seq != 0]
    for r in set(rows[s][rows[s] >= 0].tolist()):
      toks, n = refs.tokens_by_ids([r])
      assert ov.overlap(seq, toks[0, :n[0]]) <= cfg.data.train_overlap_threshold

  stricter = cfg.copy_and_resolve_references()
  apply_override(stricter, "data.train_overlap_threshold", "0.5")
  with pytest.raises(nt.NeighborTableError, match="overlap_threshold"):
    nt.open_neighbor_table(stricter, root, path=out)


def test_model_embedder_index_and_mining(tiny_prepared, tmp_path):
  cfg, workdir = tiny_prepared
  cfg = cfg.copy_and_resolve_references()
  apply_override(cfg, "data.embedder", "model")
  mc = model_config(cfg)
  # Random weights of the right tree, drawn in numpy (an eager init is slow on CPU).
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: model_lib.init_params(mc, jax.random.PRNGKey(0)))
  params = jax.tree_util.tree_map_with_path(
      lambda p, s: (np.ones(s.shape, np.float32) if "scale" in jax.tree_util.keystr(p)
                    else (0.02 * rng.standard_normal(s.shape)).astype(np.float32)), shapes)
  params_dir = str(tmp_path / "params")
  params_io.save_params(params_dir, params, cfg)

  idx_dir, out = str(tmp_path / "index"), str(tmp_path / "neighbors")
  index = reference_index.build_reference_index(cfg, str(workdir), params_dir=params_dir,
                                                out=idx_dir, progress_every_s=None)
  assert index.embedder_kind == "model" and index.dim == mc.d_model
  with pytest.raises(ix.IndexDirError, match="--params"):
    nb.mine_workdir(cfg, str(workdir), index_path=idx_dir, out=out, progress_every_s=None)
  nb.mine_workdir(cfg, str(workdir), params_dir=params_dir, index_path=idx_dir, out=out,
                  progress_every_s=None)
  table = nt.open_neighbor_table(cfg, workspace.data_root(cfg, str(workdir)), path=out)
  assert (table.rows(0, len(table)) >= 0).mean() > 0.9


def test_preceding_neighbors_give_chunk_c_the_neighbor_of_chunk_c_minus_1():
  # Held-out loss with memory never reads a reference found by the chunk's own text.
  table = [np.array([7, 8, 9], np.int32), np.array([[1, 2], [3, 4], [5, 6]], np.int32)]
  view = nt.PrecedingNeighbors(table)
  assert len(view) == 2
  np.testing.assert_array_equal(view[0], [-1, 7, 8])
  np.testing.assert_array_equal(view[1], [[-1, -1], [1, 2], [3, 4]])
