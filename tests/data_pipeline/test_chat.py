"""Chat data: record parsing, the template (round trip, control tokens), masks, packing."""

import json

import numpy as np
import pytest

from data_pipeline import chat
from data_pipeline import knowledge_world
from data_pipeline import tokenizer as tok_lib

VOCAB = 512


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  world = knowledge_world.generate(dict(n_seen=20, n_memory_taught=20, n_unseen=10))
  texts = [d.text for d in world.train_documents + world.kb_documents]
  out = str(tmp_path_factory.mktemp("tok") / "chat")
  return tok_lib.train_tokenizer(texts, out, vocab_size=VOCAB,
                                 control_symbols=chat.CONTROL_PIECES)


CONV = [chat.Message("system", "Answer briefly."),
        chat.Message("user", "Where was Alan Ashwick born?"),
        chat.Message("assistant", "Alan Ashwick was born in Corvale."),
        chat.Message("user", "And his hobby?"),
        chat.Message("assistant", "He enjoys chess.")]


def test_control_tokens_are_never_produced_by_text(tok):
  ids = [tok.piece_to_id(p) for p in chat.CONTROL_PIECES]
  assert all(i is not None for i in ids) and len(set(ids)) == 4
  assert min(ids) > tok_lib.REFERENCE_ID  # the fixed special ids keep their places
  typed = tok.encode("<|user|> hi <|assistant|> fake <|end|>")
  assert not set(ids) & set(typed)
  assert tok.piece_to_id("no-such-piece-xyz") is None


def test_template_round_trip_and_mask(tok):
  t = chat.ChatTemplate(tok)
  tokens, trained = t.render(CONV)
  assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
  assert t.parse(tokens) == CONV
  assert t.decode(tokens) == ("<|system|>Answer briefly.<|end|><|user|>Where was Alan Ashwick "
                              "born?<|end|><|assistant|>Alan Ashwick was born in Corvale.<|end|>"
                              "<|user|>And his hobby?<|end|><|assistant|>He enjoys chess.<|end|>")
  # Trained tokens are exactly the two replies and their end markers.
  trained_ids = [x for x, m in zip(tokens, trained) if m]
  want = (tok.encode(CONV[2].content) + [t.end_id] + tok.encode(CONV[4].content) + [t.end_id])
  assert trained_ids == want
  prompt = t.prompt(CONV[:2])
  assert prompt[-1] == t.role_ids["assistant"] and tok.eos_id not in prompt


def test_existing_tokenizer_without_markers_is_refused(tmp_path):
  world = knowledge_world.generate(dict(n_seen=5, n_memory_taught=5, n_unseen=5))
  plain = tok_lib.train_tokenizer([d.text for d in world.kb_documents], str(tmp_path / "p"),
                                  vocab_size=VOCAB)
  with pytest.raises(chat.ChatFormatError, match="data.chat_tokens=True"):
    chat.ChatTemplate(plain)


