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
from m3jax.core import errors
from m3jax.core.config import ModelConfig
from m3jax.core.errors import InputError
from m3jax.core.progress import Progress
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
      raise InputError("memory mode 'explicit' needs an index (retriever) and a memory "
                       "source (bank)")
    retrieval = schedule.MemoryRetrieval.for_model(
        model.config, retriever, model.memory_source,
        lambda ids: model.tokenizer.decode(ids), cache_queries=True)
  if mode == "rag" and (retriever is None or model.references is None):
    raise InputError("memory mode 'rag' needs an index (retriever) and the references")
  return retrieval


def work_units(task: str, data: Any) -> int:
  """Sequences `run_task` scores or completes for a task (what its progress counts)."""
  if task in JSONL_TASKS or task == "kw_mc":
    return sum(len(item.choices) for item in data)
  return len(data)


def run_task(model: OpenedModel, task: str, data: Any, mode: str, *, retriever: Any = None,
             batch_size: int = 8, max_new_tokens: int = 16,
             on_scored: Callable[[int], None] | None = None) -> dict[str, Any]:
  """One task in one memory mode; returns its metrics plus retrieval counts.

  `on_scored(n)` is called as batches finish with the sequences they scored (of
  `work_units(task, data)`); kw_coverage does not report.
  """
  if task == "kw_coverage":
    if mode != "explicit":
      raise InputError(f"kw_coverage describes explicit memories; mode {mode!r} has none")
    return coverage.answer_coverage(data, model.config, model.params, model.tokenizer,
                                    retriever, model.references)
  retrieval = _memory_retrieval(model, mode, retriever)
  scorer = Scorer(model.config, model.params, model.tokenizer, mode, retrieval=retrieval,
                  retriever=retriever, references=model.references, batch_size=batch_size,
                  on_scored=on_scored)
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
                              filter_texts=[it.question for it in items],
                              on_batch=on_scored)
      return [c.text for c in done]

    result = score_exact_match(complete, data)
    scorer.stats["rag_retrievals"] += textgen.stats["retrievals"] if mode == "rag" else 0
    scorer.stats["rag_refs"] += textgen.stats["rag_refs"]
    scorer.stats["rag_dropped"] += textgen.stats["rag_dropped"]
  else:
    raise InputError(f"unknown task {task!r}; expected one of {TASKS}")
  if mode == "explicit":
    st = retrieval.stats
    result["retrieval"] = dict(queries=st["queries"], searches=st["searches"], refs=st["refs"],
                               dropped_by_filter=st["dropped"])
  elif mode == "rag":
    result["retrieval"] = dict(queries=scorer.stats["rag_retrievals"],
                               refs=scorer.stats["rag_refs"],
                               dropped_by_filter=scorer.stats["rag_dropped"])
  return result


class TaskModeError(errors.UserError):
  """One task in one memory mode failed on bad input (e.g. a corrupt bank shard)."""

  def __init__(self, task: str, mode: str, reason: str):
    super().__init__(f"{task} / {mode} failed: {reason}")
    self.task, self.mode, self.reason = task, mode, reason


