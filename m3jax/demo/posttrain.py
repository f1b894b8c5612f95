"""Post-training on the demo's knowledge world: SFT and DPO with explicit memory.

    run_posttrain(cfg, workdir) -> summary (also <workdir>/posttrain/summary.json)

Starts from a finished `m3jax demo` workdir (its continual checkpoint, data root and
index; the tokenizer must have the chat role tokens, `data.chat_tokens=True`):

  files      data_pipeline.knowledge_chat     <workdir>/posttrain/files/*.jsonl
  data       m3jax.training.chat_data         <data>/chat, <data>/preferences
  sft        train.stage=sft from continual    <workdir>/posttrain/sft
  dpo        train.stage=dpo from sft          <workdir>/posttrain/dpo
  eval       chat exact match per entity group, explicit memory vs none (the same
             checkpoint with the sink prefix and every memory masked), for the
             continual, SFT and DPO models; held-out preference pairs about unseen
             people before and after DPO (m3jax.evaluation.preferences)

Memories are encoded on the fly with each evaluated model's own parameters (a bank
encoded by the continual model does not match the post-trained weights).
Training resumes by itself and prepare-chat reuses its datasets, so a re-run
continues; the evaluations run again.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Callable

import ml_collections

from data_pipeline import chat as chat_lib
from data_pipeline import knowledge_chat
from data_pipeline import knowledge_world
from m3jax.core import artifacts
from m3jax.core import config as config_lib
from m3jax.core import workspace
from m3jax.demo import pipeline
from m3jax.evaluation import chat_qa
from m3jax.evaluation import preferences
from m3jax.inference import generate as gen_lib
from m3jax.inference import session as inference
from m3jax.model import params_io
from m3jax.training import chat_data
from m3jax.training import loop as train_lib

SUMMARY_FILE = "summary.json"
MODES = ("explicit", "none")

# `demo.posttrain` defaults (configs/demo.py overrides them).
DEFAULTS = dict(
    sft=dict(steps=300, lr=1e-3, warmup_steps=10, schedule="cosine", weight_decay=0.1,
             eval_every=100, checkpoint_every=100),
    dpo=dict(steps=100, lr=1e-4, warmup_steps=10, schedule="cosine", weight_decay=0.1,
             dpo_beta=0.1, eval_every=50, checkpoint_every=50),
    eval_per_group=160,  # chat questions per entity group
    eval_max_new_tokens=24,
    eval_batch_size=32,
)


def posttrain_settings(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  out = copy.deepcopy(DEFAULTS)
  raw = cfg.demo.posttrain.to_dict() if "demo" in cfg and "posttrain" in cfg.demo else {}
  for k, v in raw.items():
    if k not in out:
      raise pipeline.DemoError(f"config field `demo.posttrain.{k}`: unknown field "
                               f"(known: {sorted(out)})")
    out[k] = {**out[k], **dict(v)} if isinstance(out[k], dict) else v
  return out


def stage_config(base: ml_collections.ConfigDict, stage: str, init_from: str,
                 settings: dict[str, Any]) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict(json.loads(base.to_json_best_effort()))
  out.train.stage = stage
  out.train.init_from = init_from
  for k, v in settings.items():
    if k not in out.train:
      raise pipeline.DemoError(f"config field `demo.posttrain.{stage}.{k}`: not a train.* field")
    out.train[k] = type(out.train[k])(v) if isinstance(out.train[k], float) else v
  return config_lib.validate(out)


def _chat_accuracy(checkpoint: str, root: str, rows: list[dict[str, Any]], s: dict[str, Any],
                   threshold: float, log: Callable[[str], None]) -> dict[str, Any]:
  out = {}
  inf = inference.open_inference(checkpoint, modes=["explicit"], data_dir=root,
                                 log=lambda m: None)
  inf.retriever = inf.retriever.with_threshold(threshold)
  template = chat_lib.ChatTemplate(inf.tokenizer)
  gen = gen_lib.Generator(inf.config, inf.params)
  for mode in MODES:
    t0 = time.perf_counter()
    textgen = gen_lib.TextGenerator(
        gen, inf.tokenizer, mode, template=template,
        retrieval=inference.memory_retrieval(inf) if mode == "explicit" else None)
    out[mode] = chat_qa.chat_exact_match(textgen, rows,
                                         max_new_tokens=int(s["eval_max_new_tokens"]),
                                         batch_size=int(s["eval_batch_size"]))
    em = out[mode]["exact_match"]
    log(f"posttrain: {os.path.basename(checkpoint)} {mode}: exact match " +
        " ".join(f"{g} {v:.1%}" for g, v in em.items()) +
        f" ({time.perf_counter() - t0:.0f}s)")
  return out


def _eval_rows(path: str, per_group: int) -> list[dict[str, Any]]:
  rows, seen = [], {}
  for r in chat_qa.read_chat_eval(path):
    g = r.get("group", "")
    if seen.get(g, 0) < per_group:
      seen[g] = seen.get(g, 0) + 1
      rows.append(r)
  return rows


def run_posttrain(cfg: ml_collections.ConfigDict, workdir: str, *,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
  """SFT then DPO from the demo's continual checkpoint, with the evaluation around them."""
  t_start = time.perf_counter()
  workdir = os.path.abspath(workdir)
  s = posttrain_settings(cfg)
  cont_dir = os.path.join(workdir, "continual")
  if not os.path.isdir(workspace.checkpoint_dir(cont_dir)):
    raise pipeline.DemoError(f"{cont_dir}: no continual checkpoint; run `m3jax demo "
                             f"--workdir={workdir}` first")
  base = pipeline.stage_config(cfg, workdir, "continual")
  root = workspace.data_root(base, workdir)
  out_dir = os.path.join(workdir, "posttrain")
  files = os.path.join(out_dir, "files")
  world = knowledge_world.generate(base.data.knowledge_world)
  counts = knowledge_chat.write_chat_files(world, files)
  base.data.chat_files = (os.path.join(files, "sft.jsonl"),)
  base.data.preference_files = (os.path.join(files, "dpo.jsonl"),)
  prepared = chat_data.prepare_chat(base, workdir, use_memory=True)
  log("posttrain: data " + json.dumps({k: v["info"]["sequences"] for k, v in prepared.items()}))

  sft_dir, dpo_dir = os.path.join(out_dir, "sft"), os.path.join(out_dir, "dpo")
  sft_cfg = stage_config(base, "sft", cont_dir, s["sft"])
  dpo_cfg = stage_config(base, "dpo", sft_dir, s["dpo"])
  t0 = time.perf_counter()
  sft_last = train_lib.train(sft_cfg, sft_dir)
  sft_seconds = time.perf_counter() - t0
  t0 = time.perf_counter()
  dpo_last = train_lib.train(dpo_cfg, dpo_dir)
  dpo_seconds = time.perf_counter() - t0

  threshold = float(base.data.eval_overlap_threshold)
  rows = _eval_rows(os.path.join(files, "eval.jsonl"), int(s["eval_per_group"]))
  accuracy = {name: _chat_accuracy(path, root, rows, s, threshold, log)
              for name, path in (("continual", cont_dir), ("sft", sft_dir), ("dpo", dpo_dir))}
  pairs = chat_lib.read_preferences([os.path.join(files, "dpo_eval.jsonl")])
  _, sft_params, _ = params_io.load_for_inference(sft_dir)
  _, dpo_params, _ = params_io.load_for_inference(dpo_dir)
  beta = float(dpo_cfg.train.dpo_beta)
  prefs = dict(
      before=preferences.score_pairs(base, root, sft_params, pairs, beta=beta),
      after=preferences.score_pairs(base, root, dpo_params, pairs, ref_params=sft_params,
                                    beta=beta))
  summary = dict(files=counts, data={k: v["info"] for k, v in prepared.items()},
                 settings=s, leakage_filter_threshold=threshold,
                 eval_questions={g: sum(r.get("group") == g for r in rows)
                                 for g in knowledge_world.GROUPS},
                 training=dict(sft=dict(seconds=sft_seconds, last=sft_last),
                               dpo=dict(seconds=dpo_seconds, last=dpo_last)),
                 accuracy=accuracy, preferences=prefs,
                 total_seconds=time.perf_counter() - t_start)
  artifacts.write_json(os.path.join(out_dir, SUMMARY_FILE), summary)
  log("\n" + format_summary(summary))
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  groups = [g for g in knowledge_world.GROUPS if summary["eval_questions"].get(g)]
  lines = ["chat exact match (" + ", ".join(f"{summary['eval_questions'][g]} {g}"
                                              for g in groups) + " questions)",
           "| model | memory | " + " | ".join(groups) + " |",
           "|---|---|" + "---|" * len(groups)]
  for name, by_mode in summary["accuracy"].items():
    for mode, r in by_mode.items():
      lines.append(f"| {name} | {mode} | " +
                   " | ".join(f"{r['exact_match'][g]:.1%}" for g in groups) + " |")
  b, a = summary["preferences"]["before"], summary["preferences"]["after"]
  lines += ["", f"held-out preference pairs about unseen people ({a['pairs']}), explicit memory:",
            f"  likelihood preference (log p(chosen) > log p(rejected)): SFT "
            f"{b['likelihood_preference']:.1%}, DPO {a['likelihood_preference']:.1%}",
            f"  DPO vs its reference (SFT): reward margin {a['dpo_reward_margin']:.4f}, "
            f"preference accuracy {a['dpo_preference_accuracy']:.1%}"]
  return "\n".join(lines)
