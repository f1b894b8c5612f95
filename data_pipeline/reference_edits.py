"""Edited references: a reference store seen through the overlay of a knowledge edit.

A live knowledge edit (`m3jax bank update`, m3jax.memory.bank_update) adds, replaces
and deletes references without rewriting the references dataset that prepare-data
wrote: the changed records live in one small overlay file, and `EditedReferences`
answers every read of the store (tokens, texts, document ids) from the overlay first
and from the base dataset otherwise. So RAG contexts, the leakage filter, on-the-fly
encoding and coverage all see the edited knowledge base.

The overlay (`references.npz`, no pickle) is cumulative: version N holds every
reference edited by versions 1..N, each with its latest content:

    ids      int64 [n]       ref_ids (replaced ones < base count, added ones >= it)
    tokens   int32 [n, R]    right-padded with pad_id; deleted: length 0
    lengths  int32 [n]
    doc_ids  int64 [n]       the replaced reference's document; -1 for added ones
    doc_keys int64 [n]       content fingerprint of the new text (corpus.doc_key)
    pieces   int64 [n]
    texts    unicode [n]     decoded text of exactly `tokens`; "" when deleted
    deleted  bool [n]
    count    int64 []        references after the edit (ids are dense: [0, count))
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

import numpy as np

from data_pipeline import corpus as corpus_lib
from data_pipeline import references as references_lib
from data_pipeline.tokenizer import Tokenizer
from m3jax.core import artifacts
from m3jax.core.errors import InputError

FIELDS = ("ids", "tokens", "lengths", "doc_ids", "doc_keys", "pieces", "texts", "deleted")


class ReferenceEditError(InputError):
  """An edit that cannot be applied; the message names the input and the reference."""


def empty_overlay(reference_length: int) -> dict[str, np.ndarray]:
  return dict(ids=np.zeros(0, np.int64), tokens=np.zeros((0, reference_length), np.int32),
              lengths=np.zeros(0, np.int32), doc_ids=np.zeros(0, np.int64),
              doc_keys=np.zeros(0, np.int64), pieces=np.zeros(0, np.int64),
              texts=np.zeros(0, "<U1"), deleted=np.zeros(0, bool))


def save_overlay(path: str, overlay: dict[str, np.ndarray], count: int) -> None:
  """Writes the overlay atomically (sorted by id, so equal edits give equal bytes)."""
  order = np.argsort(overlay["ids"], kind="stable")
  arrays = {k: np.asarray(overlay[k])[order] for k in FIELDS}
  artifacts.save_npz(path, count=np.asarray(count, np.int64), **arrays)


def load_overlay(path: str) -> tuple[dict[str, np.ndarray], int]:
  """(overlay arrays, reference count after the edit)."""
  with np.load(path, allow_pickle=False) as z:
    overlay = {k: z[k] for k in FIELDS}
    return overlay, int(z["count"])


def merge(old: dict[str, np.ndarray], new: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The overlay of `old` then `new` (an id in both takes `new`'s record)."""
  keep = ~np.isin(old["ids"], new["ids"])
  width = max(old["texts"].dtype.itemsize, new["texts"].dtype.itemsize) // 4 or 1
  out = {}
  for k in FIELDS:
    a, b = old[k][keep], new[k]
    if k == "texts":
      a, b = a.astype(f"<U{width}"), b.astype(f"<U{width}")
    out[k] = np.concatenate([a, b])
  return out