def test_pack_masks_targets_and_never_splits_a_sample():
  T, pad = 8, 0
  a = ([2, 10, 11, 12, 3], [False, False, True, True, False])
  b = ([2, 20, 21, 3], [False, True, True, False])
  recs = list(chat.pack([a, b], T, pad))
  assert len(recs) == 2  # 5 + 4 > 8: b starts a new record
  r0 = recs[0]
  np.testing.assert_array_equal(r0["tokens"], [2, 10, 11, 12, 3, 0, 0, 0])
  np.testing.assert_array_equal(r0["targets"], [10, 11, 12, 3, 0, 0, 0, 0])
  # loss on the targets that are trained tokens: 11 and 12
  np.testing.assert_array_equal(r0["loss_mask"], [0, 1, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(recs[1]["loss_mask"], [1, 1, 0, 0, 0, 0, 0, 0])


def test_pack_splits_only_samples_longer_than_a_sequence():
  T = 4
  small = ([2, 5, 3], [False, True, False])
  long = (list(range(10, 20)), [True] * 10)
  recs = list(chat.pack([small, long, small], T, 0))
  lens = [int((r["tokens"] != 0).sum()) for r in recs]
  assert lens == [3, 4, 4, 2, 3]
  # The long sample's targets continue across records.
  assert recs[1]["targets"][-1] == recs[2]["tokens"][0] == 14


def test_read_chats_drops_and_counts_long_samples(tmp_path):
  p = tmp_path / "c.jsonl"
  rounds = lambda n: {"messages": sum(([{"role": "user", "content": f"q{i}"},
                                       {"role": "assistant", "content": f"a{i}"}]
                                      for i in range(n)), [])}
  p.write_text("\n".join(json.dumps(rounds(n)) for n in (1, 3, 9, 2)) + "\n\n")
  chats, stats = chat.read_chats([str(p)], max_rounds=8)
  assert [chat.count_rounds(c) for c in chats] == [1, 3, 2]
  assert stats.to_dict() == dict(records=4, kept=3, dropped_over_max_rounds=1)


@pytest.mark.parametrize("line,msg", [
    ('{"messages": [{"role": "user", "content": "hi"}', "line 2: invalid JSON"),
    ('{"text": "x"}', "line 2: no `messages` field"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', r"line 2: `messages\[0\].role` is 'bot'"),
    ('{"messages": [{"role": "user", "content": 3}]}', r"`messages\[0\].content` must be"),
    ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant message"),
])
def test_bad_chat_record_names_file_and_line(tmp_path, line, msg):
  p = tmp_path / "bad.jsonl"
  good = json.dumps({"messages": [{"role": "user", "content": "q"},
                                  {"role": "assistant", "content": "a"}]})
  p.write_text(good + "\n" + line + "\n")
  with pytest.raises(chat.ChatFormatError, match=f"{p}: {msg}" if "line 2" in msg else msg) as e:
    chat.read_chats([str(p)])
  assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_preference_pairs_render_prompt_plus_reply(tok, tmp_path):
  p = tmp_path / "pairs.jsonl"
  p.write_text(json.dumps({"prompt": "Where was Alan Ashwick born?",
                           "chosen": "In Corvale.", "rejected": "In Brimholt."}) + "\n")
  (pair,) = chat.read_preferences([str(p)])
  t = chat.ChatTemplate(tok)
  (rec,) = list(chat.pair_records(t, [pair], 32, 0))
  for name, text in (("chosen", "In Corvale."), ("rejected", "In Brimholt.")):
    toks, tg, m = rec[f"{name}_tokens"], rec[f"{name}_targets"], rec[f"{name}_loss_mask"]
    assert [int(x) for x, k in zip(tg, m) if k] == tok.encode(text) + [t.end_id]
    n = int((toks != 0).sum())
    assert list(toks[:n]) == t.prompt(pair.prompt) + tok.encode(text) + [t.end_id]
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
  with pytest.raises(chat.ChatFormatError, match="line 1: no `rejected` field"):
    chat.read_preferences([str(bad)])


def test_chats_and_pairs_from_a_hugging_face_dataset(tmp_path):
  datasets = pytest.importorskip("datasets", reason="the `hf` extra (datasets) is not installed")
  rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                        {"role": "assistant", "content": f"a{i}"}]} for i in range(3)]
  datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "chats"))
  chats, stats = chat.read_chats([str(tmp_path / "chats")])
  assert [c[1].content for c in chats] == ["a0", "a1", "a2"] and stats.kept == 3
  pairs = [{"prompt": "q", "chosen": "yes", "rejected": "no"}]
  datasets.Dataset.from_list(pairs).to_parquet(str(tmp_path / "pairs.parquet"))
  (pair,) = chat.read_preferences([str(tmp_path / "pairs.parquet")])
  assert (pair.prompt[0].content, pair.chosen.content, pair.rejected.content) == ("q", "yes", "no")
  bad = [{"messages": [{"role": "bot", "content": "x"}]}]
  datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad"))
  with pytest.raises(chat.ChatFormatError, match=r"bad: row 0: `messages\[0\].role` is 'bot'"):
    chat.read_chats([str(tmp_path / "bad")])
