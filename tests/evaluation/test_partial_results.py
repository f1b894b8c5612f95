"""`m3jax eval` keeps every finished task and mode on disk, whatever fails later."""

import json
import os
import types

import pytest

from m3jax.evaluation import runner
from m3jax.memory import bank_format


def fake_inference():
  return types.SimpleNamespace(retriever=None, paths={"checkpoint": "ck"}, step=7)


def scripted_run_task(fail_at: tuple[str, str] | None, exc: Exception):
  calls = []

  def run_task(model, task, data, mode, **kwargs):
    calls.append((task, mode))
    if (task, mode) == fail_at:
      raise exc
    return {"acc": 0.5, "n": len(data)}
  return run_task, calls


def test_each_result_is_written_as_it_finishes(tmp_path, monkeypatch):
  out = str(tmp_path / "r.json")
  seen = []
  fake, _ = scripted_run_task(None, RuntimeError())
  monkeypatch.setattr(runner, "run_task", fake)
  real_write = runner.write_report
  monkeypatch.setattr(runner, "write_report",
                      lambda p, r: (seen.append(json.loads(json.dumps(r))), real_write(p, r)))
  report = runner.evaluate_checkpoint(fake_inference(), {"perplexity": [1, 2], "kw_qa": [1]},
                                      ["none", "rag"], threshold=None, log=lambda s: None,
                                      output=out)
  assert [sum(len(v) for v in r["results"].values()) for r in seen] == [1, 2, 3, 4, 4]
  assert [r["complete"] for r in seen] == [False] * 4 + [True]
  assert json.load(open(out)) == json.loads(json.dumps(report))


def test_a_failed_mode_is_named_and_earlier_results_stay(tmp_path, monkeypatch):
  out = str(tmp_path / "r.json")
  corrupt = bank_format.CorruptShardError("shards/shard-000001.npy: sha256 mismatch")
  fake, calls = scripted_run_task(("kw_qa", "explicit"), corrupt)
  monkeypatch.setattr(runner, "run_task", fake)
  with pytest.raises(runner.TaskModeError) as e:
    runner.evaluate_checkpoint(fake_inference(), {"perplexity": [1], "kw_qa": [1]},
                               ["none", "explicit"], threshold=None, log=lambda s: None,
                               output=out)
  assert str(e.value).startswith("kw_qa / explicit failed: shards/shard-000001.npy")
  assert out in str(e.value)
  saved = json.load(open(out))
  assert saved["complete"] is False
  assert set(saved["results"]["perplexity"]) == {"none", "explicit"}
  assert set(saved["results"]["kw_qa"]) == {"none"}
  assert saved["failed"]["task"] == "kw_qa" and saved["failed"]["mode"] == "explicit"
  assert calls[-1] == ("kw_qa", "explicit")


def test_a_bug_keeps_its_type_with_a_note(tmp_path, monkeypatch):
  out = str(tmp_path / "r.json")
  fake, _ = scripted_run_task(("perplexity", "rag"), ZeroDivisionError("bug"))
  monkeypatch.setattr(runner, "run_task", fake)
  with pytest.raises(ZeroDivisionError) as e:
    runner.evaluate_checkpoint(fake_inference(), {"perplexity": [1]}, ["none", "rag"],
                               threshold=None, log=lambda s: None, output=out)
  assert any("perplexity / rag" in n for n in e.value.__notes__)
  assert set(json.load(open(out))["results"]["perplexity"]) == {"none"}


def test_output_is_checked_before_computing(tmp_path):
  runner.check_output(str(tmp_path / "new" / "r.json"))
  with pytest.raises(runner.InputError, match="is a directory"):
    runner.check_output(str(tmp_path))
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(runner.InputError, match="--output="):
    runner.check_output(str(blocker / "r.json"))
  assert not os.path.exists(tmp_path / "new" / "r.json")


def test_each_task_and_mode_reports_progress(monkeypatch):
  def run_task(model, task, data, mode, on_scored, **kwargs):
    for _ in data:
      on_scored(1)
    return {"acc": 1.0}
  monkeypatch.setattr(runner, "run_task", run_task)
  lines = []
  mc = [types.SimpleNamespace(choices=("a", "b")), types.SimpleNamespace(choices=("c", "d"))]
  runner.run_all(fake_inference(), {"kw_mc": mc, "kw_qa": [1, 2, 3]}, ["none"],
                 log=lines.append, progress_every_s=1e9)
  assert lines[0] == "eval: kw_mc / none"
  assert lines[1].startswith("eval: kw_mc / none: 2/4 seqs (50.0%) |")  # 2 items x 2 choices
  assert lines[3].startswith("eval: kw_qa / none: 3/3 seqs (100.0%) |") and "ETA 0s" in lines[3]
