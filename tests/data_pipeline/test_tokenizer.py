"""Tokenizer: special ids, byte fallback, determinism, files, compatibility checks."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from data_pipeline import knowledge_world
from data_pipeline import tokenizer as tok_lib
from m3jax.core import config as config_lib

VOCAB = 512


def _texts():
  world = knowledge_world.generate(dict(n_seen=20, n_memory_taught=20, n_unseen=10))
  return [d.text for d in world.train_documents + world.kb_documents]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tok") / "m3")
  return tok_lib.train_tokenizer(_texts(), out, vocab_size=VOCAB), out


def test_special_ids_and_reference_prefix(trained):
  tok, _ = trained
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.id_to_piece(4) == "Reference:"
  assert tok.reference_prefix_ids == (2, 4)
  assert tok.vocab_size == VOCAB
  assert 4 in tok.encode("Reference: Alan Ashwick was born in Corvale.")


def test_any_utf8_text_round_trips_through_byte_fallback(trained):
  tok, _ = trained
  text = "Zürich — 日本語 🙂 tab\there\nnew line, ĳ ﬁ  two  spaces"
  ids = tok.encode(text)
  assert tok.unk_id not in ids
  assert tok.decode(ids) == text
  assert tok.decode_batch(tok.encode_batch([text, "a b"])) == [text, "a b"]


def test_bos_eos_and_pad_handling(trained):
  tok, _ = trained
  ids = tok.encode("hello", add_bos=True, add_eos=True)
  assert ids[0] == 2 and ids[-1] == 3
  assert tok.decode(tok.encode("hello") + [0, 0]) == "hello"


def test_training_is_deterministic(trained, tmp_path):
  tok, out = trained
  again = tok_lib.train_tokenizer(_texts(), str(tmp_path / "again"), vocab_size=VOCAB)
  assert again.hash == tok.hash
  with open(out + ".model", "rb") as a, open(tmp_path / "again.model", "rb") as b:
    assert a.read() == b.read()


def test_files_record_hash_and_ids(trained):
  tok, out = trained
  with open(out + ".model", "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  with open(out + ".json") as f:
    meta = json.load(f)
  assert meta["hash"] == digest == tok.hash
  assert meta["vocab_size"] == VOCAB and meta["reference_prefix_ids"] == [2, 4]
  loaded = tok_lib.Tokenizer.load(out + ".model")
  assert loaded.hash == tok.hash and tok_lib.Tokenizer.load(out).hash == tok.hash


def test_replaced_model_file_is_detected_by_sidecar(trained, tmp_path):
  tok, out = trained
  other = tok_lib.train_tokenizer(_texts()[:40], str(tmp_path / "other"), vocab_size=VOCAB)
  dst = tmp_path / "mixed"
  with open(str(tmp_path / "other.model"), "rb") as f:
    (tmp_path / "mixed.model").write_bytes(f.read())
  with open(out + ".json") as f:
    (tmp_path / "mixed.json").write_text(f.read())
  assert other.hash != tok.hash
  with pytest.raises(tok_lib.TokenizerMismatchError, match="mixed.json"):
    tok_lib.Tokenizer.load(str(dst))


def test_missing_model_file_names_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothere.model"):
    tok_lib.Tokenizer.load(str(tmp_path / "nothere"))


def test_empty_input_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="no training text"):
    tok_lib.train_tokenizer(["", "  \n"], str(tmp_path / "empty"), vocab_size=VOCAB)


def test_check_compatible_accepts_matching_model(trained, repo_root):
  tok, _ = trained
  cfg = config_lib.load_config(str(repo_root / "configs" / "tiny.py"),
                               [f"model.vocab_size={VOCAB}"])
  tok_lib.check_compatible(tok, config_lib.model_config(cfg))
  tok_lib.check_compatible(tok, cfg)


@pytest.mark.parametrize("override,field", [
    ("model.vocab_size=1024", "model.vocab_size"),
    ("model.reference_prefix_ids=(2, 5)", "model.reference_prefix_ids"),
    ("model.bos_id=1", "model.bos_id"),
])
def test_check_compatible_refuses_mismatch_naming_both(trained, repo_root, override, field):
  tok, out = trained
  cfg = config_lib.load_config(str(repo_root / "configs" / "tiny.py"),
                               [f"model.vocab_size={VOCAB}", override])
  with pytest.raises(tok_lib.TokenizerMismatchError) as e:
    tok_lib.check_compatible(tok, config_lib.model_config(cfg))
  assert field in str(e.value) and os.path.basename(out) in str(e.value)


def test_check_tokenizer_hash_names_the_artifact(trained):
  tok, _ = trained
  with pytest.raises(tok_lib.TokenizerMismatchError, match="memory bank /x/bank"):
    tok_lib.check_tokenizer_hash("0" * 64, tok, "memory bank /x/bank")
  tok_lib.check_tokenizer_hash(tok.hash, tok, "memory bank /x/bank")


@pytest.mark.slow
def test_command_trains_from_files(tmp_path):
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n\n".join(_texts()))
  out = tmp_path / "cli"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run(
      [sys.executable, "-m", "m3jax.commands.tokenizer", f"--input={corpus}",
       f"--vocab_size={VOCAB}", f"--out={out}"], capture_output=True, text=True, timeout=120,
      env=env)
  assert res.returncode == 0, res.stderr[-2000:]
  meta = json.loads(res.stdout)
  assert meta["vocab_size"] == VOCAB and meta["reference_prefix_ids"] == [2, 4]
  assert tok_lib.Tokenizer.load(str(out)).hash == meta["hash"]


@pytest.mark.slow
def test_command_names_missing_input(tmp_path):
  res = subprocess.run(
      [sys.executable, "-m", "m3jax.commands.tokenizer", f"--input={tmp_path}/absent.txt",
       f"--vocab_size={VOCAB}", f"--out={tmp_path}/x"], capture_output=True, text=True,
      timeout=120)
  assert res.returncode != 0
  assert "absent.txt" in res.stderr


def test_line_starts_are_tokenized_like_the_training_text(trained):
  # Trained on whole documents: "Answer" after a newline is a word the tokenizer knows,
  # not byte-and-letter fragments, and the newline is its own piece.
  tok, _ = trained
  ids = tok.encode("Question: Where was Alia Ashwick born?\nAnswer: Corvale.")
  pieces = [tok.id_to_piece(i) for i in ids]
  assert "\n" in pieces and tok.id_to_piece(5) == "\n"
  assert pieces[pieces.index("\n") + 1] == "Answer"
  assert tok.decode(ids) == "Question: Where was Alia Ashwick born?\nAnswer: Corvale."


# ------------------------------------------------------------------ long documents


def _old_split_for_training(text):
  """The splitter before it was made linear (re-encoded the whole rest at every cut)."""
  limit = tok_lib._MAX_SENTENCE_BYTES
  if not text.strip():
    return
  while len(text.encode("utf-8")) > limit:
    window = text[:limit // 4]
    cut = window.rfind("\n") + 1 or window.rfind(" ") + 1 or len(window)
    if text[:cut].strip():
      yield text[:cut]
    text = text[cut:]
  if text.strip():
    yield text


def _random_text(rng, n, alphabet=("ab", "cd ", " ", "\n", "é", "日本", "🙂", "  ", "\n\n", "x" * 50)):
  return "".join(rng.choice(alphabet, size=n))


def test_training_split_is_unchanged_on_ordinary_and_long_texts():
  import numpy as np
  rng = np.random.default_rng(0)
  texts = _texts()[:50] + ["", "   ", "a" * 9000, "🙂" * 5000, " " * 20000 + "z",
                           "\n" * 3000 + "x" * 30000]
  texts += [_random_text(rng, int(n)) for n in rng.integers(1, 9000, size=40)]
  for text in texts:
    assert list(tok_lib._split_for_training(text)) == list(_old_split_for_training(text))


def test_training_split_reads_each_character_a_bounded_number_of_times(monkeypatch):
  """Doubling a line doubles the characters the splitter encodes (it used to quadruple)."""
  read = []
  real = tok_lib._utf8_len
  monkeypatch.setattr(tok_lib, "_utf8_len", lambda s: read.append(len(s)) or real(s))
  counts = {}
  for n in (1 << 18, 1 << 19, 1 << 20):
    read.clear()
    text = ("word " * n)[:n]
    pieces = list(tok_lib._split_for_training(text))
    assert "".join(pieces) == text
    counts[n] = sum(read)
    assert counts[n] <= 2 * n
  for n in (1 << 18, 1 << 19):  # the old splitter read ~n^2/4096 characters: 4x per doubling
    assert 1.95 < counts[2 * n] / counts[n] < 2.05


def test_cut_before_spaces_joins_back_and_never_leaves_an_empty_piece():
  import numpy as np
  rng = np.random.default_rng(1)
  for text in [_random_text(rng, 5000), "x" * 5000, "x" * 3000 + " " + "y" * 10, " " * 900,
               "a " * 2000]:
    pieces = tok_lib._cut_before_spaces(text, 256)
    assert " ".join(pieces) == text and all(pieces)
  assert max(len(p) for p in tok_lib._cut_before_spaces("a " * 2000, 256)) <= 256
  assert tok_lib._cut_before_spaces("x" * 5000, 256) == ["x" * 5000]  # no space: whole
  assert tok_lib._cut_before_spaces("x" * 3000 + " y", 256) == ["x" * 3000, "y"]
  assert tok_lib._cut_before_spaces("x" * 3000 + " ", 256) == ["x" * 3000 + " "]


def test_long_documents_encode_in_pieces_to_the_same_ids(trained, monkeypatch, tmp_path):
  """encode_batch cuts a long text before spaces; the ids equal the whole text's, for every
  model type m3jax trains, and a progress line is printed."""
  import numpy as np
  rng = np.random.default_rng(2)
  words = np.array(_texts()[0].split(" ") + ["", "\n", "7", "Reference:", "日本"])
  texts = [" ".join(rng.choice(words, size=int(n))) for n in (3000, 50, 4000, 10)]
  texts += [" " + texts[0] + "  ", texts[2] + " "]
  toks = [trained[0]] + [tok_lib.train_tokenizer(_texts()[:60], str(tmp_path / m),
                                                 vocab_size=400, model_type=m)
                         for m in ("unigram", "char")]
  lines = []
  monkeypatch.setattr(tok_lib, "LONG_TEXT_CHARS", 1000)
  monkeypatch.setattr(tok_lib, "_PIECE_CHARS", 97)
  monkeypatch.setattr(tok_lib, "_PROGRESS_EVERY_S", 0.0)
  monkeypatch.setattr("builtins.print", lambda line, **kw: lines.append(line))
  for tok in toks:
    assert tok._in_pieces
    whole = tok._sp.encode(texts, add_bos=True, add_eos=True)
    assert tok.encode_batch(texts, add_bos=True, add_eos=True) == whole
    assert tok.encode(texts[2]) == tok._sp.encode(texts[2])
  assert any(line.startswith(f"tokenizing a {len(texts[0]):,}-character document") and
             "ETA" in line for line in lines)
