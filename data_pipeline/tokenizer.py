"""SentencePiece tokenizer: training, the `Tokenizer` wrapper and compatibility checks.

Every m3jax tokenizer has the same fixed special ids (docs/model.md "Tokenizer contract"):
pad=0, unk=1, bos=2, eos=3, the user-defined piece "Reference:"=4 (so the reference sink
prefix `<s>Reference:` is ids (2, 4)) and the newline "\n"=5. Byte fallback makes every UTF-8 string
encodable; normalization is the identity (no NFKC, whitespace kept), so decoding
gives back exactly the text that was encoded.

A tokenizer is saved as `PATH.model` (the SentencePiece proto) plus `PATH.json`
(its sha256 `hash`, vocab size and special ids). The hash identifies the tokenizer
everywhere downstream: datasets, neighbor tables and memory banks record it, and
`check_tokenizer_hash` refuses artifacts made with another tokenizer.

Long documents cost time linear in their length: the training splitter walks each text
once, and `encode_batch` encodes a document of more than `LONG_TEXT_CHARS` characters in
pieces cut before spaces, on all cores, with a progress line, giving exactly the ids of
encoding it whole (see `_cut_before_spaces`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from m3jax.core import artifacts as atomic_io
from m3jax.core import errors
from m3jax.core.errors import InputError
from m3jax.core.progress import Progress

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
REFERENCE_SYMBOL = "Reference:"
REFERENCE_ID = 4
NEWLINE_SYMBOL = "\n"  # its own piece (id 5): never merged into words or punctuation
MODEL_TYPES = ("bpe", "unigram", "char", "word")
# SentencePiece skips input sentences longer than this many bytes; we cut lines to fit.
_MAX_SENTENCE_BYTES = 8192
# Fixed so that the trained model (its stored trainer spec included) and therefore its
# hash does not depend on the machine's core count.
_TRAIN_THREADS = 16
# Documents longer than this many characters are encoded in pieces of about
# _PIECE_CHARS characters (on all cores, with a progress line every _PROGRESS_EVERY_S).
LONG_TEXT_CHARS = 1 << 20
_PIECE_CHARS = 1 << 17
_PROGRESS_EVERY_S = 10.0


class TokenizerMismatchError(errors.UserError, ValueError):
  """A tokenizer does not match a model config or an artifact built with another one."""


def _utf8_len(text: str) -> int:
  """Bytes of `text` in UTF-8 (the splitter's only encoder; tests count what it reads)."""
  return len(text.encode("utf-8"))


def _split_for_training(text: str) -> Iterator[str]:
  """Yields `text` in pieces that fit SentencePiece's sentence limit, newlines kept.

  Whole documents (not lines) are the training sentences, so a word at the start of
  a line is learnt as it is encoded later (after "\n", without the "▁" that
  SentencePiece puts before a sentence's first word). Long documents are cut at
  the last newline, else space, within the next `_MAX_SENTENCE_BYTES // 4`
  characters (at most the limit in bytes, whatever the characters) while the rest
  is over the limit. Linear: every character is measured twice, once for the whole
  text and once in its piece.
  """
  if not text.strip():
    return
  window, pos, left = _MAX_SENTENCE_BYTES // 4, 0, _utf8_len(text)
  while left > _MAX_SENTENCE_BYTES:  # the rest is > window characters: a full window
    end = pos + window
    cut = text.rfind("\n", pos, end) + 1 or text.rfind(" ", pos, end) + 1 or end
    piece = text[pos:cut]
    if piece.strip():
      yield piece
    left -= _utf8_len(piece)
    pos = cut
  rest = text[pos:]
  if rest.strip():
    yield rest


def _cut_before_spaces(text: str, piece_chars: int) -> list[str]:
  """`text` as non-empty pieces of about `piece_chars` characters, each cut at a space
  that is dropped: `text == " ".join(pieces)`.

  For a tokenizer that `_encodes_in_pieces`, encode(a + " " + b) == encode(a) + encode(b)
  whenever a and b are non-empty: every "▁" starts a new word, so no piece spans the
  cut, and the "▁" that encode puts before b's first word stands for the dropped space.
  A text without spaces stays whole. Linear in len(text).
  """
  pieces, pos, n = [], 0, len(text)
  while n - pos > piece_chars:
    cut = text.rfind(" ", pos + 1, pos + piece_chars)
    if cut < 0:
      cut = text.find(" ", pos + piece_chars)
    if cut < 0 or cut >= n - 1:
      break
    pieces.append(text[pos:cut])
    pos = cut + 1
  pieces.append(text[pos:])
  return pieces


def _encodes_in_pieces(model_proto: bytes) -> bool:
  """Whether the model keeps the text as is and starts a word at every space, so that
  `_cut_before_spaces` pieces encode to the ids of the whole text (true for every
  tokenizer m3jax trains; a given one with other settings is encoded whole)."""
  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(model_proto)
  n, t = m.normalizer_spec, m.trainer_spec
  spaced = any(p.type == p.USER_DEFINED and (" " in p.piece or "\u2581" in p.piece)
               for p in m.pieces)
  return (n.name == "identity" and n.add_dummy_prefix and not n.remove_extra_whitespaces
          and t.split_by_whitespace and not t.treat_whitespace_as_suffix
          and not t.allow_whitespace_only_pieces and not spaced)


def train_tokenizer(texts: Iterable[str], out: str, *, vocab_size: int,
                    model_type: str = "bpe", max_sentences: int = 10_000_000,
                    seed: int = 0, description: str = "",
                    control_symbols: Sequence[str] = ()) -> "Tokenizer":
  """Trains a SentencePiece model on `texts` (documents) and writes `out`.model/.json.

  Deterministic: the same texts, settings and seed give byte-identical files.
  At most `max_sentences` training sentences (documents, or pieces of long ones)
  are used, drawn by SentencePiece's reservoir sampling (seeded) when the input has
  more. `control_symbols` (e.g. the chat role markers of data_pipeline.chat) get ids
  after the fixed special ones; encoding text never produces them. The files are
  written atomically.
  """
  if model_type not in MODEL_TYPES:
    raise InputError(f"tokenizer model_type {model_type!r}: must be one of {MODEL_TYPES}")
  if vocab_size < 262 and model_type in ("bpe", "unigram"):
    raise InputError(f"tokenizer vocab_size={vocab_size} is too small: byte fallback alone "
                     "needs 256 byte pieces + 5 special pieces + some text pieces")
  out = _strip_model_suffix(out)
  counter: dict[str, Any] = {"sentences": 0, "error": None}

  def sentences() -> Iterator[str]:
    try:
      for text in texts:
        for line in _split_for_training(text):
          counter["sentences"] += 1
          yield line
    except Exception as e:  # SentencePiece would wrap it in a RuntimeError
      counter["error"] = e
      raise

  spm.set_random_generator_seed(seed + 1)  # 0 would mean "seed from the clock"
  proto = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_writer=proto, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        user_defined_symbols=[REFERENCE_SYMBOL, NEWLINE_SYMBOL, *control_symbols],
        byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, character_coverage=0.9995, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, max_sentence_length=_MAX_SENTENCE_BYTES,
        num_threads=_TRAIN_THREADS, train_extremely_large_corpus=False, minloglevel=2)
  except RuntimeError as e:
    if counter["error"] is not None:
      raise counter["error"] from None
    if counter["sentences"] == 0:
      raise InputError(f"tokenizer {out}.model: no training text (empty input)") from e
    hint = (" (too little text for this vocab_size: lower it or add text)"
            if "Vocabulary size too high" in str(e) else "")
    raise InputError(f"training tokenizer {out}.model (vocab_size={vocab_size}, "
                     f"{counter['sentences']} training sentences){hint}: {e}") from e
  data = _as_control_pieces(proto.getvalue(), control_symbols)
  tok = Tokenizer(data, path=out + ".model")
  meta = tok.metadata()
  meta.update(model_type=model_type, training_sentences=counter["sentences"],
              max_sentences=max_sentences, seed=seed, trained_on=description)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  atomic_io.write_bytes(out + ".model", data)
  atomic_io.write_json(out + ".json", meta)
  return tok


