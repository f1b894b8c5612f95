"""Post-training: prepare-chat, SFT and DPO runs (memory on), and exact resume after SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_pipeline import knowledge_chat
from data_pipeline import knowledge_world
from m3jax.core import metrics as metrics_lib
from support import REPO, TINY_WORLD

WORLD = [f"--config.{o}" for o in TINY_WORLD]


def _cfg(**train):
  from m3jax.core.config import load_config
  cfg = load_config(str(REPO / "configs" / "tiny.py"), [*TINY_WORLD, "data.chat_tokens=True"])
  cfg.train.update(log_every=1, eval_every=0, **train)
  return cfg


@pytest.fixture(scope="module")
def chat_workdir(tmp_path_factory):
  """A tiny knowledge world prepared with chat tokens, a 4-step warmup run, an index,
  and the chat / preference datasets (with retrieved references)."""
  from data_pipeline import prepare
  from m3jax.retrieval import reference_index
  from m3jax.training import chat_data
  from m3jax.training import loop
  root = tmp_path_factory.mktemp("chat")
  files = root / "files"
  cfg = _cfg(steps=4, checkpoint_every=4)
  world = knowledge_world.generate(cfg.data.knowledge_world)
  counts = knowledge_chat.write_chat_files(world, str(files))
  base = root / "base"
  prepare.prepare_data(cfg, str(base))
  loop.train(cfg, str(base))  # the warmup run the post-training stages start from
  reference_index.build_reference_index(cfg, str(base))
  cfg.data.chat_files = (str(files / "sft.jsonl"),)
  cfg.data.preference_files = (str(files / "dpo.jsonl"),)
  info = chat_data.prepare_chat(cfg, str(base), use_memory=True)
  return cfg, root, base, counts, info


def _copy(chat_workdir, tmp_path, name):
  _, _, base, _, _ = chat_workdir
  dst = tmp_path / name
  shutil.copytree(base / "data", dst / "data")
  return dst


def test_prepare_chat_counts_and_retrieves_from_the_prompt(chat_workdir):
  from m3jax.training import chat_data
  cfg, _, base, counts, info = chat_workdir
  chat_info = info["chat"]["info"]
  assert chat_info["kept"] == counts["sft.jsonl"] and chat_info["dropped_over_max_rounds"] == 0
  root = str(base / "data")
  src = chat_data.PostTrainSource(chat_data.dataset_dir(root, "chat"), "train")
  rec = src[0]
  assert rec["tokens"].shape == (cfg.model.max_seq_len,)
  assert rec["loss_mask"].sum() > 0
  # Trained targets are assistant text only; most chunks with a question got a reference.
  nb = np.stack([src[i]["neighbors"] for i in range(len(src))])
  assert (nb >= 0).mean() > 0.5
  pairs = chat_data.PostTrainSource(chat_data.dataset_dir(root, "preferences"), "train")
  p = pairs[0]
  assert set(p) >= {"chosen_tokens", "rejected_tokens", "chosen_loss_mask", "neighbors"}


def test_queries_never_contain_reply_tokens(chat_workdir):
  from data_pipeline import chat
  from data_pipeline import prepared
  from m3jax.retrieval.neighbor_table import MiningSettings
  from m3jax.training import chat_data
  cfg, _, base, _, _ = chat_workdir
  tok = prepared.open_tokenizer(str(base / "data"))
  template = chat.ChatTemplate(tok)
  r = chat_data.ChunkRetriever(tok, template, MiningSettings.from_config(cfg))
  msgs = [chat.Message("user", "Where was Alan born?"),
          chat.Message("assistant", "Zanzibarqux is the answer.")]
  (rec,) = list(chat.pack([template.render(msgs)], 64, 0))
  qs = r.queries(rec["tokens"], chat_data._reply_flags(rec))
  assert qs[0] == "Where was Alan born?" and all("Zanzibar" not in q for q in qs)


def _losses(workdir):
  """Train loss per step; a step run again after a resume overrides the first run's."""
  rows = metrics_lib.read_jsonl(str(workdir / "metrics.jsonl"))
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _run_cmd(cfg_flags, workdir):
  return [sys.executable, "-m", "m3jax.commands.train", "--config",
          str(REPO / "configs/tiny.py"), f"--workdir={workdir}", *cfg_flags]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  return env


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_stage_trains_with_memory_and_resumes_bitwise_after_sigkill(chat_workdir, tmp_path,
                                                                    stage):
  _, _, base, _, _ = chat_workdir
  steps = 6
  flags = WORLD + ["--config.data.chat_tokens=True", f"--config.train.stage={stage}",
                   f"--config.train.init_from={base}", f"--config.train.steps={steps}",
                   "--config.train.warmup_steps=1", "--config.train.log_every=1",
                   "--config.train.checkpoint_every=2", f"--config.train.eval_every={steps}",
                   "--config.train.eval_batches=1"]
  ref = _copy(chat_workdir, tmp_path, "ref")
  subprocess.run(_run_cmd(flags, ref), env=_env(), check=True, cwd=REPO, timeout=600,
                 capture_output=True)
  killed = _copy(chat_workdir, tmp_path, "killed")
  proc = subprocess.Popen(_run_cmd(flags, killed), env=_env(), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 900
  while not (killed / "checkpoints" / "2").is_dir():
    assert proc.poll() is None and time.time() < deadline, "run ended before step 2 was saved"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  subprocess.run(_run_cmd(flags, killed), env=_env(), check=True, cwd=REPO, timeout=600,
                 capture_output=True)
  want, got = _losses(ref), _losses(killed)
  assert sorted(want) == list(range(1, steps + 1))
  for s in range(3, steps + 1):
    assert got[s] == want[s], (s, got[s], want[s])
  rows = metrics_lib.read_jsonl(str(ref / "metrics.jsonl"))
  last = {k: v for r in rows for k, v in r.items()}
  if stage == "sft":
    assert 0.0 < last["train/memory_chunk_share"] <= 1.0
    assert np.isfinite(last["eval/sft/loss"])
  else:
    # Step 1 scores with policy == reference: zero margin, loss log 2.
    first = [r for r in rows if r["step"] == 1 and "train/loss" in r][0]
    assert abs(first["train/reward_margin"]) < 1e-6
    assert abs(first["train/loss"] - np.log(2.0)) < 1e-5
    assert "eval/dpo/preference_accuracy" in last


def test_post_training_needs_init_from_and_the_dataset(chat_workdir, tmp_path):
  from m3jax.core.config import ConfigError
  from m3jax.core.errors import InputError
  from m3jax.training import loop
  cfg, _, base, _, _ = chat_workdir
  c = cfg.copy_and_resolve_references()
  c.train.update(stage="sft", steps=1, init_from="")
  with pytest.raises(ConfigError, match="train.init_from"):
    loop.train(c, str(_copy(chat_workdir, tmp_path, "a")))
  c.train.update(init_from=str(base))
  empty = tmp_path / "b"
  shutil.copytree(chat_workdir[2] / "data", empty / "data")
  shutil.rmtree(empty / "data" / "chat")
  with pytest.raises(InputError, match="prepare-chat"):
    loop.train(c, str(empty))


def test_preference_scoring_with_memory_and_a_reference(chat_workdir):
  from data_pipeline import chat
  from m3jax.evaluation import preferences
  from m3jax.model import params_io
  cfg, root, base, _, _ = chat_workdir
  pairs = chat.read_preferences([str(root / "files" / "dpo.jsonl")])[:6]
  _, params, _ = params_io.load_for_inference(str(base))
  got = preferences.score_pairs(cfg, str(base / "data"), params, pairs, ref_params=params)
  assert got["pairs"] == 6 and 0.0 <= got["likelihood_preference"] <= 1.0
  assert got["logp_chosen"] < 0 and got["logp_rejected"] < 0
  assert got["dpo_reward_margin"] == 0.0  # the model is its own reference
  assert abs(got["dpo_loss"] - np.log(2.0)) < 1e-6
