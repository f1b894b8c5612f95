"""Running the evaluation: every task in every memory mode, its table and its report.

`run_all(model, tasks, modes)` runs the tasks of m3jax.evaluation.tasks under the
memory modes of m3jax.inference.generate.MEMORY_MODES (explicit; none = the sink
prefix kept and every memory masked; rag; none-noprefix, a labelled extra; see
m3jax.evaluation.scoring) and returns {task: {mode: metrics}}; each memory-mode
result records its retrieval counts, among them how many references the leakage
filter dropped, and `unfiltered=True` repeats the memory modes with the filter
off. `model` is an opened checkpoint (m3jax.inference.session.Inference, or any
object with the fields of `OpenedModel`). `format_table` prints the results,
`evaluate_checkpoint` and `write_report` are the `m3jax eval` command's library.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Protocol, Sequence

from m3jax.core import artifacts
from m3jax.core.config import ModelConfig
from m3jax.evaluation import coverage
from m3jax.evaluation.scoring import Scorer, score_exact_match, score_multiple_choice
from m3jax.evaluation.tasks import JSONL_TASKS, TASKS
from m3jax.evaluation.text_metrics import perplexity_from
from m3jax.inference import generate as gen_lib
from m3jax.retrieval import schedule


class OpenedModel(Protocol):
  """What the evaluation reads of an opened checkpoint; m3jax.inference.session.Inference
  has it. The memory pieces may be None for mode 'none' only."""
  config: ModelConfig
  params: Any
  tokenizer: Any
  retriever: Any  # m3jax.retrieval.retriever.Retriever (leakage filter on, by default)
  references: Any  # reference store (RAG text, leakage filter)
  memory_source: Any  # m3jax.memory.source.MemorySource (explicit)


def _memory_retrieval(model: OpenedModel, mode: str,
                      retriever: Any) -> schedule.MemoryRetrieval | None:
  """The explicit-memory retrieval a mode needs (None for none / rag), checking its inputs."""
  retrieval = None
  if mode == "explicit":
    if retriever is None or model.memory_source is None:
      raise ValueError("memory mode 'explicit' needs an index (retriever) and a memory "
                       "source (bank)")
    retrieval = schedule.MemoryRetrieval.for_model(
        model.config, retriever, model.memory_source,
        lambda ids: model.tokenizer.decode(ids), cache_queries=True)
  if mode == "rag" and (retriever is None or model.references is None):
    raise ValueError("memory mode 'rag' needs an index (retriever) and the references")
  return retrieval


def run_task(model: OpenedModel, task: str, data: Any, mode: str, *, retriever: Any = None,
             batch_size: int = 8, max_new_tokens: int = 16) -> dict[str, Any]:
  """One task in one memory mode; returns its metrics plus retrieval counts."""
  if task == "kw_coverage":
    if mode != "explicit":
      raise ValueError(f"kw_coverage describes explicit memories; mode {mode!r} has none")
    return coverage.answer_coverage(data, model.config, model.params, model.tokenizer,
                                    retriever, model.references)
  retrieval = _memory_retrieval(model, mode, retriever)
  scorer = Scorer(model.config, model.params, model.tokenizer, mode, retrieval=retrieval,
                  retriever=retriever, references=model.references, batch_size=batch_size)
  if task == "perplexity":
    nll, n = scorer.sequence_nll(data)
    result = perplexity_from(nll, n)
  elif task in JSONL_TASKS or task == "kw_mc":
    result = score_multiple_choice(scorer, data)
  elif task == "kw_qa":
    textgen = gen_lib.TextGenerator(gen_lib.Generator(model.config, model.params),
                                    model.tokenizer, mode, retrieval=retrieval,
                                    retriever=retriever, references=model.references)

    def complete(items):
      done = textgen.complete([it.prompt for it in items], max_new_tokens=max_new_tokens,
                              batch_size=batch_size,
                              queries=[it.question for it in items],
                              filter_texts=[it.question for it in items])
      return [c.text for c in done]

    result = score_exact_match(complete, data)
    scorer.stats["rag_retrievals"] += textgen.stats["retrievals"] if mode == "rag" else 0
    scorer.stats["rag_refs"] += textgen.stats["rag_refs"]
    scorer.stats["rag_dropped"] += textgen.stats["rag_dropped"]
  else:
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
  if mode == "explicit":
    st = retrieval.stats
    result["retrieval"] = dict(queries=st["queries"], searches=st["searches"], refs=st["refs"],
                               dropped_by_filter=st["dropped"])
  elif mode == "rag":
    result["retrieval"] = dict(queries=scorer.stats["rag_retrievals"],
                               refs=scorer.stats["rag_refs"],
                               dropped_by_filter=scorer.stats["rag_dropped"])
  return result


def run_all(model: OpenedModel, tasks: dict[str, Any], modes: Sequence[str], *,
            batch_size: int = 8, max_new_tokens: int = 16, unfiltered: bool = False,
            log: Callable[[str], None] = print) -> dict[str, Any]:
  """Every task in every mode; with `unfiltered`, memory modes again with the filter off.

  `batch_size`: sequences per forward / generation batch; `max_new_tokens`: answer
  tokens generated for kw_qa. Returns {task: {mode: metrics}}; unfiltered runs
  appear as mode "<mode>/unfiltered".
  """
  sizes = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
  results: dict[str, Any] = {}
  for task, data in tasks.items():
    results[task] = {}
    for mode in modes:
      if task == "kw_coverage" and mode != "explicit":
        continue
      log(f"eval: {task} / {mode}")
      results[task][mode] = run_task(model, task, data, mode, retriever=model.retriever,
                                     **sizes)
      if unfiltered and mode not in gen_lib.NO_MEMORY_MODES and model.retriever is not None:
        log(f"eval: {task} / {mode} (leakage filter off)")
        results[task][f"{mode}/unfiltered"] = run_task(
            model, task, data, mode, retriever=model.retriever.with_threshold(None), **sizes)
  return results


_HEADLINE = dict(perplexity=("perplexity",), hellaswag=("acc", "acc_norm"),
                 arc=("acc", "acc_norm"), boolq=("acc",), kw_qa=("exact_match",),
                 kw_mc=("acc", "acc_norm"))


def format_table(results: dict[str, Any]) -> str:
  """A plain-text table: one row per task metric (and group), one column per mode."""
  modes: list[str] = []
  for per_mode in results.values():
    modes += [m for m in per_mode if m not in modes]
  rows = []
  for task, per_mode in results.items():
    headline = _HEADLINE.get(task) or tuple(
        k for r in per_mode.values() for k in r if k.startswith("answer_"))
    for metric in dict.fromkeys(headline):
      keys = ["all"]
      for r in per_mode.values():
        v = r.get(metric)
        if isinstance(v, dict):
          keys += [k for k in v if k not in keys]
      for key in keys:
        label = (task if metric == task else f"{task} {metric}") + (
            f" [{key}]" if key != "all" else "")
        cells = []
        for m in modes:
          v = per_mode.get(m, {}).get(metric)
          v = v.get(key) if isinstance(v, dict) else (v if key == "all" else None)
          cells.append("-" if v is None else (f"{v:.3f}" if metric != "perplexity"
                                              else f"{v:.2f}"))
        rows.append([label] + cells)
    dropped = [str(per_mode.get(m, {}).get("retrieval", {}).get("dropped_by_filter", "-"))
               for m in modes]
    if any(d != "-" for d in dropped):
      rows.append([f"{task} refs dropped by filter"] + dropped)
  header = ["task / metric"] + modes
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
  line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


# ---------------------------------------------------------------------------
# The `m3jax eval` command's run and report


def filter_threshold(inf: Any, enabled: bool, threshold: float | None) -> float | None:
  """The leakage filter's threshold: None when disabled, else `threshold` or the config's
  `data.eval_overlap_threshold`."""
  if not enabled:
    return None
  return threshold if threshold is not None else float(inf.cfg.data.eval_overlap_threshold)


def evaluate_checkpoint(inf: Any, data: dict[str, Any], modes: Sequence[str], *,
                        threshold: float | None, batch_size: int = 8,
                        max_new_tokens: int = 16, unfiltered: bool = False,
                        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Sets the leakage filter to `threshold` (None: off), runs every task in every mode
  and returns the report: checkpoint, step, paths, modes, threshold, item counts,
  seconds and results. `inf` is an m3jax.inference.session.Inference."""
  if inf.retriever is not None:
    inf.retriever = inf.retriever.with_threshold(threshold)
  t0 = time.time()
  results = run_all(inf, data, modes, batch_size=batch_size, max_new_tokens=max_new_tokens,
                    unfiltered=unfiltered and threshold is not None, log=log)
  return dict(checkpoint=inf.paths["checkpoint"], step=inf.step, paths=inf.paths,
              modes=list(modes), leakage_filter_threshold=threshold,
              items={k: len(v) for k, v in data.items()},
              seconds=round(time.time() - t0, 1), results=results)


def report_path(output: str | None, base: str, step: int | None) -> str:
  """`output`, else `<base>/eval/results-step<STEP>.json` (`results.json` without a step)."""
  name = "results.json" if step is None else f"results-step{step}.json"
  return output or os.path.join(base, "eval", name)


def write_report(path: str, report: dict[str, Any]) -> None:
  """Writes the report as indented JSON, atomically."""
  artifacts.write_bytes(path, json.dumps(report, indent=2).encode())