def _as_control_pieces(model_proto: bytes, pieces: Sequence[str]) -> bytes:
  """Turns user-defined `pieces` into control pieces (never produced from text).

  SentencePiece numbers control symbols before user-defined ones; training them as
  user-defined pieces after "Reference:" and "\n" and retyping them here keeps the
  fixed ids 4 and 5 of the tokenizer contract.
  """
  if not pieces:
    return model_proto
  m = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
  wanted = set(pieces)
  for p in m.pieces:
    if p.piece in wanted:
      p.type = sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL
  return m.SerializeToString()


def _strip_model_suffix(path: str) -> str:
  return path[:-len(".model")] if path.endswith(".model") else path


class Tokenizer:
  """A loaded SentencePiece model with m3jax's special ids and content hash.

  `encode` returns plain token ids (no bos/eos unless asked); `hash` is the
  sha256 of the .model bytes.
  """

  def __init__(self, model_proto: bytes, path: str = ""):
    self._proto = bytes(model_proto)
    self.path = path
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self.hash = hashlib.sha256(self._proto).hexdigest()
    self.vocab_size = int(self._sp.vocab_size())
    self.pad_id = int(self._sp.pad_id())
    self.unk_id = int(self._sp.unk_id())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    ref = int(self._sp.piece_to_id(REFERENCE_SYMBOL))
    self.reference_id = ref if ref != self.unk_id else -1
    self.reference_prefix_ids = (self.bos_id, self.reference_id)
    self._in_pieces = _encodes_in_pieces(self._proto)

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    """Loads `path` (`X.model` or the prefix `X`); checks `X.json` when present."""
    model = _strip_model_suffix(path) + ".model"
    if not os.path.isfile(model):
      raise FileNotFoundError(f"tokenizer model {model} not found")
    with open(model, "rb") as f:
      data = f.read()
    try:
      tok = cls(data, path=model)
    except RuntimeError as e:
      raise InputError(f"tokenizer model {model} is not a SentencePiece model: {e}") from e
    sidecar = _strip_model_suffix(path) + ".json"
    if os.path.isfile(sidecar):
      with open(sidecar) as f:
        meta = json.load(f)
      if meta.get("hash") not in (None, tok.hash):
        raise TokenizerMismatchError(
            f"tokenizer {model} has hash {tok.hash[:12]} but {sidecar} records "
            f"{meta['hash'][:12]}: the .model file was replaced; regenerate the .json")
    return tok

  @property
  def model_proto(self) -> bytes:
    return self._proto

  def metadata(self) -> dict[str, Any]:
    """What downstream artifacts record about the tokenizer."""
    return dict(hash=self.hash, vocab_size=self.vocab_size, pad_id=self.pad_id,
                unk_id=self.unk_id, bos_id=self.bos_id, eos_id=self.eos_id,
                reference_id=self.reference_id,
                reference_prefix_ids=list(self.reference_prefix_ids))

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    if len(text) > LONG_TEXT_CHARS:
      return self.encode_batch([text], add_bos=add_bos, add_eos=add_eos)[0]
    return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

  def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False,
                   add_eos: bool = False, num_threads: int = -1) -> list[list[int]]:
    """Encodes many texts at once (SentencePiece's C++ thread pool; -1 = all cores).

    A text of more than `LONG_TEXT_CHARS` characters is encoded in pieces with a
    progress line (`_encode_long`); the ids are those of encoding it whole.
    """
    if not texts:
      return []
    texts = list(texts)
    long = [i for i, t in enumerate(texts) if len(t) > LONG_TEXT_CHARS] \
        if self._in_pieces else []
    if not long:
      return self._sp.encode(texts, add_bos=add_bos, add_eos=add_eos,
                             num_threads=num_threads)
    whole = set(range(len(texts))) - set(long)
    out = self._sp.encode([t for i, t in enumerate(texts) if i in whole],
                          add_bos=add_bos, add_eos=add_eos, num_threads=num_threads)
    for i in long:
      out.insert(i, self._encode_long(texts[i], add_bos, add_eos, num_threads))
    return out

  def _encode_long(self, text: str, add_bos: bool, add_eos: bool,
                   num_threads: int) -> list[int]:
    """One long text, cut before spaces and encoded a group of pieces at a time."""
    pieces = _cut_before_spaces(text, _PIECE_CHARS)
    prog = Progress(len(text), desc=f"tokenizing a {len(text):,}-character document",
                    unit="chars", every_s=_PROGRESS_EVERY_S)
    ids = [self.bos_id] if add_bos else []
    group, shown = 4 * (os.cpu_count() or 1), False
    for lo in range(0, len(pieces), group):
      batch = pieces[lo:lo + group]
      for piece_ids in self._sp.encode(batch, num_threads=num_threads):
        ids.extend(piece_ids)
      shown |= prog.update(sum(len(p) + 1 for p in batch)) is not None
    if shown:
      prog.set(len(text))
      prog.close()
    if add_eos:
      ids.append(self.eos_id)
    return ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = [int(i) for i in ids if int(i) != self.pad_id]
    return self._sp.decode(ids)

  def decode_batch(self, batch: Sequence[Sequence[int]] | np.ndarray) -> list[str]:
    return [self.decode(ids) for ids in batch]

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int | None:
    """The id of `piece`, or None when the vocabulary lacks it."""
    i = int(self._sp.piece_to_id(piece))
    return i if self._sp.id_to_piece(i) == piece else None

  def piece_table(self) -> list[str]:
    return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

  def is_byte(self, i: int) -> bool:
    return self._sp.is_byte(int(i))

  def __repr__(self) -> str:
    return f"Tokenizer({self.path or '<memory>'}, vocab={self.vocab_size}, hash={self.hash[:12]})"


