"""Task files, the --task flag and the prepared data's held-out items."""

import json

import pytest

from data_pipeline import prepared
from m3jax.core import workspace
from m3jax.evaluation import tasks


def _write(path, rows):
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return str(path)


def test_jsonl_loaders(tmp_path):
  hs = _write(tmp_path / "hs.jsonl", [
      {"ctx": "A man [title] sits.", "endings": ["e0", "e1", "e2", "e3"], "label": "2"}])
  (item,) = tasks.load_mc_jsonl("hellaswag", hs)
  assert item.context == "A man. sits." and item.choices == (" e0", " e1", " e2", " e3")
  assert item.gold == 2
  arc = _write(tmp_path / "arc.jsonl", [
      {"question": "Why?", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
       "answerKey": "B"}])
  (item,) = tasks.load_mc_jsonl("arc", arc)
  assert item.context == "Question: Why?\nAnswer:" and item.gold == 1
  assert item.choices == (" x", " y")
  bq = _write(tmp_path / "bq.jsonl", [
      {"passage": "P.", "question": "is it", "answer": True},
      {"passage": "P.", "question": "is it not", "answer": "false"}])
  items = tasks.load_mc_jsonl("boolq", bq)
  assert [i.gold for i in items] == [1, 0] and items[0].choices == (" no", " yes")
  assert items[0].context == "P.\nQuestion: Is it?\nAnswer:"


def test_jsonl_loader_errors_name_file_line_and_field(tmp_path):
  bad = _write(tmp_path / "arc.jsonl", [{"question": "Why?", "choices": {"text": ["x"],
                                                                        "label": ["A"]}}])
  with pytest.raises(ValueError, match=r"arc.jsonl:1: missing field `answerKey`"):
    tasks.load_mc_jsonl("arc", bad)
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    tasks.load_mc_jsonl("arc", str(tmp_path / "nope.jsonl"))


def test_parse_tasks_flag():
  assert tasks.parse_tasks(["perplexity", "arc=/d/arc.jsonl"]) == {"perplexity": None,
                                                                  "arc": "/d/arc.jsonl"}
  with pytest.raises(ValueError, match="unknown task 'mmlu'"):
    tasks.parse_tasks(["mmlu"])
  with pytest.raises(ValueError, match="boolq needs a JSONL file"):
    tasks.parse_tasks(["boolq"])
  with pytest.raises(ValueError, match="kw_qa takes no file"):
    tasks.parse_tasks(["kw_qa=x"])


def test_heldout_sequences_drop_padding(tiny_prepared):
  cfg, workdir = tiny_prepared
  root = workspace.data_root(cfg, str(workdir))
  pad = prepared.open_tokenizer(root).pad_id
  seqs = tasks.load_heldout_sequences(root)
  assert seqs and all(pad not in s.tolist() for s in seqs)
  # The split's last sequence is padded at the end: its text is kept, the padding is not.
  assert len(seqs[-1]) <= cfg.model.max_seq_len + 1
  assert sum(len(s) for s in seqs) < len(seqs) * (cfg.model.max_seq_len + 1)


def test_load_tasks_gives_each_task_its_items(tiny_prepared):
  cfg, workdir = tiny_prepared
  root = workspace.data_root(cfg, str(workdir))
  data = tasks.load_tasks({"kw_qa": None, "kw_mc": None, "kw_coverage": None,
                           "perplexity": None}, root, limit=3)
  qa, mc = tasks.load_knowledge_qa(root, 3)
  assert data["kw_qa"] == qa and data["kw_coverage"] == qa and data["kw_mc"] == mc
  want = tasks.load_heldout_sequences(root, 3)
  assert [s.tolist() for s in data["perplexity"]] == [s.tolist() for s in want]