def run_all(model: OpenedModel, tasks: dict[str, Any], modes: Sequence[str], *,
            batch_size: int = 8, max_new_tokens: int = 16, unfiltered: bool = False,
            log: Callable[[str], None] = print,
            on_result: Callable[[str, str, dict[str, Any]], None] | None = None,
            progress_every_s: float = 30.0) -> dict[str, Any]:
  """Every task in every mode; with `unfiltered`, memory modes again with the filter off.

  `batch_size`: sequences per forward / generation batch; `max_new_tokens`: answer
  tokens generated for kw_qa. Returns {task: {mode: metrics}}; unfiltered runs
  appear as mode "<mode>/unfiltered". Each run logs a progress line (sequences done /
  total, rate, elapsed, ETA) every `progress_every_s` seconds and when it ends.
  `on_result(task, mode, metrics)` is called as
  each one finishes (to save it at once). A user error in one run is raised as
  `TaskModeError` naming the task and mode; a bug keeps its type, with a note.
  """
  sizes = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
  results: dict[str, Any] = {}
  for task, data in tasks.items():
    results[task] = {}
    for mode in modes:
      if task == "kw_coverage" and mode != "explicit":
        continue
      runs = [(mode, model.retriever)]
      if unfiltered and mode not in gen_lib.NO_MEMORY_MODES and model.retriever is not None:
        runs.append((f"{mode}/unfiltered", model.retriever.with_threshold(None)))
      for name, retriever in runs:
        log(f"eval: {task} / {name}" + (" (leakage filter off)" if "/" in name else ""))
        progress = Progress(work_units(task, data), desc=f"eval: {task} / {name}",
                            unit="seqs", every_s=progress_every_s, printer=log)
        try:
          result = run_task(model, task, data, mode, retriever=retriever,
                            on_scored=progress.update, **sizes)
          if task != "kw_coverage":
            progress.close()
        except Exception as e:
          reason = errors.user_message(e)
          if reason is None:
            e.add_note(f"(while evaluating {task} / {name})")
            raise
          raise TaskModeError(task, name, reason) from e
        results[task][name] = result
        if on_result is not None:
          on_result(task, name, result)
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
                        log: Callable[[str], None] = print,
                        output: str | None = None) -> dict[str, Any]:
  """Sets the leakage filter to `threshold` (None: off), runs every task in every mode
  and returns the report: checkpoint, step, paths, modes, threshold, item counts,
  seconds, results and `complete`. `inf` is an m3jax.inference.session.Inference.

  With `output`, the report is rewritten there (atomically) after every finished task
  and mode, so a later failure loses nothing computed: the file then holds
  `complete: false`, the finished results and, for a user error, `failed` (task, mode,
  error), and the raised `TaskModeError` says where the partial results are.
  """
  if inf.retriever is not None:
    inf.retriever = inf.retriever.with_threshold(threshold)
  t0 = time.time()
  report = dict(checkpoint=inf.paths["checkpoint"], step=inf.step, paths=inf.paths,
                modes=list(modes), leakage_filter_threshold=threshold,
                items={k: len(v) for k, v in data.items()}, seconds=0.0, results={},
                complete=False)

  def save(task: str, mode: str, result: dict[str, Any]) -> None:
    report["results"].setdefault(task, {})[mode] = result
    report["seconds"] = round(time.time() - t0, 1)
    if output:
      write_report(output, report)

  try:
    results = run_all(inf, data, modes, batch_size=batch_size, max_new_tokens=max_new_tokens,
                      unfiltered=unfiltered and threshold is not None, log=log, on_result=save)
  except TaskModeError as e:
    report["failed"] = dict(task=e.task, mode=e.mode, error=e.reason)
    if not output:
      raise
    write_report(output, report)
    finished = sum(len(v) for v in report["results"].values())
    raise TaskModeError(e.task, e.mode, f"{e.reason} ({finished} finished task/mode results "
                        f"kept in {output})") from e
  except Exception as e:
    if output and report["results"]:
      e.add_note(f"(the finished task/mode results are kept in {output})")
    raise
  report.update(results=results, seconds=round(time.time() - t0, 1), complete=True)
  if output:
    write_report(output, report)
  return report


def check_output(path: str) -> None:
  """Refuses an --output that cannot be written, before anything is computed."""
  if os.path.isdir(path):
    raise InputError(f"--output={path} is a directory; give a file path")
  artifacts.check_writable_dir(os.path.dirname(os.path.abspath(path)), f"--output={path}")


def report_path(output: str | None, base: str, step: int | None) -> str:
  """`output`, else `<base>/eval/results-step<STEP>.json` (`results.json` without a step)."""
  name = "results.json" if step is None else f"results-step{step}.json"
  return output or os.path.join(base, "eval", name)


def write_report(path: str, report: dict[str, Any]) -> None:
  """Writes the report as indented JSON, atomically."""
  artifacts.write_bytes(path, json.dumps(report, indent=2).encode())