def tokenize_edit(tokenizer: Tokenizer, reference_length: int, *, base_count: int,
                  replace: dict[int, str] | None = None, add: Sequence[str] = (),
                  delete: Iterable[int] = (), doc_ids_of: Any = None
                  ) -> dict[str, np.ndarray]:
  """The overlay records of one edit.

  `replace` maps ref_id -> new text (must fit one reference of `reference_length`
  tokens); `add` are new documents, cut into references as prepare-data cuts the
  knowledge base and given ids from `base_count` on; `delete` ids get empty
  records. `doc_ids_of(ids)` gives the replaced references' document ids.
  """
  replace = dict(replace or {})
  delete = sorted(set(int(i) for i in delete))
  clash = sorted(set(replace) & set(delete))
  if clash:
    raise ReferenceEditError(f"ref_id {clash[0]} is both replaced and deleted")
  for rid in list(replace) + delete:
    if not 0 <= rid < base_count:
      raise ReferenceEditError(f"ref_id {rid} does not exist (the bank holds ids "
                               f"0..{base_count - 1})")
  rows: list[tuple[int, list[int], int, int, str, bool]] = []  # id, tokens, doc, piece, text, del
  for rid, text in sorted(replace.items()):
    toks = list(tokenizer.encode(text))
    if not toks:
      raise ReferenceEditError(f"replacement of ref_id {rid}: empty text (use --delete)")
    if len(toks) > reference_length:
      raise ReferenceEditError(
          f"replacement of ref_id {rid}: {len(toks)} tokens, a reference holds at most "
          f"{reference_length}; shorten it, or delete the reference and --add the text")
    doc = int(doc_ids_of([rid])[0]) if doc_ids_of is not None else -1
    rows.append((rid, toks, doc, 0, text, False))
  classes = references_lib.PieceClasses.from_tokenizer(tokenizer) if add else None
  next_id = base_count
  for i, text in enumerate(add):
    toks = list(tokenizer.encode(text))
    if not toks:
      raise ReferenceEditError(f"added document {i}: empty text")
    for p, piece in enumerate(references_lib.split_document(toks, reference_length, classes)):
      rows.append((next_id, piece.tolist(), -1, p, tokenizer.decode(piece), False))
      next_id += 1
  for rid in delete:
    rows.append((rid, [], -1, 0, "", True))
  n = len(rows)
  out = empty_overlay(reference_length)
  if not n:
    return out
  tokens = np.full((n, reference_length), tokenizer.pad_id, np.int32)
  for j, r in enumerate(rows):
    tokens[j, :len(r[1])] = r[1]
  texts = [r[4] for r in rows]
  return dict(ids=np.asarray([r[0] for r in rows], np.int64), tokens=tokens,
              lengths=np.asarray([len(r[1]) for r in rows], np.int32),
              doc_ids=np.asarray([r[2] for r in rows], np.int64),
              doc_keys=np.asarray([corpus_lib.doc_key(t) if t else -1 for t in texts], np.int64),
              pieces=np.asarray([r[3] for r in rows], np.int64),
              texts=np.asarray(texts, dtype=f"<U{max(1, max(len(t) for t in texts))}"),
              deleted=np.asarray([r[5] for r in rows], bool))


