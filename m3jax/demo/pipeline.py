"""`m3jax demo`: the whole Memory³ pipeline on the knowledge world, with its evidence.

    run_demo(cfg, workdir) -> summary dict (also <workdir>/summary.json + PNG plots)

Stages (each timed; each skipped when its record in `<workdir>/stages/` matches the
settings it would run with and its output is there; the library functions below
resume by themselves too):

  prepare    data_pipeline.prepare.prepare_data        <workdir>/data
  warmup     m3jax.training.loop.train (stage warmup)          <workdir>/warmup
  index      m3jax.retrieval.reference_index.build_reference_index        <workdir>/data/index
  neighbors  m3jax.retrieval.neighbors.mine_workdir       <workdir>/data/neighbors/{train,validation}
  continual  m3jax.training.loop.train (stage continual, init_from = the warmup workdir)
                                                       <workdir>/continual
  encode     m3jax.memory.encode_job.run                      <workdir>/bank
  eval       m3jax.evaluation.runner (kw_mc, kw_qa, perplexity in modes none/explicit/rag)
                                                       <workdir>/eval/results.json
  bench      m3jax.bench.decode.run (tokens/s of none/explicit/rag decoding)
                                                       <workdir>/bench_decode.json
  summary    summary.json, loss_curves.png, qa_accuracy.png

The config's `demo` section sets what differs between the two training stages
(`demo.warmup`, `demo.continual`: train.* fields) and the size of the eval and
decode benchmark; a config without it gets DEFAULTS.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from typing import Any, Callable

import ml_collections
import numpy as np
from data_pipeline import prepare as prepare_lib
from m3jax.bench import decode as bench_decode
from m3jax.core import config as config_lib
from m3jax.core import metrics as metrics_lib
from m3jax.core import workspace
from m3jax.core.config import model_config
from m3jax.evaluation import runner as eval_runner
from m3jax.evaluation import tasks as eval_tasks
from m3jax.inference import session as inference
from m3jax.memory import bank_format
from m3jax.memory import encode_job
from m3jax.memory.bank_storage import storage_summary
from m3jax.model import costs
from m3jax.retrieval import neighbor_table
from m3jax.retrieval import neighbors as nb_lib
from m3jax.retrieval import reference_index
from m3jax.training import checkpoint as ckpt_lib
from m3jax.training import loop as train_lib

STAGES = ("prepare", "warmup", "index", "neighbors", "continual", "encode", "eval", "bench",
          "summary")
MODES = ("none", "explicit", "rag")
GROUPS = ("seen", "memory_taught", "unseen")
STAGES_DIR = "stages"
SUMMARY_FILE = "summary.json"
PLOTS = ("loss_curves.png", "qa_accuracy.png")

# `demo` section defaults (configs/demo.py overrides them).
DEFAULTS = dict(
    warmup=dict(stage="warmup", use_memory=False),
    continual=dict(stage="continual", use_memory=True),
    eval_limit=0,  # knowledge-world questions per task (equal share per group); 0 = all
    eval_batch_size=32,
    eval_max_new_tokens=12,
    eval_tasks=("kw_mc", "kw_qa", "perplexity", "kw_coverage"),
    perplexity_limit=0,  # held-out sequences; 0 = all
    bench_batch=8,
    bench_prompt_len=128,
    bench_new_tokens=64,
    bench_runs=3,
    targets=dict(explicit_unseen_mc=0.60, none_unseen_margin=0.05),
)


class DemoError(RuntimeError):
  """A stage cannot run or its finished output does not match the config."""


def _say(msg: str) -> None:
  print(f"demo: {msg}", flush=True)


def demo_settings(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """The `demo` section merged over DEFAULTS (a plain dict)."""
  out = copy.deepcopy(DEFAULTS)
  raw = cfg.demo.to_dict() if "demo" in cfg else {}
  unknown = sorted(set(raw) - set(out))
  if unknown:
    raise DemoError(f"config field `demo.{unknown[0]}`: unknown field (known: {sorted(out)})")
  for k, v in raw.items():
    if isinstance(out[k], dict):
      out[k] = {**out[k], **dict(v)}
    else:
      out[k] = v
  return out


def _hash(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cfg_dict(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(cfg.to_json_best_effort(sort_keys=True))


def stage_config(cfg: ml_collections.ConfigDict, workdir: str, stage: str
                 ) -> ml_collections.ConfigDict:
  """The config a training stage runs with: `demo.<stage>` over `train`, shared data dir."""
  s = demo_settings(cfg)
  out = ml_collections.ConfigDict(_cfg_dict(cfg))
  if "demo" in out:
    del out["demo"]
  out.data.workdir_data = data_dir(cfg, workdir)
  for k, v in s[stage].items():
    if k not in out.train:
      raise DemoError(f"config field `demo.{stage}.{k}`: not a train.* field")
    out.train[k] = type(out.train[k])(v) if isinstance(out.train[k], float) else v
  out.train.stage = stage
  if stage == "continual":
    out.train.use_memory = True
    out.train.init_from = os.path.join(os.path.abspath(workdir), "warmup")
  return config_lib.validate(out)


def data_dir(cfg: ml_collections.ConfigDict, workdir: str) -> str:
  d = cfg.data.workdir_data
  return os.path.abspath(d if os.path.isabs(d) else os.path.join(workdir, d))


class StageRunner:
  """Runs stages once: a stage's record holds its settings hash, time and result."""

  def __init__(self, workdir: str, log: Callable[[str], None] = _say):
    self.workdir = os.path.abspath(workdir)
    self.dir = os.path.join(self.workdir, STAGES_DIR)
    os.makedirs(self.dir, exist_ok=True)
    self.log = log
    self.records: dict[str, dict[str, Any]] = {}

  def _path(self, name: str) -> str:
    return os.path.join(self.dir, f"{name}.json")

  def run(self, name: str, settings: Any, fn: Callable[[], Any],
          done: Callable[[], bool] = lambda: True) -> dict[str, Any]:
    """Runs `fn` unless a record with the same settings exists and `done()` holds."""
    key = _hash(dict(settings=settings,
                     upstream={k: r["key"] for k, r in self.records.items()}))
    path = self._path(name)
    if os.path.exists(path):
      with open(path) as f:
        rec = json.load(f)
      if rec.get("key") == key and done():
        rec["status"] = "reused"
        self.records[name] = rec
        self.log(f"[{name}] reused (finished in {rec['seconds']:.1f}s before)")
        return rec
      if rec.get("key") != key:
        self.log(f"[{name}] settings changed since the recorded run: running it again")
    self.log(f"[{name}] running")
    t0 = time.perf_counter()
    result = fn()
    rec = dict(name=name, key=key, seconds=time.perf_counter() - t0, result=result,
               finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    with open(path + ".tmp", "w") as f:
      json.dump(rec, f, indent=2, default=_jsonable)
    os.replace(path + ".tmp", path)
    rec = json.loads(json.dumps(rec, default=_jsonable))
    rec["status"] = "ran"
    self.records[name] = rec
    self.log(f"[{name}] done in {rec['seconds']:.1f}s")
    return rec


def _jsonable(x: Any) -> Any:
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


class StageInterrupted(DemoError):
  """A stage stopped early (preemption); later stages must not run on its output."""


def _train_done(cfg: ml_collections.ConfigDict, workdir: str) -> bool:
  ck = ckpt_lib.checkpoint_dir(workdir)
  if not os.path.isdir(ck):
    return False
  steps = [int(n) for n in os.listdir(ck) if n.isdigit()]
  return bool(steps) and max(steps) >= int(cfg.train.steps)


def _train_stage(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  train_lib.train(cfg, workdir)
  if not _train_done(cfg, workdir):  # stopped by SIGTERM/SIGINT after its checkpoint
    raise StageInterrupted(f"training in {workdir} stopped before step {cfg.train.steps}; "
                           "its checkpoint is saved: rerun the demo to continue")
  last: dict[str, Any] = {}
  for r in metrics_lib.read_jsonl(workdir):
    last.update({k: v for k, v in r.items() if k not in ("time",)})
  return dict(workdir=workdir, steps=int(cfg.train.steps), last=last)


def _neighbor_stats(root: str, split: str) -> dict[str, Any]:
  """Share of chunks with a neighbor (how much memory the continual stage can read)."""
  table = neighbor_table.NeighborTable(workspace.neighbors_dir(root, split))
  rows = np.stack([np.asarray(table[i]).reshape(-1) for i in range(len(table))]) \
      if len(table) else np.zeros((0, 1), np.int64)
  return dict(sequences=int(len(table)), chunks=int(rows.size),
              chunks_with_neighbor=int((rows >= 0).sum()))


def _eval_stage(cfg: ml_collections.ConfigDict, workdir: str, s: dict[str, Any]
                ) -> dict[str, Any]:
  root = data_dir(cfg, workdir)
  inf = inference.open_inference(os.path.join(workdir, "continual"), modes=list(MODES),
                                 workdir=workdir, data_dir=root,
                                 bank_dir=os.path.join(workdir, "bank"), log=_say)
  threshold = float(inf.cfg.data.eval_overlap_threshold)
  inf.retriever = inf.retriever.with_threshold(threshold)
  data: dict[str, Any] = {}
  limit = int(s["eval_limit"]) or None
  qa, mc = eval_tasks.load_knowledge_qa(root, limit)
  for task in s["eval_tasks"]:
    if task == "kw_mc":
      data[task] = mc
    elif task in ("kw_qa", "kw_coverage"):
      data[task] = qa
    elif task == "perplexity":
      data[task] = eval_tasks.load_heldout_sequences(root, int(s["perplexity_limit"]) or None)
    else:
      raise DemoError(f"config field `demo.eval_tasks`: unknown task {task!r}")
  results = eval_runner.run_all(inf, data, list(MODES), batch_size=int(s["eval_batch_size"]),
                                max_new_tokens=int(s["eval_max_new_tokens"]), log=_say)
  if hasattr(inf.memory_source, "close"):
    inf.memory_source.close()
  report = dict(checkpoint=inf.paths["checkpoint"], step=inf.step, paths=inf.paths,
                modes=list(MODES), leakage_filter_threshold=threshold,
                items={k: len(v) for k, v in data.items()},
                items_per_group={g: sum(it.group == g for it in mc) for g in GROUPS},
                choices=len(mc[0].choices) if mc else 0, results=results)
  out = os.path.join(workdir, "eval", "results.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out + ".tmp", "w") as f:
    json.dump(report, f, indent=2, default=_jsonable)
  os.replace(out + ".tmp", out)
  _say("\n" + eval_runner.format_table(results))
  return dict(path=out)


def _bench_stage(cfg: ml_collections.ConfigDict, workdir: str, s: dict[str, Any]
                 ) -> dict[str, Any]:
  r = bench_decode.run(cfg, batch=int(s["bench_batch"]), prompt_len=int(s["bench_prompt_len"]),
                       new_tokens=int(s["bench_new_tokens"]), runs=int(s["bench_runs"]),
                       printer=_say)
  out = os.path.join(workdir, "bench_decode.json")
  with open(out + ".tmp", "w") as f:
    json.dump(r, f, indent=2, default=_jsonable)
  os.replace(out + ".tmp", out)
  return dict(path=out)


def run_demo(cfg: ml_collections.ConfigDict, workdir: str, *,
             log: Callable[[str], None] = _say) -> dict[str, Any]:
  """Runs (or reuses) every stage; returns the summary (also written to summary.json)."""

  t_start = time.perf_counter()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  s = demo_settings(cfg)
  warm_cfg = stage_config(cfg, workdir, "warmup")
  cont_cfg = stage_config(cfg, workdir, "continual")
  cfg = ml_collections.ConfigDict(_cfg_dict(cfg))
  cfg.data.workdir_data = data_dir(cfg, workdir)
  if "demo" in cfg:
    del cfg["demo"]
  config_lib.validate(cfg)
  root = data_dir(cfg, workdir)
  wdir, cdir = os.path.join(workdir, "warmup"), os.path.join(workdir, "continual")
  bank_dir = os.path.join(workdir, "bank")
  runner = StageRunner(workdir, log)
  full = _cfg_dict(cfg)
  data_settings = dict(model=full["model"], data=full["data"])

  runner.run("prepare", data_settings, lambda: prepare_lib.prepare_data(cfg, workdir),
             lambda: os.path.exists(os.path.join(root, prepare_lib.MANIFEST)))
  runner.run("warmup", _cfg_dict(warm_cfg), lambda: _train_stage(warm_cfg, wdir),
             lambda: _train_done(warm_cfg, wdir))

  def index_fn():
    idx = reference_index.build_reference_index(cfg, workdir)
    return dict(path=workspace.index_dir(cfg, workdir), count=int(idx.count))

  runner.run("index", data_settings, index_fn,
             lambda: os.path.isdir(workspace.index_dir(cfg, workdir)))

  def neighbors_fn():
    out = {}
    for split in ("train", "validation"):
      nb_lib.mine_workdir(cfg, workdir, split=split)
      out[split] = _neighbor_stats(root, split)
    return out

  runner.run("neighbors", data_settings, neighbors_fn,
             lambda: all(os.path.isdir(workspace.neighbors_dir(root, sp))
                         for sp in ("train", "validation")))
  runner.run("continual", _cfg_dict(cont_cfg), lambda: _train_stage(cont_cfg, cdir),
             lambda: _train_done(cont_cfg, cdir))

  def encode_fn():
    ckpt_cfg, params, step = ckpt_lib.load_for_inference(cdir)
    encode_job.run(cont_cfg, checkpoint=cdir, checkpoint_config=ckpt_cfg, params=params,
                   step=step, references=root, out=bank_dir)
    return storage_summary(bank_dir, config_lib.model_config(cont_cfg))

  runner.run("encode", dict(model=full["model"], bank=full["bank"]), encode_fn,
             lambda: os.path.exists(os.path.join(bank_dir, bank_format.MANIFEST_FILE)))
  eval_settings = {k: s[k] for k in ("eval_limit", "eval_batch_size", "eval_max_new_tokens",
                                     "eval_tasks", "perplexity_limit")}
  runner.run("eval", eval_settings, lambda: _eval_stage(cont_cfg, workdir, s),
             lambda: os.path.exists(os.path.join(workdir, "eval", "results.json")))
  bench_settings = dict(model=full["model"], bench={k: s[k] for k in s if k.startswith("bench")})
  runner.run("bench", bench_settings, lambda: _bench_stage(cont_cfg, workdir, s),
             lambda: os.path.exists(os.path.join(workdir, "bench_decode.json")))

  summary = build_summary(cont_cfg, workdir, runner, s)
  write_plots(workdir, summary)
  summary["plots"] = [os.path.join(workdir, p) for p in PLOTS]
  summary["total_seconds"] = time.perf_counter() - t_start
  summary["stage_status"] = {k: r["status"] for k, r in runner.records.items()}
  with open(os.path.join(workdir, SUMMARY_FILE) + ".tmp", "w") as f:
    json.dump(summary, f, indent=2, default=_jsonable)
  os.replace(os.path.join(workdir, SUMMARY_FILE) + ".tmp", os.path.join(workdir, SUMMARY_FILE))
  log("\n" + format_summary(summary))
  return summary


# ------------------------------------------------------------------ summary


def _get(d: Any, *keys: str) -> Any:
  for k in keys:
    if not isinstance(d, dict) or k not in d:
      return None
    d = d[k]
  return d


def build_summary(cfg: ml_collections.ConfigDict, workdir: str, runner: StageRunner,
                  s: dict[str, Any]) -> dict[str, Any]:
  """Every figure of the demo in one dict (what summary.json holds)."""
  mc = model_config(cfg)
  with open(os.path.join(workdir, "eval", "results.json")) as f:
    ev = json.load(f)
  with open(os.path.join(workdir, "bench_decode.json")) as f:
    bench = json.load(f)
  res = ev["results"]
  n_choices = int(ev.get("choices") or 0)
  chance = 1.0 / n_choices if n_choices else None
  qa: dict[str, Any] = {}
  for task, metric in (("kw_mc", "acc"), ("kw_qa", "exact_match")):
    if task not in res:
      continue
    qa[task] = {}
    for mode in MODES:
      v = _get(res, task, mode, metric)
      if isinstance(v, dict):
        qa[task][mode] = {g: v.get(g) for g in ("all",) + GROUPS}
      else:
        qa[task][mode] = {"all": v}
  perplexity = {m: _get(res, "perplexity", m, "perplexity") for m in MODES}
  coverage = {k: v["all"] for k, v in (_get(res, "kw_coverage", "explicit") or {}).items()
              if isinstance(v, dict)}
  tps = {m: _get(bench, "modes", m, "tokens_per_s") for m in MODES}
  bank = runner.records["encode"]["result"]
  curves = {}
  for stage in ("warmup", "continual"):
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
  )
  return dict(
      config=cfg.get("name", ""), workdir=workdir,
      model=dict(params=costs.param_counts(mc).total,
                 non_embedding_params=costs.param_counts(mc).non_embedding,
                 d_model=mc.d_model, n_layers=mc.n_layers,
                 memory_layers=list(mc.memory_layers), memory_shape=list(mc.memory_shape),
                 max_seq_len=mc.max_seq_len),
      stages={k: dict(status=r["status"], seconds=r["seconds"]) for k, r in
              runner.records.items()},
      qa_accuracy=qa, qa_items=ev.get("items_per_group"), qa_choices=n_choices,
      perplexity=perplexity, memory_coverage=coverage,
      training=dict(warmup=runner.records["warmup"]["result"]["last"],
                    continual=runner.records["continual"]["result"]["last"]),
      neighbors=runner.records["neighbors"]["result"],
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
      targets=verdict, curves=curves, eval_results=os.path.join(workdir, "eval",
                                                                "results.json"),
  )


def _pct(v: Any) -> str:
  return "-" if v is None else f"{100 * v:5.1f}%"


def format_summary(sm: dict[str, Any]) -> str:
  """The evidence table printed at the end of the demo."""
  lines = ["=" * 72, f"Memory³ demo ({sm['config']}) — evidence", "=" * 72, "", "stages:"]
  for k, r in sm["stages"].items():
    lines.append(f"  {k:<10} {r['status']:<7} {r['seconds']:8.1f}s")
  for task, title in (("kw_mc", "knowledge QA, multiple choice (acc)"),
                      ("kw_qa", "knowledge QA, greedy answer (exact match)")):
    acc = sm["qa_accuracy"].get(task)
    if not acc:
      continue
    lines += ["", f"{title}; items per group {sm['qa_items']}"
              + (f"; chance {_pct(sm['targets']['chance'])}" if task == "kw_mc" else "")]
    lines.append(f"  {'entities':<15}" + "".join(f"{m:>10}" for m in MODES))
    for g in GROUPS + ("all",):
      lines.append(f"  {g:<15}" + "".join(f"{_pct(acc.get(m, {}).get(g)):>10}" for m in MODES))
  ppl = sm["perplexity"]
  lines += ["", "held-out perplexity: " + "  ".join(
      f"{m} {'-' if ppl.get(m) is None else f'{ppl[m]:.2f}'}" for m in MODES)]
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
  if "total_seconds" in sm:
    lines.append(f"\ntotal wall time: {sm['total_seconds']:.1f}s")
  return "\n".join(lines)


def write_plots(workdir: str, sm: dict[str, Any]) -> None:
  """loss_curves.png (both stages) and qa_accuracy.png (mode x entity group)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, stage in zip(axes, ("warmup", "continual")):
    c = sm["curves"][stage]
    ax.plot(c["step"], c["train_loss"], label="train loss")
    if c["eval_steps"]:
      ax.plot(c["eval_steps"], c["eval_no_memory_loss"], "o-", label="held-out, no memory")
      mem = [np.nan if v is None else v for v in c["eval_memory_loss"]]
      if not all(math.isnan(v) for v in mem):
        ax.plot(c["eval_steps"], mem, "s-", label="held-out, with memory")
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
