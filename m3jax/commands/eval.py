"""`m3jax eval`: evaluate a checkpoint with explicit memory, without memory and with RAG.

  m3jax eval --workdir=runs/demo [--checkpoint=runs/demo] \\
      [--task=perplexity,kw_qa,kw_mc,hellaswag=hs.jsonl,arc=arc.jsonl,boolq=boolq.jsonl] \\
      [--modes=explicit,none,rag] [--limit=200] [--bank=DIR] [--index=DIR] \\
      [--overlap_threshold=0.667 | --noleakage_filter] [--unfiltered] [--output=FILE]

Tasks (m3jax.evaluation.tasks): perplexity (held-out packed sequences), kw_qa (knowledge
world exact match by greedy generation, per entity group), kw_mc (the same
questions as multiple choice), hellaswag / arc / boolq (=FILE: lm-evaluation-
harness style JSONL). The leakage filter (references with overlap above the
threshold with the question are dropped; default `data.eval_overlap_threshold`,
2/3) is on by default and the number of references it dropped is reported;
--unfiltered also runs the memory modes with it off. Prints a table and writes
JSON to --output (default `<workdir>/eval/results-step<STEP>.json`, or
`results.json` for a params directory without a step). --output is checked before
anything is computed and rewritten after each finished task and mode (`complete`
is true at the end), so a failure keeps every finished result and names the task
and mode that failed.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from m3jax import cli
from m3jax import commands
from m3jax.evaluation import runner
from m3jax.evaluation import tasks as tasks_lib
from m3jax.inference import generate as gen_lib
from m3jax.inference import session as inference

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Params dir, training workdir, "
                                  "checkpoints dir or step dir (default: --workdir).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: data/, index, bank, and "
                               "where results go.")
_TASK = flags.DEFINE_list("task", ["perplexity", "kw_qa", "kw_mc"],
                          "Tasks: perplexity, kw_qa, kw_mc, kw_coverage, hellaswag=FILE, "
                          "arc=FILE, boolq=FILE.")
_MODES = flags.DEFINE_list("modes", ["explicit", "none", "rag"], "Memory modes to run.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "prepare-data directory.")
_INDEX = flags.DEFINE_string("index", None, "Index directory (default <data>/index).")
_BANK = flags.DEFINE_string("bank", None, "Memory bank (default <workdir>/bank if present; "
                            "else references are encoded on the fly).")
_LIMIT = flags.DEFINE_integer("limit", None, "At most this many items (sequences) per task.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per forward / generation batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 16, "Answer tokens generated for kw_qa.")
_FILTER = flags.DEFINE_bool("leakage_filter", True, "Drop references that overlap the "
                            "question (eq. 6) by more than --overlap_threshold.")
_THRESHOLD = flags.DEFINE_float("overlap_threshold", None,
                                "Leakage-filter threshold (default data.eval_overlap_threshold).")
_UNFILTERED = flags.DEFINE_bool("unfiltered", False,
                                "Also run the memory modes with the leakage filter off.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Compute dtype (default: the checkpoint config's).")
_OUTPUT = flags.DEFINE_string("output", None, "Results JSON path.")


def main(argv: list[str]) -> None:
  commands.check_args(argv)
  checkpoint = _CHECKPOINT.value or _WORKDIR.value
  tasks = tasks_lib.parse_tasks(_TASK.value)
  modes = [m.strip() for m in _MODES.value]
  for m in modes:
    if m not in gen_lib.MEMORY_MODES:
      raise app.UsageError(f"--modes: unknown mode {m!r}; expected {gen_lib.MEMORY_MODES}")
  if not checkpoint:
    raise app.UsageError("pass --workdir (and/or --checkpoint)")
  if _BATCH.value < 1 or _MAX_NEW.value < 1:
    raise app.UsageError("--batch_size and --max_new_tokens must be >= 1")
  inf = inference.open_inference(checkpoint, modes=modes, workdir=_WORKDIR.value,
                                 data_dir=_DATA_DIR.value, index_dir=_INDEX.value,
                                 bank_dir=_BANK.value, dtype=_DTYPE.value)
  threshold = runner.filter_threshold(inf, _FILTER.value, _THRESHOLD.value)
  out = runner.report_path(_OUTPUT.value, _WORKDIR.value or checkpoint, inf.step)
  runner.check_output(out)
  data = tasks_lib.load_tasks(tasks, inf.data_root, _LIMIT.value)

  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  report = runner.evaluate_checkpoint(inf, data, modes, threshold=threshold,
                                      batch_size=_BATCH.value, max_new_tokens=_MAX_NEW.value,
                                      unfiltered=_UNFILTERED.value, log=log, output=out)
  print(runner.format_table(report["results"]))
  print(f"results: {out}", file=sys.stderr)


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
