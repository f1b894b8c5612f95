"""`m3jax demo`: the whole Memory³ pipeline on the knowledge world, with its evidence.

    run_demo(cfg, workdir) -> summary dict (also <workdir>/summary.json + PNG plots)

Stages (each timed; each skipped when its record in `<workdir>/stages/` matches the
settings it would run with and its output is there; the library functions below
resume by themselves too):

  prepare    data_pipeline.prepare.prepare_data             <workdir>/data
  warmup     m3jax.training.loop.train (stage warmup)       <workdir>/warmup
  index      m3jax.retrieval.reference_index.build_reference_index <workdir>/data/index
  neighbors  m3jax.retrieval.neighbors.mine_workdir         <workdir>/data/neighbors/{train,
                                                            validation}
  continual  m3jax.training.loop.train (stage continual, init_from = the warmup workdir)
                                                            <workdir>/continual
  rag_reader the text-RAG competitor: the continual stage again from the same warmup
             checkpoint, same data and steps, the references as text in front of each
             sequence (train.reader = "rag", m3jax.training.rag_reader)
                                                            <workdir>/rag_reader
  encode     m3jax.memory.encode_job.run                    <workdir>/bank
  eval       m3jax.evaluation.runner (kw_mc, kw_qa, perplexity): none and explicit on the
             continual checkpoint, rag on the rag_reader's (demo.rag_reader = False: on
             the continual checkpoint, a reader never trained on references as text)
                                                            <workdir>/eval/results.json
  bench      m3jax.bench.decode.run (tokens/s of none/explicit/rag decoding)
                                                            <workdir>/bench_decode.json
  summary    summary.json, loss_curves.png, qa_accuracy.png (m3jax.demo.report)

Each stage's record is `<workdir>/stages/<stage>.json` (`m3jax.core.stages`); its
settings hash covers the stage's settings and the hashes of the stages before it, so
a changed stage runs again with every later one. The summary, its table and the plots
are `m3jax.demo.report`.

The config's `demo` section sets what differs between the two training stages
(`demo.warmup`, `demo.continual`: train.* fields) and the size of the eval and
decode benchmark; a config without it gets DEFAULTS.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Callable

import ml_collections
import numpy as np

from data_pipeline import prepare as prepare_lib
from m3jax.bench import decode as bench_decode
from m3jax.core import artifacts
from m3jax.core import config as config_lib
from m3jax.core import errors
from m3jax.core import metrics as metrics_lib
from m3jax.core import stages as stages_lib
from m3jax.core import workspace
from m3jax.core.progress import format_duration
from m3jax.demo import report
from m3jax.demo.report import GROUPS, MODES
from m3jax.evaluation import runner as eval_runner
from m3jax.evaluation import tasks as eval_tasks
from m3jax.inference import session as inference
from m3jax.memory import bank_format
from m3jax.memory import encode_job
from m3jax.memory.bank_storage import storage_summary
from m3jax.model import params_io
from m3jax.retrieval import neighbor_table
from m3jax.retrieval import neighbors as nb_lib
from m3jax.retrieval import reference_index
from m3jax.training import loop as train_lib

STAGES = ("prepare", "warmup", "index", "neighbors", "continual", "rag_reader", "encode", "eval",
          "bench", "summary")
TRAIN_STAGES = ("warmup", "continual", "rag_reader")  # each trains in <workdir>/<stage>
STAGES_DIR = "stages"
SUMMARY_FILE = "summary.json"

# `demo` section defaults (configs/demo.py overrides them).
DEFAULTS = dict(
    warmup=dict(stage="warmup", use_memory=False),
    continual=dict(stage="continual", use_memory=True),
    rag_reader=True,  # train the text-RAG competitor (demo.continual's settings, reader rag)
    eval_limit=0,  # knowledge-world questions per task (equal share per group); 0 = all
    eval_batch_size=32,
    eval_max_new_tokens=12,
    eval_tasks=("kw_mc", "kw_qa", "perplexity", "kw_coverage"),
    perplexity_limit=0,  # held-out sequences; 0 = all
    bench_batch=8,
    bench_prompt_len=128,
    bench_new_tokens=64,
    bench_runs=3,
    # unseen people: explicit memory >= 70%; no memory <= chance + 5 points; explicit
    # within 5 points of the RAG reader or above it
    targets=dict(explicit_unseen_mc=0.70, none_unseen_margin=0.05, rag_margin=0.05),
    posttrain={},  # SFT / DPO settings of `m3jax demo-posttrain` (m3jax/demo/posttrain.py)
)


class DemoError(errors.UserError, RuntimeError):
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


def _cfg_dict(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(cfg.to_json_best_effort(sort_keys=True))


def stage_config(cfg: ml_collections.ConfigDict, workdir: str, stage: str
                 ) -> ml_collections.ConfigDict:
  """The config a training stage runs with: `demo.<stage>` over `train`, shared data dir.

  `rag_reader` is the continual stage with `train.reader = "rag"`: the same settings,
  starting point, data and steps."""
  s = demo_settings(cfg)
  out = ml_collections.ConfigDict(_cfg_dict(cfg))
  if "demo" in out:
    del out["demo"]
  out.data.workdir_data = workspace.data_root(cfg, workdir)
  train_stage = "continual" if stage == "rag_reader" else stage
  for k, v in s[train_stage].items():
    if k not in out.train:
      raise DemoError(f"config field `demo.{train_stage}.{k}`: not a train.* field")
    out.train[k] = type(out.train[k])(v) if isinstance(out.train[k], float) else v
  out.train.stage = train_stage
  if train_stage == "continual":
    out.train.use_memory = True
    out.train.init_from = os.path.join(os.path.abspath(workdir), "warmup")
    out.train.reader = "rag" if stage == "rag_reader" else "memory"
  return config_lib.validate(out)


class StageInterrupted(DemoError):
  """A stage stopped early (preemption); later stages must not run on its output."""


def _train_done(cfg: ml_collections.ConfigDict, workdir: str) -> bool:
  ck = workspace.checkpoint_dir(workdir)
  if not os.path.isdir(ck):
    return False
  step = params_io.latest_step(ck)
  return step is not None and step >= int(cfg.train.steps)


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


def eval_checkpoints(workdir: str, s: dict[str, Any]) -> list[tuple[str, list[str]]]:
  """(checkpoint workdir, modes read from it): explicit memory and its no-memory baseline
  from the continual run; RAG from the RAG reader trained for it, when there is one."""
  cont = os.path.join(workdir, "continual")
  if not s["rag_reader"]:
    return [(cont, list(MODES))]
  return [(cont, [m for m in MODES if m != "rag"]), (os.path.join(workdir, "rag_reader"), ["rag"])]


def rag_reader_references(cfg: ml_collections.ConfigDict) -> int:
  """References a RAG reader's training record holds at most: one per chunk of a
  sequence, so its evaluation reads that many (the lengths it trained on), at most the
  memories explicit memory reads."""
  mc = config_lib.model_config(cfg)
  return min(mc.max_seq_len // mc.chunk_length, mc.memories_per_chunk)


def _eval_stage(cfg: ml_collections.ConfigDict, workdir: str, s: dict[str, Any]
                ) -> dict[str, Any]:
  root = workspace.data_root(cfg, workdir)
  data = _eval_data(root, s)
  results: dict[str, Any] = {}
  paths, steps = {}, {}
  for ckpt, modes in eval_checkpoints(workdir, s):
    inf = inference.open_inference(ckpt, modes=modes, workdir=workdir, data_dir=root,
                                   bank_dir=workspace.bank_dir(workdir), log=_say)
    threshold = float(inf.cfg.data.eval_overlap_threshold)
    inf.retriever = inf.retriever.with_threshold(threshold)
    runs = [(modes, inf.retriever, "")]
    if s["rag_reader"] and modes == ["rag"]:
      k = rag_reader_references(cfg)
      full = inf.retriever
      inf.retriever = full.with_k(k)
      if k < full.k:  # also beyond the trained lengths, as many references as memories
        runs = [(modes, inf.retriever, ""), (modes, full, f"/{full.k}refs")]
    for run_modes, retriever, suffix in runs:
      inf.retriever = retriever
      got = eval_runner.run_all(inf, data, run_modes, batch_size=int(s["eval_batch_size"]),
                                max_new_tokens=int(s["eval_max_new_tokens"]), log=_say)
      for task, by_mode in got.items():
        results.setdefault(task, {}).update({m + suffix: r for m, r in by_mode.items()})
    for m in modes:
      paths[m], steps[m] = inf.paths, inf.step
    if hasattr(inf.memory_source, "close"):
      inf.memory_source.close()
  mc = data.get("kw_mc", [])
  results_report = dict(checkpoint=paths["explicit"]["checkpoint"], step=steps["explicit"],
                        paths=paths["explicit"], modes=list(MODES),
                        checkpoints={m: p["checkpoint"] for m, p in paths.items()},
                        rag_reader="trained" if s["rag_reader"] else "untrained",
                        rag_references=(rag_reader_references(cfg) if s["rag_reader"] else
                                        config_lib.model_config(cfg).memories_per_chunk),
                        leakage_filter_threshold=threshold,
                        items={k: len(v) for k, v in data.items()},
                        items_per_group={g: sum(it.group == g for it in mc) for g in GROUPS},
                        choices=len(mc[0].choices) if mc else 0, results=results)
  out = report.eval_results_file(workdir)
  _write_json(out, results_report)
  _say("\n" + eval_runner.format_table(results))
  return dict(path=out)


def _eval_data(root: str, s: dict[str, Any]) -> dict[str, Any]:
  """The eval stage's items per task (`demo.eval_tasks`, `eval_limit`, `perplexity_limit`)."""
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
  return data


