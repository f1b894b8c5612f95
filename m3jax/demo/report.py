"""The demo's evidence: summary.json (every figure in one dict), its printed table, the plots.

`m3jax.demo.pipeline` runs the stages; this module reads what they left in the demo
workdir (eval/results.json, bench_decode.json, each training stage's metrics.jsonl,
the stage records) and turns it into the summary, the table `format_summary` prints
and the two PNG plots.
"""

from __future__ import annotations

import math
import os
from typing import Any

import ml_collections
import numpy as np

from m3jax.core import artifacts
from m3jax.core import metrics as metrics_lib
from m3jax.core.config import model_config
from m3jax.model import costs

MODES = ("none", "explicit", "rag")
GROUPS = ("seen", "memory_taught", "unseen")
PLOTS = ("loss_curves.png", "qa_accuracy.png")
EVAL_RESULTS = os.path.join("eval", "results.json")  # in the demo workdir
BENCH_FILE = "bench_decode.json"


def eval_results_file(workdir: str) -> str:
  """`<demo workdir>/eval/results.json`: what the eval stage measured."""
  return os.path.join(workdir, EVAL_RESULTS)


def bench_file(workdir: str) -> str:
  """`<demo workdir>/bench_decode.json`: the decoding benchmark."""
  return os.path.join(workdir, BENCH_FILE)


def _get(d: Any, *keys: str) -> Any:
  for k in keys:
    if not isinstance(d, dict) or k not in d:
      return None
    d = d[k]
  return d


def build_summary(cfg: ml_collections.ConfigDict, workdir: str,
                  records: dict[str, dict[str, Any]], s: dict[str, Any]) -> dict[str, Any]:
  """Every figure of the demo in one dict (what summary.json holds).

  `records`: the stage records (`m3jax.core.stages.StageRunner.records`); `s`: the
  demo settings (`pipeline.demo_settings`).
  """
  mc = model_config(cfg)
  ev = artifacts.read_json(eval_results_file(workdir))
  bench = artifacts.read_json(bench_file(workdir))
  res = ev["results"]
  n_choices = int(ev.get("choices") or 0)
  chance = 1.0 / n_choices if n_choices else None
  qa: dict[str, Any] = {}
  for task, metric in (("kw_mc", "acc"), ("kw_qa", "exact_match")):
    if task not in res:
      continue
    qa[task] = {}
    for mode in list(MODES) + sorted(set(res[task]) - set(MODES)):
      v = _get(res, task, mode, metric)
      if isinstance(v, dict):
        qa[task][mode] = {g: v.get(g) for g in ("all",) + GROUPS}
      else:
        qa[task][mode] = {"all": v}
  perplexity = {m: _get(res, "perplexity", m, "perplexity")
                for m in list(MODES) + sorted(set(res.get("perplexity", {})) - set(MODES))}
  coverage = {k: v["all"] for k, v in (_get(res, "kw_coverage", "explicit") or {}).items()
              if isinstance(v, dict)}
  tps = {m: _get(bench, "modes", m, "tokens_per_s") for m in MODES}
  bank = records["encode"]["result"]
  curves = {}
  trained = [st for st in ("warmup", "continual", "rag_reader") if st in records]
  for stage in trained:
    by_step: dict[int, dict[str, Any]] = {}
    for r in metrics_lib.read_jsonl(os.path.join(workdir, stage)):  # train and eval records
      by_step.setdefault(r["step"], {}).update(r)
    recs = [by_step[k] for k in sorted(by_step)]
    curves[stage] = {
        "step": [r["step"] for r in recs if "train/loss" in r],
        "train_loss": [r["train/loss"] for r in recs if "train/loss" in r],
        "eval_steps": [r["step"] for r in recs if "eval/no_memory/loss" in r],
        "eval_no_memory_loss": [r["eval/no_memory/loss"] for r in recs
                                if "eval/no_memory/loss" in r],
        "eval_memory_loss": [r.get("eval/memory/loss") for r in recs
                             if "eval/no_memory/loss" in r],
    }
  target = s["targets"]
  mc_acc = qa.get("kw_mc", {})
  unseen_explicit = _get(mc_acc, "explicit", "unseen")
  unseen_none = _get(mc_acc, "none", "unseen")
  unseen_rag = _get(mc_acc, "rag", "unseen")
  rag_trained = ev.get("rag_reader") == "trained"
  verdict = dict(
      chance=chance,
      explicit_unseen_acc=unseen_explicit,
      explicit_unseen_target=target["explicit_unseen_mc"],
      explicit_unseen_met=(unseen_explicit is not None
                           and unseen_explicit >= target["explicit_unseen_mc"]),
      explicit_unseen_shortfall=(None if unseen_explicit is None else
                                 max(0.0, target["explicit_unseen_mc"] - unseen_explicit)),
      none_unseen_acc=unseen_none,
      none_unseen_limit=None if chance is None else chance + target["none_unseen_margin"],
      none_unseen_met=(unseen_none is not None and chance is not None
                       and unseen_none <= chance + target["none_unseen_margin"]),
      rag_unseen_acc=unseen_rag, rag_reader_trained=rag_trained,
      rag_margin=target["rag_margin"],
      explicit_vs_rag_met=(unseen_explicit is not None and unseen_rag is not None
                           and unseen_explicit >= unseen_rag - target["rag_margin"]),
  )
  step_seconds = {}
  for mode, stage in (("explicit", "continual"), ("rag", "rag_reader")):
    if stage in records:
      step_seconds[mode] = records[stage]["result"]["last"].get("train/step_time_s")
  return dict(
      config=cfg.get("name", ""), workdir=workdir,
      model=dict(params=costs.param_counts(mc).total,
                 non_embedding_params=costs.param_counts(mc).non_embedding,
                 d_model=mc.d_model, n_layers=mc.n_layers,
                 memory_layers=list(mc.memory_layers), memory_shape=list(mc.memory_shape),
                 max_seq_len=mc.max_seq_len),
      stages={k: dict(status=r["status"], seconds=r["seconds"]) for k, r in
              records.items()},
      qa_accuracy=qa, qa_items=ev.get("items_per_group"), qa_choices=n_choices,
      perplexity=perplexity, memory_coverage=coverage,
      training={st: records[st]["result"]["last"] for st in trained},
      train_step_seconds=step_seconds, rag_reader="trained" if rag_trained else "untrained",
      rag_references=ev.get("rag_references"),
      neighbors=records["neighbors"]["result"],
      decode_tokens_per_s=tps,
      decode_ratios=dict(explicit_over_none=bench.get("explicit_over_none"),
                         explicit_over_rag=bench.get("explicit_over_rag")),
      decode_setup={k: bench.get(k) for k in ("batch", "prompt_len", "new_tokens", "runs",
                                              "device")},
      memory=dict(bytes_per_memory=bank.get("record_bytes"),
                  kv_bytes_per_memory=bank.get("kv_bytes_per_memory"),
                  costs_bytes_per_memory=costs.memory_bytes_per_reference(mc),
                  dense_kv_bytes_per_reference=costs.dense_kv_bytes_per_reference(mc),
                  bank_bytes=bank.get("bank_bytes"), references=bank.get("references"),
                  quantization=bank.get("quantization")),
      targets=verdict, curves=curves, eval_results=eval_results_file(workdir),
  )


