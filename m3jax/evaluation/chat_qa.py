"""Chat question answering: exact match of generated replies, per entity group.

Rows are one-turn chats with a gold `answer` and the reply's `lead` (the
knowledge world's chat eval, data_pipeline.knowledge_chat): a reply is correct
when it equals "<lead> <answer>." after SQuAD-style normalisation
(m3jax.evaluation.text_metrics). Generation is greedy, through the chat template,
in the TextGenerator's memory mode; with a leakage filter, each question is what
references are filtered against (as in `m3jax eval`).
"""

from __future__ import annotations

from typing import Any, Sequence

from data_pipeline import chat as chat_lib
from m3jax.evaluation import text_metrics


def read_chat_eval(path: str) -> list[dict[str, Any]]:
  """Rows of a chat eval JSONL: messages, answer, lead, group (file and line on errors)."""
  rows = []
  for where, line in chat_lib.iter_jsonl(path):
    rec = chat_lib.parse_json_object(line, where)
    for k in ("messages", "answer", "lead"):
      if k not in rec:
        raise chat_lib.ChatFormatError(f"{where}: no `{k}` field (a chat eval row has "
                                       "messages, answer and lead)")
    rec["messages"] = chat_lib.parse_messages(rec["messages"], where)
    rows.append(rec)
  return rows


def chat_exact_match(textgen: Any, rows: Sequence[dict[str, Any]], *, max_new_tokens: int = 24,
                     batch_size: int = 32, leakage_filter: bool = True) -> dict[str, Any]:
  """{"exact_match": {"all", <group>...}, "n": ..., "examples": first replies}."""
  prompts = [r["messages"] for r in rows]
  filters = [chat_lib.query_text(p) for p in prompts] if leakage_filter else None
  got = textgen.complete(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                         filter_texts=filters)
  correct = [float(text_metrics.exact_match(c.text, f"{r['lead']} {r['answer']}."))
             for c, r in zip(got, rows)]
  groups = [str(r.get("group", "")) for r in rows]
  return dict(exact_match=text_metrics.group_means(correct, groups), n=len(rows),
              examples=[dict(question=chat_lib.query_text(p), reply=c.text, gold=r["answer"])
                        for p, c, r in list(zip(prompts, got, rows))[:5]])
