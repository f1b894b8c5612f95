"""References: knowledge-base documents cut into chunks of at most R tokens.

A document is tokenized (no bos/eos) and cut, on token boundaries and never across
documents, into pieces of at most `max_tokens` (model.reference_length). Within the
last `max_tokens // 2` tokens of a window the cut goes after the last sentence end
(a piece ending in . ! ? or a newline); failing that before the last word start;
failing that before any token that is not a UTF-8 continuation byte (so a reference
never splits a character); only as a last resort at exactly `max_tokens`.

References get dense, stable ids in document order then piece order: ref_id i is
record i of the `m3jax_references` dataset. Each carries `doc_id` (index of its
document in the knowledge base), `doc_key` (content fingerprint of the document,
`corpus.doc_key`, equal for the same text in any dataset), `piece` (index inside
the document), `tokens` and `text` (the decoded text of exactly those tokens).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from data_pipeline import corpus as corpus_lib
from data_pipeline import tfds_builders
from data_pipeline.tokenizer import Tokenizer, check_tokenizer_hash

_SENTENCE_END = (".", "!", "?", '."', '!"', '?"', ".)", ".'", ";")


@dataclasses.dataclass(frozen=True)
class PieceClasses:
  """Per-token-id booleans used to choose cut points."""
  ends_sentence: np.ndarray
  starts_word: np.ndarray
  can_start: np.ndarray

  @classmethod
  def from_tokenizer(cls, tok: Tokenizer) -> "PieceClasses":
    n = tok.vocab_size
    ends, word, start = (np.zeros(n, bool) for _ in range(3))
    for i, piece in enumerate(tok.piece_table()):
      if tok.is_byte(i):
        b = int(piece[3:-1], 16)
        ends[i] = b == 0x0A
        start[i] = not 0x80 <= b <= 0xBF
        word[i] = b == 0x0A
      else:
        text = piece.replace("\u2581", " ")
        ends[i] = text.rstrip().endswith(_SENTENCE_END)
        word[i] = piece.startswith("\u2581")
        start[i] = True
    return cls(ends, word, start)


def cut_points(tokens: np.ndarray, max_tokens: int, classes: PieceClasses) -> list[int]:
  """Cut positions (exclusive piece ends) for one document's tokens; the last is len."""
  n = len(tokens)
  min_len = max(1, max_tokens // 2)
  cuts, pos = [], 0
  while pos < n:
    if n - pos <= max_tokens:
      cuts.append(n)
      break
    # Candidate ends j in [pos + min_len, pos + max_tokens]; token j starts the next piece.
    js = np.arange(pos + min_len, pos + max_tokens + 1)
    prev, nxt = tokens[js - 1], tokens[js]
    ok_start = classes.can_start[nxt]
    cut = pos + max_tokens
    for good in (classes.ends_sentence[prev] & ok_start, classes.starts_word[nxt], ok_start):
      hits = np.flatnonzero(good)
      if hits.size:
        cut = int(js[hits[-1]])
        break
    cuts.append(cut)
    pos = cut
  return cuts


def split_document(tokens: Sequence[int], max_tokens: int,
                   classes: PieceClasses) -> list[np.ndarray]:
  toks = np.asarray(tokens, np.int32)
  out, start = [], 0
  for end in cut_points(toks, max_tokens, classes):
    out.append(toks[start:end])
    start = end
  return out


class ReferenceShard:
  """Shard generator: the references of knowledge-base documents [start, stop).

  Ref ids continue from `first_ref_id`, which the builder learns from the previous
  shard (`counts`), so shards must run in order (TFDS's in-process writer does).
  """

  def __init__(self, source_spec: dict[str, Any], start: int, stop: int, tokenizer_path: str,
               max_tokens: int, state: dict[str, Any], threads: int = -1, progress=None):
    self.source_spec, self.start, self.stop = source_spec, start, stop
    self.tokenizer_path, self.max_tokens, self.state = tokenizer_path, max_tokens, state
    self.threads, self.progress = threads, progress

  def __call__(self) -> Iterator[tuple[int, dict[str, Any]]]:
    source = open_documents(self.source_spec)
    tok = Tokenizer.load(self.tokenizer_path)
    classes = PieceClasses.from_tokenizer(tok)
    st = self.state
    if st["next_doc"] != self.start:
      raise RuntimeError(f"reference shards ran out of order: expected documents from "
                         f"{st['next_doc']}, got {self.start}")
    k = 0
    for lo in range(self.start, self.stop, 512):
      idx = list(range(lo, min(lo + 512, self.stop)))
      texts = source.texts(idx)
      if self.progress is not None:
        self.progress.update(len(idx))
      for doc_id, text, ids in zip(idx, texts, tok.encode_batch(texts, num_threads=self.threads)):
        st["documents"] += 1
        if not ids:
          st["empty_documents"] += 1
          continue
        key = corpus_lib.doc_key(text)
        pieces = split_document(ids, self.max_tokens, classes)
        st["split_documents"] += len(pieces) > 1
        st["max_doc_tokens"] = max(st["max_doc_tokens"], len(ids))
        for p, piece in enumerate(tfds_builders.document_records(
            pieces, len(pieces), f"references of document {doc_id}", "refs")):
          yield k, dict(ref_id=st["next_ref"], doc_id=doc_id, doc_key=key, piece=p,
                        tokens=piece, text=tok.decode(piece))
          st["next_ref"] += 1
          st["tokens"] += len(piece)
          k += 1
    st["next_doc"] = self.stop


def open_documents(spec: dict[str, Any]) -> corpus_lib.TfdsDocuments:
  """Opens a document source from its manifest description (see `documents.doc_spec`)."""
  if spec.get("path"):
    return corpus_lib.TfdsDocuments(path=spec["path"], split=spec["split"],
                                    text_field=spec.get("text_field", "text"))
  return corpus_lib.TfdsDocuments(spec["name"], split=spec["split"],
                                  data_dir=spec.get("data_dir") or None,
                                  text_field=spec.get("text_field", "text"))


def write_references(data_dir: str, source_spec: dict[str, Any], tokenizer: Tokenizer,
                     max_tokens: int, *, shard_docs: int = 20000,
                     threads: int = -1, progress=None) -> tuple[str, dict[str, Any]]:
  """Cuts every document of `source_spec` into references; returns (dataset dir, stats)."""
  n_docs = len(open_documents(source_spec))
  state = dict(next_doc=0, next_ref=0, documents=0, empty_documents=0, split_documents=0,
               tokens=0, max_doc_tokens=0)
  shards = [ReferenceShard(source_spec, lo, min(lo + shard_docs, n_docs), tokenizer.path,
                           max_tokens, state, threads, progress)
            for lo in range(0, n_docs, shard_docs)]
  meta = dict(tokenizer_hash=tokenizer.hash, reference_length=max_tokens,
              pad_id=tokenizer.pad_id)
  path = tfds_builders.write_dataset(
      tfds_builders.M3jaxReferences, data_dir, features=tfds_builders.REFERENCE_FEATURES,
      shards={"train": shards}, metadata=meta,
      description="Knowledge-base references; record i has ref_id i.")
  stats = dict(num_references=state["next_ref"], num_documents=state["documents"],
               empty_documents=state["empty_documents"],
               documents_split=state["split_documents"], tokens=state["tokens"],
               max_document_tokens=state["max_doc_tokens"],
               mean_reference_tokens=round(state["tokens"] / max(state["next_ref"], 1), 2))
  if state["next_ref"] == 0:
    raise ValueError(f"knowledge base {describe_spec(source_spec)} produced no references "
                     "(all documents empty)")
  return path, stats


def describe_spec(spec: dict[str, Any]) -> str:
  return spec.get("path") or f"{spec.get('name')} ({spec.get('data_dir') or 'default data_dir'})"


class ReferenceStore:
  """Random access to references by ref_id.

  `tokens_by_ids(ids)` returns int32 tokens [*ids.shape, R] right-padded with
  pad_id and lengths [*ids.shape]; id -1 gives an all-pad row of length 0.
  Pickles by path (for grain worker processes).
  """

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    meta = tfds_builders.metadata(self.path)
    self.tokenizer_hash = str(meta.get("tokenizer_hash", ""))
    self.reference_length = int(meta["reference_length"])
    self.pad_id = int(meta.get("pad_id", 0))
    self._source = tfds_builders.open_split(self.path, "train")
    self._n = len(self._source)
    for i in {0, self._n - 1}:
      rid = int(self._source[i]["ref_id"])
      if rid != i:
        raise ValueError(f"reference dataset {self.path} is out of order: record {i} has "
                         f"ref_id {rid}")

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  def __len__(self) -> int:
    return self._n

  def check_tokenizer(self, tokenizer: Tokenizer) -> None:
    check_tokenizer_hash(self.tokenizer_hash, tokenizer, f"reference dataset {self.path}")

  def _records(self, ids: np.ndarray) -> dict[int, dict[str, Any]]:
    flat = ids.reshape(-1)
    bad = flat[(flat < -1) | (flat >= self._n)]
    if bad.size:
      raise IndexError(f"ref_id {int(bad[0])} out of range [-1, {self._n}) for {self.path}")
    want = np.unique(flat[flat >= 0]).tolist()
    return dict(zip(want, self._source.__getitems__(want))) if want else {}

  def get(self, ref_id: int) -> dict[str, Any]:
    """The full record of one reference (tokens, text as str, ids)."""
    r = self._records(np.asarray([ref_id]))[int(ref_id)]
    return dict(ref_id=int(r["ref_id"]), doc_id=int(r["doc_id"]), doc_key=int(r["doc_key"]),
                piece=int(r["piece"]), tokens=np.asarray(r["tokens"], np.int32),
                text=r["text"].decode("utf-8"))

  def tokens_by_ids(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids, np.int64)
    recs = self._records(ids)
    flat = ids.reshape(-1)
    out = np.full((flat.size, self.reference_length), self.pad_id, np.int32)
    lengths = np.zeros(flat.size, np.int32)
    for row, rid in enumerate(flat.tolist()):
      if rid >= 0:
        t = recs[rid]["tokens"]
        out[row, :len(t)] = t
        lengths[row] = len(t)
    return (out.reshape(ids.shape + (self.reference_length,)), lengths.reshape(ids.shape))

  def texts_by_ids(self, ids: Iterable[int]) -> list[str]:
    ids = np.asarray(list(ids), np.int64)
    recs = self._records(ids)
    return [recs[i]["text"].decode("utf-8") if i >= 0 else "" for i in ids.tolist()]

  def _field(self, ids: Any, field: str) -> np.ndarray:
    ids = np.asarray(ids, np.int64)
    recs = self._records(ids)
    return np.asarray([int(recs[i][field]) if i >= 0 else -1 for i in ids.reshape(-1).tolist()],
                      np.int64).reshape(ids.shape)

  def doc_ids(self, ids: Any) -> np.ndarray:
    return self._field(ids, "doc_id")

  def doc_keys(self, ids: Any) -> np.ndarray:
    return self._field(ids, "doc_key")

  def iter_tokens(self, start: int = 0, stop: int | None = None,
                  batch: int = 1024) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (ref_ids [n], tokens [n, R], lengths [n]) in id order (for embedding/encoding)."""
    stop = self._n if stop is None else min(stop, self._n)
    for lo in range(start, stop, batch):
      ids = np.arange(lo, min(lo + batch, stop))
      toks, lens = self.tokens_by_ids(ids)
      yield ids, toks, lens