def _pct(v: Any) -> str:
  return "-" if v is None else f"{100 * v:5.1f}%"


def format_summary(sm: dict[str, Any]) -> str:
  """The evidence table printed at the end of the demo."""
  lines = ["=" * 72, f"Memory³ demo ({sm['config']}) — evidence", "=" * 72, "", "stages:"]
  for k, r in sm["stages"].items():
    lines.append(f"  {k:<10} {r['status']:<7} {r['seconds']:8.1f}s")
  lines += ["", "modes: none = the same checkpoint with its <s>Reference: sink prefix and every "
            "memory masked;", "  rag = " + ("a reader trained for it (same warmup checkpoint, "
            "data and steps, references as text)" if sm.get("rag_reader") == "trained" else
            "the explicit-memory checkpoint reading references as text (never trained to)") + ";",
            "  held-out perplexity retrieves chunk c's memories (RAG: "
            "references) with the text before chunk c"]
  for task, title in (("kw_mc", "knowledge QA, multiple choice (acc)"),
                      ("kw_qa", "knowledge QA, greedy answer (exact match)")):
    acc = sm["qa_accuracy"].get(task)
    if not acc:
      continue
    lines += ["", f"{title}; items per group {sm['qa_items']}"
              + (f"; chance {_pct(sm['targets']['chance'])}" if task == "kw_mc" else "")]
    cols = list(MODES) + [m for m in acc if m not in MODES]  # then labelled extras
    lines.append(f"  {'entities':<15}" + "".join(f"{m:>12}" for m in cols))
    for g in GROUPS + ("all",):
      lines.append(f"  {g:<15}" + "".join(f"{_pct(acc.get(m, {}).get(g)):>12}" for m in cols))
  steps = sm.get("train_step_seconds") or {}
  if steps.get("explicit") and steps.get("rag"):
    lines.append(f"\ntraining step (continual stage, same sequences): explicit memory "
                 f"{steps['explicit']:.3f} s, RAG reader {steps['rag']:.3f} s "
                 f"({steps['rag'] / steps['explicit']:.2f}x)")
  ppl = sm["perplexity"]
  lines += ["", "held-out perplexity: " + "  ".join(
      f"{m} {'-' if ppl.get(m) is None else f'{ppl[m]:.2f}'}" for m in ppl)]
  tps, rat = sm["decode_tokens_per_s"], sm["decode_ratios"]
  ds = sm["decode_setup"]
  lines.append(f"decoding tokens/s (batch {ds['batch']}, {ds['prompt_len']} in / "
               f"{ds['new_tokens']} out, {ds['device']}): " + "  ".join(
                   f"{m} {'-' if tps.get(m) is None else f'{tps[m]:.0f}'}" for m in MODES))
  if rat.get("explicit_over_none") is not None:
    lines.append(f"  explicit/none {rat['explicit_over_none']:.2f}x (paper 0.65x), "
                 f"explicit/rag {rat['explicit_over_rag']:.2f}x (paper 1.46x)")
  mem = sm["memory"]
  lines.append(f"memory: {mem['bytes_per_memory']:,} B per memory on disk "
               f"({mem['kv_bytes_per_memory']:,} B keys/values = m3jax.model.costs "
               f"{mem['costs_bytes_per_memory']:,} B; dense KV of a reference "
               f"{mem['dense_kv_bytes_per_reference']:,} B); bank {mem['references']:,} "
               f"memories, {mem['bank_bytes']:,} B")
  cov = sm.get("memory_coverage") or {}
  if cov:
    layers = [k for k in cov if k.startswith("answer_kept_l")]
    lines.append(f"answer in a retrieved reference: {_pct(cov['answer_retrieved']).strip()}; "
                 "its first token kept in the memory: " + ", ".join(
                     f"layer {k[len('answer_kept_l'):]} {_pct(cov[k]).strip()}" for k in layers)
                 + f", any layer {_pct(cov['answer_kept_any']).strip()}")
  t = sm["targets"]
  lines += ["", "targets:"]
  lines.append(f"  unseen entities, explicit memory: {_pct(t['explicit_unseen_acc'])} "
               f"(target >= {_pct(t['explicit_unseen_target'])}): "
               + ("MET" if t["explicit_unseen_met"] else
                  f"MISSED by {_pct(t['explicit_unseen_shortfall'])}"))
  lines.append(f"  unseen entities, no memory: {_pct(t['none_unseen_acc'])} "
               f"(limit chance + 5 = {_pct(t['none_unseen_limit'])}): "
               + ("MET" if t["none_unseen_met"] else "MISSED"))
  if t.get("rag_unseen_acc") is not None:
    lines.append(f"  unseen entities, explicit vs {'trained ' if t['rag_reader_trained'] else ''}"
                 f"RAG: {_pct(t['explicit_unseen_acc'])} vs {_pct(t['rag_unseen_acc'])} "
                 f"(explicit >= RAG - {100 * t['rag_margin']:.0f} points): "
                 + ("MET" if t["explicit_vs_rag_met"] else "MISSED"))
  if "total_seconds" in sm:
    lines.append(f"\ntotal wall time: {sm['total_seconds']:.1f}s")
  return "\n".join(lines)