def _model_fields(model_config: Any) -> dict[str, Any]:
  """The tokenizer-relevant fields of a ModelConfig, a config (with .model) or a dict."""
  m = getattr(model_config, "model", model_config)
  get = (lambda k: m[k]) if isinstance(m, dict) else (lambda k: getattr(m, k))
  return dict(vocab_size=int(get("vocab_size")), pad_id=int(get("pad_id")),
              bos_id=int(get("bos_id")), eos_id=int(get("eos_id")),
              reference_prefix_ids=tuple(int(t) for t in get("reference_prefix_ids")))


def check_compatible(tokenizer: Tokenizer, model_config: Any) -> None:
  """Raises TokenizerMismatchError unless `tokenizer` fits `model_config`.

  The vocab size must be equal (not merely smaller: a tokenizer trained with a
  different size almost always means the wrong file), and pad/bos/eos and the
  `<s>Reference:` prefix ids must agree. The message names both sides.
  """
  want = _model_fields(model_config)
  have = dict(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id,
              bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
              reference_prefix_ids=tuple(tokenizer.reference_prefix_ids))
  diffs = [f"model.{k}={want[k]} but the tokenizer has {have[k]}"
           for k in want if want[k] != have[k]]
  if diffs:
    raise TokenizerMismatchError(
        f"tokenizer {tokenizer.path or '<memory>'} (hash {tokenizer.hash[:12]}) does not "
        f"match the model config: " + "; ".join(diffs))


def check_tokenizer_hash(expected_hash: str, tokenizer: Tokenizer, what: str) -> None:
  """Refuses an artifact (`what`, e.g. "memory bank /x") built with another tokenizer."""
  if expected_hash != tokenizer.hash:
    raise TokenizerMismatchError(
        f"{what} was built with tokenizer hash {expected_hash[:12]}, but the tokenizer in use "
        f"({tokenizer.path or '<memory>'}) has hash {tokenizer.hash[:12]}")
