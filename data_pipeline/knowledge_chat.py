"""The knowledge world as chats: post-training data and its held-out evaluation.

A user asks about a person; the assistant answers in a sentence ("<lead> <value>.",
the knowledge world's answer form). Written files (JSONL, data_pipeline.chat):

* `sft.jsonl`      one chat per *training* question of seen and memory-taught people
                   (the attributes their QA text already teaches);
* `dpo.jsonl`      preference pairs on memory-taught people's held-out attributes: the
                   chosen reply states the fact (which only the knowledge base holds),
                   the rejected one a plausible wrong value of the same attribute;
* `dpo_eval.jsonl` the same pairs for unseen people (never trained on);
* `eval.jsonl`     every held-out question as a one-turn chat with its `answer`,
                   `group` and `lead`, for exact-match accuracy per group.
"""

from __future__ import annotations

import json
import os
from typing import Any

from data_pipeline import knowledge_world as kw

FILES = ("sft.jsonl", "dpo.jsonl", "dpo_eval.jsonl", "eval.jsonl")


def reply(q: kw.Question, value: str) -> str:
  return f"{q.lead} {value}."


def _user(q: kw.Question) -> list[dict[str, str]]:
  return [{"role": "user", "content": q.question}]


def _pair(q: kw.Question) -> dict[str, Any]:
  return dict(prompt=_user(q), chosen=reply(q, q.answer), rejected=reply(q, q.distractors[0]),
              group=q.group)


def write_chat_files(world: kw.World, out_dir: str) -> dict[str, int]:
  """Writes the four files into `out_dir`; returns the record count of each."""
  os.makedirs(out_dir, exist_ok=True)
  rows: dict[str, list[dict[str, Any]]] = {f: [] for f in FILES}
  for q in world.train_questions:
    if q.group in ("seen", "memory_taught"):
      rows["sft.jsonl"].append(dict(messages=_user(q) + [
          {"role": "assistant", "content": reply(q, q.answer)}]))
  for q in world.eval_questions:
    rows["eval.jsonl"].append(dict(messages=_user(q), answer=q.answer, lead=q.lead,
                                   group=q.group, attribute=q.attribute))
    if q.distractors and q.group == "memory_taught":
      rows["dpo.jsonl"].append(_pair(q))
    elif q.distractors and q.group == "unseen":
      rows["dpo_eval.jsonl"].append(_pair(q))
  for name, recs in rows.items():
    with open(os.path.join(out_dir, name), "w") as f:
      for r in recs:
        f.write(json.dumps(r) + "\n")
  return {k: len(v) for k, v in rows.items()}