def _bench_stage(cfg: ml_collections.ConfigDict, workdir: str, s: dict[str, Any]
                 ) -> dict[str, Any]:
  r = bench_decode.run(cfg, batch=int(s["bench_batch"]), prompt_len=int(s["bench_prompt_len"]),
                       new_tokens=int(s["bench_new_tokens"]), runs=int(s["bench_runs"]),
                       printer=_say)
  out = report.bench_file(workdir)
  _write_json(out, r)
  return dict(path=out)


def _write_json(path: str, obj: Any) -> None:
  """Indented JSON in the order the dict was built (tables read it in that order)."""
  artifacts.write_bytes(path, json.dumps(obj, indent=2, default=stages_lib.jsonable).encode())


class _Stages:
  """The demo's stage runner: records in `<workdir>/stages/`, each keyed also by the
  records of the stages before it (a rerun stage reruns every later one)."""

  def __init__(self, workdir: str, log: Callable[[str], None]):
    self.dir = os.path.join(workdir, STAGES_DIR)
    self.log = log
    self.t0 = time.perf_counter()
    self.runner = stages_lib.StageRunner(fmt=stages_lib.RECORDED_STAGE,
                                         on_change=stages_lib.rerun_on_change(log), log=log)

  @property
  def records(self) -> dict[str, dict[str, Any]]:
    return self.runner.records

  def announce(self, name: str) -> None:
    """`[5/9] continual | elapsed 12m03s`: where the demo is and how long it has run."""
    self.log(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name} | elapsed "
             f"{format_duration(time.perf_counter() - self.t0)}")

  def run(self, name: str, settings: Any, fn: Callable[[], Any],
          done: Callable[[], bool]) -> dict[str, Any]:
    upstream = {k: r[stages_lib.RECORDED_STAGE.key] for k, r in self.records.items()}
    self.announce(name)
    return self.runner.run(name, dict(settings=settings, upstream=upstream), fn,
                           record=os.path.join(self.dir, f"{name}.json"), done=done)