def write_plots(workdir: str, sm: dict[str, Any]) -> None:
  """loss_curves.png (both stages) and qa_accuracy.png (mode x entity group)."""
  import matplotlib  # heavy, and sets a global backend: only the summary stage plots
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # after choosing the backend

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, stage in zip(axes, ("warmup", "continual")):
    c = sm["curves"][stage]
    ax.plot(c["step"], c["train_loss"], label="train loss")
    if c["eval_steps"]:
      ax.plot(c["eval_steps"], c["eval_no_memory_loss"], "o-",
              label="held-out, no memory" + (" (sink kept)" if stage == "continual" else ""))
      mem = [np.nan if v is None else v for v in c["eval_memory_loss"]]
      if not all(math.isnan(v) for v in mem):
        ax.plot(c["eval_steps"], mem, "s-", label="held-out, memory of preceding chunks")
    if stage == "continual" and "rag_reader" in sm["curves"]:
      r = sm["curves"]["rag_reader"]
      ax.plot(r["step"], r["train_loss"], alpha=0.7, label="RAG reader, train loss")
    ax.set_title(f"{stage} stage")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, PLOTS[0]), dpi=100)
  plt.close(fig)

  tasks = [t for t in ("kw_mc", "kw_qa") if t in sm["qa_accuracy"]]
  fig, axes = plt.subplots(1, max(len(tasks), 1), figsize=(6 * max(len(tasks), 1), 4),
                           squeeze=False)
  width = 0.8 / len(MODES)
  for ax, task in zip(axes[0], tasks):
    acc = sm["qa_accuracy"][task]
    x = np.arange(len(GROUPS))
    for i, m in enumerate(MODES):
      vals = [acc.get(m, {}).get(g) for g in GROUPS]
      ax.bar(x + (i - 1) * width, [0 if v is None else 100 * v for v in vals], width, label=m)
    if task == "kw_mc" and sm["targets"]["chance"]:
      ax.axhline(100 * sm["targets"]["chance"], color="gray", ls="--", label="chance")
    ax.set_xticks(x, GROUPS)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("multiple choice" if task == "kw_mc" else "exact match")
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, PLOTS[1]), dpi=100)
  plt.close(fig)
