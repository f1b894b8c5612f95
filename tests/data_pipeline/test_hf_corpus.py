"""Hugging Face datasets as a corpus and a knowledge base (data.corpus=hf, data.kb_hf_path)."""

import json

import pytest

from data_pipeline import corpus
from data_pipeline import knowledge_world
from data_pipeline import prepare
from data_pipeline import prepared as prepared_lib
from data_pipeline import references as references_lib
from m3jax.core import config as config_lib
from m3jax.core import workspace

datasets = pytest.importorskip("datasets")

VOCAB = 512
TINY = [f"model.vocab_size={VOCAB}", f"data.vocab_size={VOCAB}", "data.eval_fraction=0.1",
        "data.shard_docs=40"]


def _cfg(repo_root, *overrides):
  return config_lib.load_config(str(repo_root / "configs" / "tiny.py"), TINY + list(overrides))


@pytest.fixture(scope="module")
def world():
  return knowledge_world.generate(dict(n_seen=15, n_memory_taught=0, n_unseen=5))


def test_save_to_disk_corpus_and_parquet_knowledge_base(repo_root, tmp_path, world):
  train = [d.text for d in world.train_documents]
  kb = [d.text for d in world.kb_documents]
  datasets.DatasetDict(dict(
      train=datasets.Dataset.from_dict(dict(content=train, n=list(range(len(train))))),
      test=datasets.Dataset.from_dict(dict(content=["unused"])))).save_to_disk(
          str(tmp_path / "corpus"))
  datasets.Dataset.from_dict(dict(body=kb)).to_parquet(str(tmp_path / "kb.parquet"))
  cfg = _cfg(repo_root, "data.corpus=hf", f"data.hf_path={tmp_path / 'corpus'}",
             "data.text_field=content", f"data.kb_hf_path={tmp_path / 'kb.parquet'}",
             "data.kb_text_field=body")
  m = prepare.prepare_data(cfg, str(tmp_path / "w"))
  assert m["datasets"]["documents"]["splits"] == {"train": len(train), "kb": len(kb)}
  assert m["corpus"]["train"]["kind"] == "hf"
  assert m["corpus"]["train"]["num_documents"] == len(train)
  assert m["datasets"]["references"]["num_documents"] == len(kb)
  # The documents are the dataset's rows, in order.
  root = workspace.data_root(cfg, str(tmp_path / "w"))
  docs = references_lib.open_documents(dict(
      path=prepared_lib.dataset_path(root, "documents"), split="kb"))
  assert docs.texts([0, len(kb) - 1]) == [kb[0], kb[-1]]
  # A rerun reuses every stage; a changed dataset is refused, naming the stage.
  assert prepare.prepare_data(cfg, str(tmp_path / "w"))["tokenizer"] == m["tokenizer"]
  datasets.Dataset.from_dict(dict(body=kb[:-1])).to_parquet(str(tmp_path / "kb.parquet"))
  with pytest.raises(prepare.StageMismatchError, match="documents"):
    prepare.prepare_data(cfg, str(tmp_path / "w"))


def test_streamed_jsonl_files_are_read_file_by_file(repo_root, tmp_path, world):
  texts = [d.text for d in world.train_documents]
  half = len(texts) // 2
  for name, part in (("a.jsonl", texts[:half]), ("b.jsonl", texts[half:])):
    (tmp_path / name).write_text("".join(json.dumps(dict(text=t)) + "\n" for t in part))
  cfg = _cfg(repo_root, "data.corpus=hf", f"data.hf_path={tmp_path}/*.jsonl",
             "data.hf_streaming=True")
  m = prepare.prepare_data(cfg, str(tmp_path / "w"))
  assert m["corpus"]["train"]["streaming"] and "num_documents" not in m["corpus"]["train"]
  assert m["datasets"]["documents"]["splits"]["train"] == len(texts)
  root = workspace.data_root(cfg, str(tmp_path / "w"))
  docs = references_lib.open_documents(dict(
      path=prepared_lib.dataset_path(root, "documents"), split="train"))
  assert sorted(docs.texts(range(len(texts)))) == sorted(texts)


def test_missing_text_field_and_bad_paths_are_named(repo_root, tmp_path):
  datasets.Dataset.from_dict(dict(body=["a b c"])).save_to_disk(str(tmp_path / "d"))
  cfg = _cfg(repo_root, "data.corpus=hf", f"data.hf_path={tmp_path / 'd'}")
  with pytest.raises(corpus.CorpusError, match="no text field 'text'.*body"):
    prepare.prepare_data(cfg, str(tmp_path / "w"))
  (tmp_path / "plain").mkdir()
  cfg = _cfg(repo_root, "data.corpus=hf", f"data.hf_path={tmp_path / 'plain'}")
  with pytest.raises(corpus.CorpusError, match="not a `save_to_disk` directory"):
    prepare.prepare_data(cfg, str(tmp_path / "w2"))
  with pytest.raises(config_lib.ConfigError, match="data.hf_path"):
    prepare.prepare_data(_cfg(repo_root, "data.corpus=hf"), str(tmp_path / "w3"))