class EditedReferences:
  """A reference store (data_pipeline.references.ReferenceStore) with an overlay applied.

  Same interface as the store: `tokens_by_ids`, `texts_by_ids`, `doc_ids`,
  `doc_keys`, `get`, `len`; a deleted reference reads as empty (length 0, text "").
  """

  def __init__(self, base: Any, overlay: dict[str, np.ndarray], count: int,
               path: str | None = None):
    self.base = base
    self.count = int(count)
    self.path = path or getattr(base, "path", "")
    self.tokenizer_hash = base.tokenizer_hash
    self.reference_length = base.reference_length
    self.pad_id = base.pad_id
    self._row = {int(i): j for j, i in enumerate(overlay["ids"].tolist())}
    self._ov = overlay
    if overlay["tokens"].shape[1:] != (self.reference_length,):
      raise ReferenceEditError(f"overlay {path}: references of {overlay['tokens'].shape[1:]} "
                               f"tokens, the store holds {self.reference_length}")
    self.base_count = len(base)
    missing = [i for i in range(self.base_count, self.count) if i not in self._row]
    if missing:
      raise ReferenceEditError(f"overlay {path}: ref_id {missing[0]} is past the base "
                               f"dataset ({self.base_count} references) but not in the overlay")

  @classmethod
  def open(cls, base: Any, path: str) -> "EditedReferences":
    overlay, count = load_overlay(path)
    return cls(base, overlay, count, path=path)

  def __len__(self) -> int:
    return self.count

  def __getstate__(self):
    return dict(base=self.base, path=self.path)

  def __setstate__(self, state):
    overlay, count = load_overlay(state["path"])
    self.__init__(state["base"], overlay, count, path=state["path"])

  @property
  def deleted_ids(self) -> np.ndarray:
    return self._ov["ids"][self._ov["deleted"]]

  def check_tokenizer(self, tokenizer: Tokenizer) -> None:
    self.base.check_tokenizer(tokenizer)

  def _split(self, ids: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat ids, overlay row per id or -1, ids to read from the base (others -1))."""
    ids = np.asarray(ids, np.int64)
    flat = ids.reshape(-1)
    bad = flat[(flat < -1) | (flat >= self.count)]
    if bad.size:
      raise IndexError(f"ref_id {int(bad[0])} out of range [-1, {self.count}) for the edited "
                       f"references {self.path}")
    rows = np.asarray([self._row.get(i, -1) for i in flat.tolist()], np.int64)
    base_ids = np.where(rows >= 0, -1, flat)
    return flat, rows, base_ids

  def tokens_by_ids(self, ids: Any) -> tuple[np.ndarray, np.ndarray]:
    shape = np.asarray(ids).shape
    flat, rows, base_ids = self._split(ids)
    toks, lens = self.base.tokens_by_ids(base_ids)
    toks, lens = np.array(toks), np.array(lens)
    over = rows >= 0
    toks[over] = self._ov["tokens"][rows[over]]
    lens[over] = self._ov["lengths"][rows[over]]
    return toks.reshape(shape + (self.reference_length,)), lens.reshape(shape)

  def texts_by_ids(self, ids: Iterable[int]) -> list[str]:
    flat, rows, base_ids = self._split(list(ids))
    base = self.base.texts_by_ids(base_ids.tolist())
    return [str(self._ov["texts"][r]) if r >= 0 else t for r, t in zip(rows.tolist(), base)]

  def _field(self, ids: Any, field: str, base_fn) -> np.ndarray:
    shape = np.asarray(ids).shape
    flat, rows, base_ids = self._split(ids)
    out = np.asarray(base_fn(base_ids), np.int64).reshape(-1).copy()
    over = rows >= 0
    out[over] = self._ov[field][rows[over]]
    return out.reshape(shape)

  def doc_ids(self, ids: Any) -> np.ndarray:
    return self._field(ids, "doc_ids", self.base.doc_ids)

  def doc_keys(self, ids: Any) -> np.ndarray:
    return self._field(ids, "doc_keys", self.base.doc_keys)

  def get(self, ref_id: int) -> dict[str, Any]:
    row = self._row.get(int(ref_id))
    if row is None:
      return self.base.get(ref_id)
    n = int(self._ov["lengths"][row])
    return dict(ref_id=int(ref_id), doc_id=int(self._ov["doc_ids"][row]),
                doc_key=int(self._ov["doc_keys"][row]), piece=int(self._ov["pieces"][row]),
                tokens=self._ov["tokens"][row, :n].copy(), text=str(self._ov["texts"][row]))

  def iter_tokens(self, start: int = 0, stop: int | None = None, batch: int = 1024):
    stop = self.count if stop is None else min(stop, self.count)
    for lo in range(start, stop, batch):
      ids = np.arange(lo, min(lo + batch, stop))
      toks, lens = self.tokens_by_ids(ids)
      yield ids, toks, lens


def describe(overlay: dict[str, np.ndarray], base_count: int) -> dict[str, list[int]]:
  """{added, replaced, deleted}: the ids of one edit's records, sorted."""
  ids, dele = overlay["ids"], overlay["deleted"]
  return json.loads(json.dumps(dict(
      added=sorted(ids[(ids >= base_count) & ~dele].tolist()),
      replaced=sorted(ids[(ids < base_count) & ~dele].tolist()),
      deleted=sorted(ids[dele].tolist()))))
