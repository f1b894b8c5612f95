"""prepare-data stages and the grain loader: determinism, resume, sharding, enrichment."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from data_pipeline import corpus
from data_pipeline import loader as loader_lib
from data_pipeline import packing
from data_pipeline import prepare
from data_pipeline import prepared as prepared_lib
from data_pipeline import tokenizer as tok_lib
from m3jax.core import config as config_lib
from m3jax.core import workspace
from m3jax.core.config import ConfigError

VOCAB = 512
TINY = [f"model.vocab_size={VOCAB}", f"data.vocab_size={VOCAB}",
        "data.knowledge_world.n_seen=12", "data.knowledge_world.n_memory_taught=12",
        "data.knowledge_world.n_unseen=6", "data.eval_fraction=0.1", "data.shard_docs=10"]


def _cfg(repo_root, *overrides):
  return config_lib.load_config(str(repo_root / "configs" / "tiny.py"), TINY + list(overrides))


@pytest.fixture(scope="module")
def prepared(repo_root, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("work"))
  cfg = _cfg(repo_root)
  manifest = prepare.prepare_data(cfg, workdir)
  return dict(cfg=cfg, workdir=workdir, root=workspace.data_root(cfg, workdir), manifest=manifest)


# ------------------------------------------------------------------ packing


def test_packer_sets_next_token_and_pads_only_the_end():
  p = packing.Packer(seq_len=8, chunk_length=4, pad_id=0)
  recs = list(p.add(11, np.arange(10, 20))) + list(p.add(22, np.arange(30, 36))) + list(p.finish())
  assert [r["tokens"].tolist() for r in recs] == [
      list(range(10, 18)), [18, 19, 30, 31, 32, 33, 34, 35]]
  assert [int(r["next_token"]) for r in recs] == [18, 0]
  assert recs[0]["chunk_doc_keys"].tolist() == [11, 11]
  assert recs[1]["chunk_doc_keys"].tolist() == [11, 22]  # a 2-2 tie goes to the earlier doc
  short = packing.Packer(8, 4, 0)
  assert list(short.add(5, np.arange(1, 4))) == []
  (last,) = list(short.finish())
  assert last["tokens"].tolist() == [1, 2, 3, 0, 0, 0, 0, 0] and last["next_token"] == 0
  assert last["chunk_doc_keys"].tolist() == [5, -1] and short.padding == 5


def test_packer_aligns_chunk_sized_documents_to_chunk_boundaries():
  p = packing.Packer(seq_len=8, chunk_length=4, pad_id=0, align_chunks=True)
  docs = [(1, [11, 12, 13]), (2, [21, 22]), (3, [31, 32, 33, 34, 35, 36]), (4, [41]), (5, [51])]
  recs = [r for key, ids in docs for r in p.add(key, np.array(ids))] + list(p.finish())
  # Docs 2, 4 and 5 fit a chunk: each starts one, after padding; doc 3 is longer than a
  # chunk and follows doc 2 as usual.
  assert [r["tokens"].tolist() for r in recs] == [
      [11, 12, 13, 0, 21, 22, 31, 32], [33, 34, 35, 36, 41, 0, 0, 0], [51, 0, 0, 0, 0, 0, 0, 0]]
  assert [r["chunk_doc_keys"].tolist() for r in recs] == [[1, 2], [3, 4], [5, -1]]
  assert p.padding == 1 + 3 + 7
  plain = packing.Packer(8, 4, 0)
  out = [r for key, ids in docs for r in plain.add(key, np.array(ids))] + list(plain.finish())
  assert out[0]["tokens"].tolist() == [11, 12, 13, 21, 22, 31, 32, 33]


def test_chunk_majority_picks_most_covering_document():
  keys = np.array([1, 1, 2, 2, 2, 3, -1, -1, -1, -1, -1, -1, 4, 4, 5, 5])
  assert packing.chunk_majority(keys, 4).tolist() == [1, 2, -1, 4]


def test_heldout_choice_depends_only_on_index():
  a = packing.heldout_mask(0, 10000, seed=0, fraction=0.05)
  assert 350 < a.sum() < 650
  assert (packing.heldout_mask(5000, 6000, 0, 0.05) == a[5000:6000]).all()
  assert (packing.heldout_mask(0, 10000, 1, 0.05) != a).any()
  limit = packing.heldout_limit(10000, 0, 0.05, max_docs=10)
  assert a[:limit].sum() == 10


# ------------------------------------------------------------------ prepare-data


def test_manifest_describes_every_dataset(prepared):
  m, root = prepared["manifest"], prepared["root"]
  assert m["format"] == prepared_lib.FORMAT
  assert m["tokenizer"]["vocab_size"] == VOCAB and m["tokenizer"]["reference_prefix_ids"] == [2, 4]
  assert prepared_lib.open_tokenizer(root).hash == m["tokenizer"]["hash"]
  assert set(m["datasets"]) == {"documents", "qa", "references", "packed"}
  assert m["datasets"]["qa"]["splits"]["eval"] == 2 * 30
  packed = m["datasets"]["packed"]
  assert packed["seq_len"] == 64 and packed["splits"]["validation"]["sequences"] > 0
  store = prepared_lib.open_references(root)
  assert len(store) == m["datasets"]["references"]["num_references"] >= 30
  assert max(store.tokens_by_ids(np.arange(len(store)))[1]) <= 24


def test_packed_sequences_hold_every_training_document(prepared):
  root = prepared["root"]
  tok = prepared_lib.open_tokenizer(root)
  n = 0
  for split in ("train", "validation"):
    src = loader_lib.packed_source(root, split)
    stream = np.concatenate([src[i]["tokens"] for i in range(len(src))])
    stream = stream[stream != tok.pad_id]
    assert (stream == tok.bos_id).sum() == (stream == tok.eos_id).sum()
    n += (stream == tok.bos_id).sum()
    stats = prepared["manifest"]["datasets"]["packed"]["splits"][split]
    assert len(stream) == stats["tokens"] and len(src) == stats["sequences"]
  assert n == prepared["manifest"]["datasets"]["documents"]["splits"]["train"]


def test_rerun_reuses_finished_stages(prepared, capsys):
  before = {s: v["finished"] for s, v in prepared["manifest"]["stages"].items()}
  m = prepare.prepare_data(prepared["cfg"], prepared["workdir"])
  assert {s: v["finished"] for s, v in m["stages"].items()} == before
  assert m["tokenizer"]["hash"] == prepared["manifest"]["tokenizer"]["hash"]
  assert "reusing stage packed" in capsys.readouterr().out


def test_changed_setting_is_refused_naming_it(prepared, repo_root):
  cfg = _cfg(repo_root, "model.max_seq_len=32")
  with pytest.raises(prepare.StageMismatchError, match="seq_len: 64 -> 32"):
    prepare.prepare_data(cfg, prepared["workdir"])


def test_different_given_tokenizer_is_refused(prepared, repo_root, tmp_path):
  from data_pipeline import knowledge_world
  world = knowledge_world.generate(dict(seed=99, n_seen=20, n_memory_taught=0, n_unseen=0))
  other = tok_lib.train_tokenizer([d.text for d in world.train_documents],
                                  str(tmp_path / "other"), vocab_size=VOCAB)
  cfg = _cfg(repo_root, f"data.tokenizer={other.path}")
  with pytest.raises(tok_lib.TokenizerMismatchError, match="was prepared with tokenizer"):
    prepare.prepare_data(cfg, prepared["workdir"])


def test_tokenizer_not_fitting_the_model_is_refused(prepared, repo_root, tmp_path):
  given = os.path.join(prepared["root"], "tokenizer.model")
  cfg = _cfg(repo_root, f"data.tokenizer={given}", "model.vocab_size=600")
  with pytest.raises(tok_lib.TokenizerMismatchError, match="model.vocab_size=600"):
    prepare.prepare_data(cfg, str(tmp_path))


def test_vocab_size_fields_must_agree_before_training(repo_root, tmp_path):
  cfg = _cfg(repo_root, "data.vocab_size=1024")
  with pytest.raises(ConfigError, match="data.vocab_size"):
    prepare.prepare_data(cfg, str(tmp_path))


def test_leftovers_of_killed_runs_are_cleaned_and_foreign_dirs_refused(prepared, repo_root):
  root = prepared["root"]
  os.makedirs(os.path.join(root, ".tmp-packed-dead"))
  prepare.prepare_data(prepared["cfg"], prepared["workdir"])
  assert not os.path.exists(os.path.join(root, ".tmp-packed-dead"))
  os.makedirs(os.path.join(root, "foreign"))
  with pytest.raises(prepare.StageMismatchError, match="foreign exists but has no stage.json"):
    prepare.run_stage(root, "foreign", {}, lambda tmp: {})


def test_stage_records_of_earlier_runs_are_reused(tmp_path):
  """A stage.json written before m3jax.core.stages (the same keys; settings hashed as
  sorted JSON) is recognised; other settings are refused naming the field."""
  import hashlib
  settings = dict(seq_len=64, source=dict(kind="files", files=[["a.txt", 3]]))
  old_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
  record = dict(stage="packed", settings=settings, settings_hash=old_hash, info=dict(path="x"),
                seconds=1.0, finished="2026-01-01T00:00:00+00:00")
  os.makedirs(tmp_path / "packed")
  with open(tmp_path / "packed" / "stage.json", "w") as f:
    json.dump(record, f)

  def must_not_run(tmp):
    raise AssertionError("a finished stage ran again")

  got = prepare.run_stage(str(tmp_path), "packed", settings, must_not_run)
  assert got["settings_hash"] == old_hash and got["info"] == {"path": "x"}
  with pytest.raises(prepare.StageMismatchError, match="seq_len: 64 -> 32"):
    prepare.run_stage(str(tmp_path), "packed", dict(settings, seq_len=32), must_not_run)


def test_files_corpus_with_separate_knowledge_base(repo_root, tmp_path):
  from data_pipeline import knowledge_world
  world = knowledge_world.generate(dict(n_seen=15, n_memory_taught=0, n_unseen=5))
  train = tmp_path / "train.txt"
  train.write_text("\n\n".join(d.text for d in world.train_documents))
  kb = tmp_path / "kb.jsonl"
  kb.write_text("".join(json.dumps({"body": d.text}) + "\n" for d in world.kb_documents))
  cfg = _cfg(repo_root, "data.corpus=files", f"data.files=['{train}']",
             f"data.kb_files=['{kb}']", "data.kb_text_field=body")
  m = prepare.prepare_data(cfg, str(tmp_path / "w"))
  n_train, n_kb = len(world.train_documents), len(world.kb_documents)
  assert (n_train, n_kb) == (15 * (4 + 6), 20 * 4)  # defaults: 4 paraphrases, 6 QA attributes
  assert m["datasets"]["documents"]["splits"] == {"train": n_train, "kb": n_kb}
  assert m["datasets"]["references"]["num_documents"] == n_kb
  assert m["corpus"]["train"]["files"] == [[str(train), train.stat().st_size]]


def test_bad_records_skip_counts_prints_and_records_them(repo_root, tmp_path, capsys):
  from data_pipeline import documents
  from data_pipeline import knowledge_world
  world = knowledge_world.generate(dict(n_seen=15, n_memory_taught=0, n_unseen=5))
  train = tmp_path / "train.txt"
  train.write_bytes("\n\n".join(d.text for d in world.train_documents).encode()
                    + b"\n\nbad \xff document\n")
  kb = tmp_path / "kb.jsonl"
  n_bad = documents.SHOWN_BAD_RECORDS + 5
  kb.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in world.kb_documents)
                + '{"text": 1}\n' * n_bad)
  args = ["data.corpus=files", f"data.files=['{train}']", f"data.kb_files=['{kb}']"]
  with pytest.raises(corpus.CorpusError, match="train.txt: invalid UTF-8 at byte offset"):
    prepare.prepare_data(_cfg(repo_root, *args), str(tmp_path / "w0"))  # default: error
  m = prepare.prepare_data(_cfg(repo_root, *args, "data.bad_records=skip"), str(tmp_path / "w"))
  docs = m["datasets"]["documents"]
  assert docs["splits"] == {"train": len(world.train_documents), "kb": len(world.kb_documents)}
  bad = docs["bad_records"]
  assert bad["train"][str(train)]["count"] == 1 and bad["kb"][str(kb)]["count"] == n_bad
  first = bad["kb"][str(kb)]["records"][0]
  assert first == dict(line=len(world.kb_documents) + 1, offset=first["offset"],
                       reason="field 'text' is int, not a string")
  out = capsys.readouterr().out
  assert out.count(f"skipping bad record: {kb}: line") == documents.SHOWN_BAD_RECORDS
  assert f"skipped {n_bad} bad record(s) in {kb}" in out and "more bad records" in out
  with pytest.raises(ConfigError, match="data.bad_records"):
    prepare.prepare_data(_cfg(repo_root, *args, "data.bad_records=drop"), str(tmp_path / "w2"))


def test_prepare_data_prints_no_download_lines_and_leaves_no_temporary_directories(
    repo_root, tmp_path, monkeypatch, capsys):
  import tempfile
  from data_pipeline import knowledge_world
  world = knowledge_world.generate(dict(n_seen=15, n_memory_taught=0, n_unseen=5))
  train = tmp_path / "train.txt"
  train.write_text("\n\n".join(d.text for d in world.train_documents))
  temp = tmp_path / "temp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))  # TFDS used to leave tmp*tfds here
  prepare.prepare_data(_cfg(repo_root, "data.corpus=files", f"data.files=['{train}']"),
                       str(tmp_path / "w"))
  assert os.listdir(temp) == []
  out = capsys.readouterr().out
  assert "prepare-data: " in out
  assert "Downloading and preparing" not in out and "downloaded and prepared" not in out


def test_tfds_corpus_is_read_in_place(prepared, repo_root, tmp_path):
  """A text dataset prepared elsewhere (here: the fixture's documents) by name + data_dir."""
  given = os.path.join(prepared["root"], "tokenizer.model")
  cfg = _cfg(repo_root, "data.corpus=tfds", "data.tfds_name=m3jax_documents",
             f"data.tfds_data_dir={prepared['root']}/documents", f"data.tokenizer={given}")
  m = prepare.prepare_data(cfg, str(tmp_path / "w"))
  n_train = prepared["manifest"]["datasets"]["documents"]["splits"]["train"]
  assert "documents" not in m["datasets"]  # nothing copied
  assert m["corpus"]["train"]["num_documents"] == n_train and m["corpus"]["kb"] == {
      "kind": "same_as_train"}
  assert m["datasets"]["references"]["num_documents"] == n_train
  splits = m["datasets"]["packed"]["splits"]
  assert splits["train"]["documents"] + splits["validation"]["documents"] == n_train
  assert m["tokenizer"]["hash"] == prepared["manifest"]["tokenizer"]["hash"]


def test_missing_tfds_corpus_is_named(repo_root, tmp_path):
  cfg = _cfg(repo_root, "data.corpus=tfds", "data.tfds_name=my_corpus",
             f"data.tfds_data_dir={tmp_path}")
  with pytest.raises(corpus.CorpusError, match="my_corpus"):
    prepare.prepare_data(cfg, str(tmp_path / "w"))


def test_empty_files_corpus_names_the_file(repo_root, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n  \n")
  cfg = _cfg(repo_root, "data.corpus=files", f"data.files=['{empty}']")
  with pytest.raises(corpus.CorpusError, match="empty corpus.*empty.txt"):
    prepare.prepare_data(cfg, str(tmp_path / "w"))
  assert not [d for d in os.listdir(tmp_path / "w" / "data") if d.startswith(".tmp")]


def test_one_document_corpus_says_it_is_too_small_to_split(repo_root, tmp_path):
  from data_pipeline import knowledge_world
  world = knowledge_world.generate(dict(n_seen=15, n_memory_taught=0, n_unseen=5))
  one = tmp_path / "one.txt"
  one.write_text("\n".join(d.text for d in world.train_documents) + "\n")  # no blank line
  args = ["data.corpus=files", f"data.files=['{one}']"]
  with pytest.raises(corpus.CorpusError, match=r"data.files \(.*one.txt\) is too small to "
                     r"split: all 1 of its document\(s\) go to the validation split.*"
                     r"--config.data.eval_fraction=0 --config.train.eval_every=0"):
    prepare.prepare_data(_cfg(repo_root, *args), str(tmp_path / "w"))
  assert sorted(os.listdir(tmp_path / "w" / "data")) == [".prepare.lock", "documents"]
  m = prepare.prepare_data(_cfg(repo_root, *args, "data.eval_fraction=0"), str(tmp_path / "w2"))
  assert m["datasets"]["packed"]["splits"]["train"]["documents"] == 1
  assert m["datasets"]["packed"]["splits"]["validation"]["documents"] == 0


def test_missing_files_corpus_names_the_file(repo_root, tmp_path):
  cfg = _cfg(repo_root, "data.corpus=files", f"data.files=['{tmp_path}/missing.jsonl']")
  with pytest.raises(corpus.CorpusError, match="missing.jsonl does not exist"):
    prepare.prepare_data(cfg, str(tmp_path / "w"))


# ------------------------------------------------------------------ loader


def _take(loader, n):
  return [next(loader) for _ in range(n)]


def _eq(a, b):
  return all(set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x)
             for x, y in zip(a, b))


def test_batch_layout_targets_and_mask(prepared):
  src = loader_lib.packed_source(prepared["root"])
  b = next(loader_lib.Loader(src, global_batch_size=4, seed=0))
  assert b["tokens"].shape == (4, 64) and b["tokens"].dtype == np.int32
  assert b["seq_index"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
  for row in range(4):
    rec = src[int(b["seq_index"][row])]
    assert np.array_equal(b["tokens"][row], rec["tokens"])
    assert np.array_equal(b["targets"][row, :-1], rec["tokens"][1:])
    assert b["targets"][row, -1] == rec["next_token"]
  assert np.array_equal(b["loss_mask"], (b["targets"] != 0).astype(np.float32))


def test_same_seed_gives_identical_batches(prepared):
  src = loader_lib.packed_source(prepared["root"])
  a = _take(loader_lib.Loader(src, global_batch_size=4, seed=5), 6)
  b = _take(loader_lib.Loader(src, global_batch_size=4, seed=5), 6)
  c = _take(loader_lib.Loader(src, global_batch_size=4, seed=6), 6)
  assert _eq(a, b)
  assert not _eq(a, c)


def test_state_restored_mid_epoch_continues_identically(prepared):
  src = loader_lib.packed_source(prepared["root"])
  first = loader_lib.Loader(src, global_batch_size=4, seed=1)
  steps = first.steps_per_epoch
  _take(first, steps + 3)  # into the second epoch
  state = first.get_state()
  json.loads(state)  # JSON bytes, checkpointable as-is
  expected = _take(first, 4)
  resumed = loader_lib.Loader(src, global_batch_size=4, seed=1)
  resumed.set_state(state)
  assert resumed.step == steps + 3
  assert _eq(_take(resumed, 4), expected)


def test_state_from_another_loader_is_refused(prepared):
  src = loader_lib.packed_source(prepared["root"])
  state = loader_lib.Loader(src, global_batch_size=4, seed=1).get_state()
  with pytest.raises(ValueError, match="seed: saved 1, now 2"):
    loader_lib.Loader(src, global_batch_size=4, seed=2).set_state(state)


def test_row_shards_together_give_the_global_batch(prepared):
  import grain.python as grain
  src = loader_lib.packed_source(prepared["root"])
  whole = _take(loader_lib.Loader(src, global_batch_size=4, seed=0), 5)
  parts = [_take(loader_lib.Loader(src, global_batch_size=4, seed=0,
                                   shard_options=grain.ShardOptions(i, 2)), 5)
           for i in range(2)]
  for step in range(5):
    for k in whole[step]:
      joined = np.concatenate([parts[0][step][k], parts[1][step][k]])
      assert np.array_equal(joined, whole[step][k]), (step, k)


def test_one_epoch_visits_every_record_once(prepared):
  src = loader_lib.packed_source(prepared["root"])
  ld = loader_lib.Loader(src, global_batch_size=4, seed=0)
  seen = np.concatenate([b["seq_index"] for b in _take(ld, len(src) // 4)])
  assert len(set(seen.tolist())) == len(seen) == (len(src) // 4) * 4


def test_finite_epoch_pads_with_empty_rows(prepared):
  src = loader_lib.packed_source(prepared["root"], "validation")
  ld = loader_lib.Loader(src, global_batch_size=4, num_epochs=1, shuffle=False)
  batches = list(ld)
  assert len(batches) == ld.num_batches == -(-len(src) // 4)
  idx = np.concatenate([b["seq_index"] for b in batches])
  assert idx[idx >= 0].tolist() == list(range(len(src)))
  pad = np.concatenate([b["loss_mask"] for b in batches])[idx < 0]
  assert pad.sum() == 0


def test_global_arrays_with_a_mesh(prepared):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  src = loader_lib.packed_source(prepared["root"])
  b = next(loader_lib.Loader(src, global_batch_size=8, seed=0, sharding=sharding))
  assert isinstance(b["tokens"], jax.Array) and b["tokens"].shape == (8, 64)
  assert b["tokens"].sharding.spec == P(("data", "fsdp"), None)
  host = next(loader_lib.Loader(src, global_batch_size=8, seed=0))
  assert np.array_equal(np.asarray(b["tokens"]), host["tokens"])


def test_reference_enrichment(prepared):
  src = loader_lib.packed_source(prepared["root"])
  store = prepared_lib.open_references(prepared["root"])
  rng = np.random.default_rng(0)
  table = rng.integers(-1, len(store), size=(len(src), 4)).astype(np.int32)
  ld = loader_lib.Loader(src, global_batch_size=4, seed=0, neighbors=table, references=store)
  b = next(ld)
  assert b["ref_tokens"].shape == (4, 4, 24) and b["ref_lengths"].shape == (4, 4)
  for row in range(4):
    nb = table[int(b["seq_index"][row])]
    assert np.array_equal(b["neighbors"][row], nb)
    toks, lens = store.tokens_by_ids(nb)
    assert np.array_equal(b["ref_tokens"][row], toks)
    assert np.array_equal(b["ref_lengths"][row], lens)
  with pytest.raises(ValueError, match="both"):
    loader_lib.Loader(src, global_batch_size=4, neighbors=table)


_CHILD = textwrap.dedent("""
    import json, os, sys
    port, pid, path, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    import jax
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from data_pipeline import loader
    mesh = Mesh(np.array(jax.devices()), ("data",))
    ld = loader.Loader(loader.PackedSource(path), global_batch_size=4, seed=3,
                       sharding=NamedSharding(mesh, P("data")))
    seen, total = [], 0
    for _ in range(ld.steps_per_epoch):
      b = next(ld)
      assert b["tokens"].shape == (4, 64), b["tokens"].shape
      for s in sorted(b["seq_index"].addressable_shards, key=lambda s: s.index[0].start):
        seen += np.asarray(s.data).tolist()
      total += int(jax.jit(jnp.sum)(b["seq_index"]))
    ev = loader.Loader(loader.PackedSource(path), global_batch_size=4, num_epochs=1,
                       shuffle=False, sharding=NamedSharding(mesh, P("data")))
    eval_seen = []
    for b in ev:
      for s in b["seq_index"].addressable_shards:
        eval_seen += np.asarray(s.data).tolist()
    json.dump(dict(seen=seen, total=total, rows=list(ld.rows), eval_seen=eval_seen,
                   eval_batches=ev.num_batches), open(out, "w"))
""")


@pytest.mark.multiprocess
def test_two_processes_read_disjoint_rows_of_the_same_global_batches(prepared, tmp_path):
  path = prepared_lib.dataset_path(prepared["root"], "packed")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(port), str(i), path,
                             str(tmp_path / f"out{i}.json")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    logs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert all(p.returncode == 0 for p in procs), "\n".join(l[-2000:] for l in logs)
  res = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
  n = len(loader_lib.PackedSource(path))
  # Training: each host reads its half of every global batch; together they are exactly
  # the batches one process reads alone.
  assert res[0]["rows"] == [0, 2] and res[1]["rows"] == [2, 4]
  single = loader_lib.Loader(loader_lib.PackedSource(path), global_batch_size=4, seed=3)
  expected = [b["seq_index"] for b in _take(single, single.steps_per_epoch)]
  got = [np.concatenate([res[0]["seen"][2 * i:2 * i + 2], res[1]["seen"][2 * i:2 * i + 2]])
         for i in range(len(expected))]
  assert all(np.array_equal(a, b) for a, b in zip(got, expected))
  assert not set(res[0]["seen"]) & set(res[1]["seen"])
  assert res[0]["total"] == res[1]["total"] == sum(res[0]["seen"]) + sum(res[1]["seen"])
  # Eval (one epoch): together exactly every record, same number of batches on both hosts.
  ev = [r["eval_seen"] for r in res]
  assert res[0]["eval_batches"] == res[1]["eval_batches"]
  valid = [x for e in ev for x in e if x >= 0]
  assert sorted(valid) == list(range(n))


def test_eval_questions_round_trip_from_the_qa_dataset(prepared):
  from data_pipeline import knowledge_world
  qs = prepared_lib.read_questions(prepared["root"], "eval")
  world = knowledge_world.generate(prepared["cfg"].data.knowledge_world)
  assert qs == list(world.eval_questions)
  assert qs[0].prompt.startswith("Question: ") and qs[0].prompt.endswith("\nAnswer: " + qs[0].lead)


def test_packed_source_bulk_reads_for_mining(prepared):
  src = loader_lib.packed_source(prepared["root"])
  idx, toks, keys = next(src.iter_batches(start=2, batch=5))
  assert idx.tolist() == [2, 3, 4, 5, 6] and toks.shape == (5, 64) and keys.shape == (5, 4)
  assert np.array_equal(toks[1], src[3]["tokens"])
  assert np.array_equal(keys[1], src.record(3)["chunk_doc_keys"])


def test_concurrent_prepare_on_one_directory_is_refused(prepared):
  with prepare._Lock(prepared["root"]):
    with pytest.raises(prepare.StageMismatchError, match="another prepare-data"):
      prepare.prepare_data(prepared["cfg"], prepared["workdir"])
