"""Evaluation tasks: their names, their items and the loaders that read them.

Tasks (`TASKS`):

- perplexity: held-out packed sequences (the `validation` split of prepare-data's
  packed dataset): token-level negative log-likelihood and its exp.
- hellaswag / arc / boolq: multiple choice by log-likelihood of each choice as a
  continuation of the context, lm-evaluation-harness style JSONL
  (HellaSwag {ctx, endings, label}; ARC {question, choices{text, label},
  answerKey}; BoolQ {passage, question, answer}).
- kw_qa: the knowledge world's held-out questions, answered by greedy generation,
  per entity group (`GROUPS`: seen, memory_taught, unseen) and overall.
- kw_mc: the same questions as multiple choice (gold vs its distractors).
- kw_coverage: for the same questions, whether the answer reaches the memory
  (m3jax.evaluation.coverage).

How items are scored lives in m3jax.evaluation.scoring, how tasks run in every
memory mode in m3jax.evaluation.runner.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from data_pipeline import loader as loader_lib
from data_pipeline import prepared
from data_pipeline import tfds_builders
from m3jax.core.errors import InputError

TASKS = ("perplexity", "hellaswag", "arc", "boolq", "kw_qa", "kw_mc", "kw_coverage")
JSONL_TASKS = ("hellaswag", "arc", "boolq")
KW_TASKS = ("kw_qa", "kw_mc", "kw_coverage")
GROUPS = ("seen", "memory_taught", "unseen")


# ---------------------------------------------------------------------------
# Items


class MCItem(NamedTuple):
  """One multiple-choice question: continuations of `context`, `gold` is correct."""
  context: str
  choices: tuple[str, ...]
  gold: int
  question: str  # the leakage filter's text and the RAG query
  group: str = ""


class QAItem(NamedTuple):
  """One question answered by generation from `prompt`; exact match against `answer`."""
  prompt: str
  answer: str
  question: str
  group: str = ""


# ---------------------------------------------------------------------------
# Task data


def parse_tasks(specs: Sequence[str]) -> dict[str, str | None]:
  """`--task` values: ["perplexity", "arc=f.jsonl"] -> {"perplexity": None, "arc": "f.jsonl"}."""
  out: dict[str, str | None] = {}
  for spec in specs:
    name, _, path = spec.partition("=")
    name = name.strip()
    if name not in TASKS:
      raise InputError(f"--task: unknown task {name!r}; expected one of {TASKS}")
    if name in JSONL_TASKS and not path:
      raise InputError(f"--task: {name} needs a JSONL file: --task={name}=PATH")
    if name not in JSONL_TASKS and path:
      raise InputError(f"--task: {name} takes no file (got {path!r})")
    out[name] = path or None
  if not out:
    raise InputError("--task: no tasks given")
  return out


def _read_jsonl(path: str) -> Iterable[tuple[int, dict[str, Any]]]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"task file {path} does not exist")
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          yield n, json.loads(line)
        except json.JSONDecodeError as e:
          raise InputError(f"{path}:{n}: not valid JSON ({e})") from e


def _field(rec: dict[str, Any], name: str, where: str) -> Any:
  if name not in rec:
    raise InputError(f"{where}: missing field `{name}` (have {sorted(rec)})")
  return rec[name]


def _hellaswag_text(text: str) -> str:
  """lm-evaluation-harness's HellaSwag clean-up of WikiHow artefacts."""
  text = text.strip().replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def load_mc_jsonl(task: str, path: str, limit: int | None = None) -> list[MCItem]:
  """Multiple-choice items from an lm-evaluation-harness style JSONL file."""
  items = []
  for n, rec in _read_jsonl(path):
    where = f"{path}:{n}"
    if task == "hellaswag":
      if "ctx_a" in rec and "ctx_b" in rec:
        ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
        if rec.get("activity_label"):
          ctx = f"{rec['activity_label']}: {ctx}"
      else:
        ctx = _field(rec, "ctx", where)
      ctx = _hellaswag_text(ctx)
      endings = _field(rec, "endings", where)
      choices = tuple(" " + _hellaswag_text(e) for e in endings)
      gold = int(_field(rec, "label", where))
      items.append(MCItem(ctx, choices, gold, ctx))
    elif task == "arc":
      question = _field(rec, "question", where)
      choices = rec.get("choices")
      if isinstance(question, dict):  # the original ARC layout {stem, choices: [...]}
        choices = [{"text": c["text"], "label": c["label"]} for c in question["choices"]]
        question = question["stem"]
      if isinstance(choices, dict):
        texts, labels = list(choices["text"]), [str(x) for x in choices["label"]]
      elif isinstance(choices, list):
        texts, labels = [c["text"] for c in choices], [str(c["label"]) for c in choices]
      else:
        raise InputError(f"{where}: field `choices` must be {{text, label}} or a list")
      key = str(_field(rec, "answerKey", where))
      if key not in labels:
        raise InputError(f"{where}: answerKey {key!r} is not among the labels {labels}")
      items.append(MCItem(f"Question: {question}\nAnswer:", tuple(" " + t for t in texts),
                          labels.index(key), question))
    elif task == "boolq":
      question = str(_field(rec, "question", where)).strip()
      passage = str(_field(rec, "passage", where)).strip()
      answer = _field(rec, "answer", where)
      if isinstance(answer, str):
        if answer.lower() not in ("true", "false", "yes", "no"):
          raise InputError(f"{where}: field `answer` must be a boolean, got {answer!r}")
        answer = answer.lower() in ("true", "yes")
      q = question[0].upper() + question[1:] if question else question
      items.append(MCItem(f"{passage}\nQuestion: {q}?\nAnswer:", (" no", " yes"),
                          int(bool(answer)), question))
    else:
      raise ValueError(f"unknown multiple-choice task {task!r}; expected one of {JSONL_TASKS}")
    if limit and len(items) >= limit:
      break
  if not items:
    raise InputError(f"task file {path} holds no items")
  return items


