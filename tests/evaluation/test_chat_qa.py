"""Chat QA: exact match of replies per group, and the eval file format."""

import json

import pytest

from data_pipeline import chat
from m3jax.evaluation import chat_qa
from m3jax.inference.generate import Completion


class _Echo:
  """A TextGenerator stand-in that replies from a table and records its inputs."""

  def __init__(self, replies):
    self.replies, self.calls = replies, []

  def complete(self, prompts, *, max_new_tokens, batch_size, filter_texts):
    self.calls.append((prompts, filter_texts))
    return [Completion(self.replies[p[-1].content], [], True) for p in prompts]


def test_exact_match_per_group_and_filter_texts(tmp_path):
  rows = [dict(messages=[chat.Message("user", "Where was Ann born?")], answer="Corvale",
               lead="Ann was born in", group="unseen"),
          dict(messages=[chat.Message("user", "Where does Bo work?")], answer="Acme",
               lead="Bo works at", group="seen")]
  gen = _Echo({"Where was Ann born?": "Ann was born in corvale.",
               "Where does Bo work?": "Bo works at Initech."})
  got = chat_qa.chat_exact_match(gen, rows)
  assert got["exact_match"] == {"all": 0.5, "seen": 0.0, "unseen": 1.0}
  assert gen.calls[0][1] == ["Where was Ann born?", "Where does Bo work?"]
  assert chat_qa.chat_exact_match(gen, rows, leakage_filter=False)["n"] == 2
  assert gen.calls[1][1] is None


def test_read_chat_eval_names_missing_fields(tmp_path):
  p = tmp_path / "eval.jsonl"
  p.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}], "answer": "a"}) + "\n")
  with pytest.raises(chat.ChatFormatError, match="line 1: no `lead` field"):
    chat_qa.read_chat_eval(str(p))
