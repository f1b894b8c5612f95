"""`m3jax demo` orchestration on a tiny setting: every stage, summary, plots, reuse."""

import json
import os
import time

import ml_collections
import pytest

from m3jax.demo import pipeline as demo
from m3jax.demo import report
from m3jax.core.config import load_config

# Every test here reads the one tiny demo run (a minute or more): all are end-to-end.
pytestmark = pytest.mark.slow

TINY_DEMO = (
    "data.knowledge_world.n_seen=8", "data.knowledge_world.n_memory_taught=8",
    "data.knowledge_world.n_unseen=6", "data.eval_fraction=0.2",
    "train.log_every=1", "train.eval_every=2", "train.eval_batches=1",
    "train.checkpoint_every=2",
)


def _tiny_demo_config(repo_root):
  cfg = load_config(str(repo_root / "configs" / "tiny.py"), TINY_DEMO)
  cfg.demo = ml_collections.ConfigDict(dict(
      warmup=dict(steps=2, warmup_steps=1),
      continual=dict(steps=2, warmup_steps=1),
      eval_limit=6, eval_batch_size=8, eval_max_new_tokens=4, perplexity_limit=2,
      bench_batch=2, bench_prompt_len=16, bench_new_tokens=8, bench_runs=2))
  return cfg


@pytest.fixture(scope="module")
def first_run(repo_root, tmp_path_factory):
  cfg = _tiny_demo_config(repo_root)
  wd = str(tmp_path_factory.mktemp("demo") / "wd")
  t0 = time.perf_counter()
  summary = demo.run_demo(cfg, wd, log=lambda msg: None)
  return cfg, wd, summary, time.perf_counter() - t0


def test_every_stage_runs_and_summary_is_complete(first_run):
  _, wd, summary, _ = first_run
  assert summary["stage_status"] == {s: "ran" for s in demo.STAGES if s != "summary"}
  with open(os.path.join(wd, demo.SUMMARY_FILE)) as f:
    on_disk = json.load(f)
  for key in ("qa_accuracy", "perplexity", "decode_tokens_per_s", "decode_ratios", "memory",
              "targets", "curves", "stages", "total_seconds", "plots"):
    assert key in on_disk, key
  for task in ("kw_mc", "kw_qa"):
    for mode in report.MODES:
      accs = on_disk["qa_accuracy"][task][mode]
      assert set(accs) == {"all", *report.GROUPS}
      assert all(0.0 <= v <= 1.0 for v in accs.values())
  for mode in report.MODES:
    assert on_disk["perplexity"][mode] > 1.0
    assert on_disk["decode_tokens_per_s"][mode] > 0
  mem = on_disk["memory"]
  assert mem["kv_bytes_per_memory"] == mem["costs_bytes_per_memory"]
  assert mem["bank_bytes"] >= mem["references"] * mem["kv_bytes_per_memory"]
  assert on_disk["targets"]["chance"] == pytest.approx(0.1)
  for stage in ("warmup", "continual", "rag_reader"):
    assert len(on_disk["curves"][stage]["train_loss"]) == 2
  # RAG is read from the reader trained for it; explicit and none from the continual run.
  results = json.load(open(report.eval_results_file(wd)))
  assert results["checkpoints"]["rag"] == os.path.join(wd, "rag_reader")
  assert results["checkpoints"]["explicit"] == results["checkpoints"]["none"] == \
      os.path.join(wd, "continual")
  assert on_disk["rag_reader"] == "trained"
  assert on_disk["train_step_seconds"]["explicit"] > 0 and on_disk["train_step_seconds"]["rag"] > 0
  for plot in report.PLOTS:
    path = os.path.join(wd, plot)
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", plot
  text = report.format_summary(on_disk)
  assert "unseen" in text and "explicit/none" in text


def test_rerun_reuses_every_stage(first_run):
  cfg, wd, summary, first_seconds = first_run
  t0 = time.perf_counter()
  again = demo.run_demo(cfg, wd, log=lambda msg: None)
  seconds = time.perf_counter() - t0
  assert again["stage_status"] == {s: "reused" for s in demo.STAGES if s != "summary"}
  assert again["qa_accuracy"] == summary["qa_accuracy"]
  assert seconds < first_seconds / 3


def test_changed_stage_settings_rerun_that_stage_and_later(first_run, tmp_path):
  cfg, wd, _, _ = first_run
  changed = ml_collections.ConfigDict(cfg.to_dict())
  changed.demo.bench_runs = 3
  again = demo.run_demo(changed, wd, log=lambda msg: None)
  assert again["stage_status"]["bench"] == "ran"
  assert again["stage_status"]["eval"] == "reused"
  assert again["decode_setup"]["runs"] == 3


def test_stage_records_of_earlier_runs_are_reused(tmp_path):
  """A record written before m3jax.core.stages (same JSON keys, hash of the same
  settings + upstream keys) is recognised: the stage is not run again."""
  import hashlib
  import json as json_lib

  def old_key(obj):
    return hashlib.sha256(json_lib.dumps(obj, sort_keys=True, default=str).encode()
                          ).hexdigest()[:16]

  settings = dict(model={"d_model": 64}, data={"eval_tasks": ("kw_mc", "kw_qa")})
  first = dict(name="prepare", key=old_key(dict(settings=settings, upstream={})),
               seconds=1.25, result={"n": 1}, finished="2026-01-01T00:00:00")
  second = dict(name="index", key=old_key(dict(settings=settings,
                                                upstream={"prepare": first["key"]})),
                seconds=2.5, result={"count": 3}, finished="2026-01-01T00:00:01")
  os.makedirs(tmp_path / demo.STAGES_DIR)
  for rec in (first, second):
    with open(tmp_path / demo.STAGES_DIR / f"{rec['name']}.json", "w") as f:
      json_lib.dump(rec, f, indent=2)

  def must_not_run():
    raise AssertionError("a finished stage ran again")

  runner = demo._Stages(str(tmp_path), log=lambda msg: None)
  assert runner.run("prepare", settings, must_not_run, lambda: True)["status"] == "reused"
  rec = runner.run("index", settings, must_not_run, lambda: True)
  assert rec["status"] == "reused" and rec["result"] == {"count": 3}
  ran = runner.run("index", dict(settings, data={}), lambda: {"count": 4}, lambda: True)
  assert ran["status"] == "ran" and ran["result"] == {"count": 4}


def test_unknown_demo_field_is_refused(repo_root):
  cfg = _tiny_demo_config(repo_root)
  cfg.demo.not_a_field = 1
  with pytest.raises(demo.DemoError, match="demo.not_a_field"):
    demo.demo_settings(cfg)


def test_interrupted_training_stops_the_demo(monkeypatch, tmp_path):
  from m3jax.demo import pipeline as demo_lib
  from m3jax.training import loop as train_lib
  from m3jax.core.config import load_config
  from support import REPO
  cfg = load_config(str(REPO / "configs" / "tiny.py"))
  monkeypatch.setattr(train_lib, "train", lambda c, w: None)  # returns without finishing
  with pytest.raises(demo_lib.StageInterrupted, match="rerun the demo"):
    demo_lib._train_stage(cfg, str(tmp_path))