def run_demo(cfg: ml_collections.ConfigDict, workdir: str, *,
             log: Callable[[str], None] = _say) -> dict[str, Any]:
  """Runs (or reuses) every stage; returns the summary (also written to summary.json)."""

  t_start = time.perf_counter()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  s = demo_settings(cfg)
  warm_cfg = stage_config(cfg, workdir, "warmup")
  cont_cfg = stage_config(cfg, workdir, "continual")
  rag_cfg = stage_config(cfg, workdir, "rag_reader")
  cfg = ml_collections.ConfigDict(_cfg_dict(cfg))
  cfg.data.workdir_data = workspace.data_root(cfg, workdir)
  if "demo" in cfg:
    del cfg["demo"]
  config_lib.validate(cfg)
  root = workspace.data_root(cfg, workdir)
  wdir, cdir, rdir = (os.path.join(workdir, stage) for stage in TRAIN_STAGES)
  bank_dir = workspace.bank_dir(workdir)
  index_dir = workspace.index_dir(cfg, workdir)
  runner = _Stages(workdir, log)
  full = _cfg_dict(cfg)
  data_settings = dict(model=full["model"], data=full["data"])

  runner.run("prepare", data_settings, lambda: prepare_lib.prepare_data(cfg, workdir),
             lambda: os.path.exists(os.path.join(root, workspace.DATA_MANIFEST)))
  runner.run("warmup", _cfg_dict(warm_cfg), lambda: _train_stage(warm_cfg, wdir),
             lambda: _train_done(warm_cfg, wdir))

  def index_fn():
    idx = reference_index.build_reference_index(cfg, workdir)
    return dict(path=index_dir, count=int(idx.count))

  runner.run("index", data_settings, index_fn, lambda: os.path.isdir(index_dir))

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

  if s["rag_reader"]:
    runner.run("rag_reader", _cfg_dict(rag_cfg), lambda: _train_stage(rag_cfg, rdir),
               lambda: _train_done(rag_cfg, rdir))

  def encode_fn():
    ckpt_cfg, params, step = params_io.load_for_inference(cdir)
    encode_job.run(cont_cfg, checkpoint=cdir, checkpoint_config=ckpt_cfg, params=params,
                   step=step, references=root, out=bank_dir)
    return storage_summary(bank_dir, config_lib.model_config(cont_cfg))

  runner.run("encode", dict(model=full["model"], bank=full["bank"]), encode_fn,
             lambda: os.path.exists(os.path.join(bank_dir, bank_format.MANIFEST_FILE)))
  eval_settings = {k: s[k] for k in ("eval_limit", "eval_batch_size", "eval_max_new_tokens",
                                     "eval_tasks", "perplexity_limit", "rag_reader")}
  eval_settings["rag_references"] = rag_reader_references(cont_cfg)
  runner.run("eval", eval_settings, lambda: _eval_stage(cont_cfg, workdir, s),
             lambda: os.path.exists(report.eval_results_file(workdir)))
  bench_settings = dict(model=full["model"], bench={k: s[k] for k in s if k.startswith("bench")})
  runner.run("bench", bench_settings, lambda: _bench_stage(cont_cfg, workdir, s),
             lambda: os.path.exists(report.bench_file(workdir)))

  runner.announce("summary")
  summary = report.build_summary(cont_cfg, workdir, runner.records, s)
  report.write_plots(workdir, summary)
  summary["plots"] = [os.path.join(workdir, p) for p in report.PLOTS]
  summary["total_seconds"] = time.perf_counter() - t_start
  summary["stage_status"] = {k: r["status"] for k, r in runner.records.items()}
  _write_json(os.path.join(workdir, SUMMARY_FILE), summary)
  log("\n" + report.format_summary(summary))
  return summary