def load_knowledge_qa(data_root: str, limit: int | None = None,
                      seed: int = 0) -> tuple[list[QAItem], list[MCItem]]:
  """The knowledge world's held-out questions (prepare-data's `qa` dataset, split eval).

  Returns (QA items for exact match, MC items with the gold answer among its
  distractors at a seeded random position). `limit` keeps an equal share per group.
  """
  path = prepared.dataset_path(data_root, "qa")
  source = tfds_builders.open_split(path, "eval")
  dec = lambda x: x.decode("utf-8") if isinstance(x, bytes) else str(x)
  records = [source[i] for i in range(len(source))]
  if limit:
    by_group: dict[str, list[Any]] = {}
    for r in records:
      by_group.setdefault(dec(r["group"]), []).append(r)
    share = max(1, limit // max(len(by_group), 1))
    records = [r for g in sorted(by_group) for r in by_group[g][:share]]
  rng = np.random.default_rng(seed)
  qa, mc = [], []
  for r in records:
    question, prompt, answer = dec(r["question"]), dec(r["prompt"]), dec(r["answer"])
    group = dec(r["group"])
    qa.append(QAItem(prompt, answer, question, group))
    options = [answer] + [dec(d) for d in r["distractors"]]
    perm = rng.permutation(len(options))
    mc.append(MCItem(prompt, tuple(" " + options[j] for j in perm),
                     int(np.nonzero(perm == 0)[0][0]), question, group))
  if not qa:
    raise InputError(f"{path}: the eval split holds no questions")
  return qa, mc


def load_heldout_sequences(data_root: str, limit: int | None = None) -> list[np.ndarray]:
  """Held-out packed sequences (tokens + next_token) from prepare-data's validation split.

  Padding is dropped: it is never text, and packing with `data.pack_align_chunks`
  puts it inside sequences, where scoring it would count tokens no model predicts.
  """
  source = loader_lib.PackedSource(prepared.dataset_path(data_root, "packed"), "validation")
  n = len(source) if not limit else min(limit, len(source))
  out = []
  for i in range(n):
    r = source[i]
    seq = np.concatenate([r["tokens"], [r["next_token"]]]).astype(np.int64)
    seq = seq[seq != source.pad_id]
    if len(seq) > 1:
      out.append(seq)
  return out


def load_tasks(tasks: dict[str, str | None], data_root: str,
               limit: int | None = None) -> dict[str, Any]:
  """Items of every task `parse_tasks` returned, at most `limit` per task.

  kw_qa and kw_coverage get the knowledge world's QA items, kw_mc its MC items.
  """
  data: dict[str, Any] = {}
  kw: tuple[list[QAItem], list[MCItem]] | None = None
  for name, path in tasks.items():
    if name == "perplexity":
      data[name] = load_heldout_sequences(data_root, limit)
    elif name in KW_TASKS:
      kw = kw or load_knowledge_qa(data_root, limit)
      data[name] = kw[1] if name == "kw_mc" else kw[0]
    else:
      data[name] = load_mc_jsonl(name, path, limit)
  return data
