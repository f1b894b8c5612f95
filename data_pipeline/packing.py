"""Packing tokenized training text into fixed-length sequences.

Each document becomes `<s> tokens </s>`; documents are concatenated and cut into
sequences of exactly `seq_len` tokens (documents continue across sequences; there
is no attention mask between documents, as in GPT-style packing and the paper).

With `align_chunks` (config `data.pack_align_chunks`), a document that fits in one
chunk starts a chunk of its own (after padding the previous one). A chunk is the
unit that retrieves a reference, so for a corpus of short documents (the knowledge
world's QA lines) every chunk then holds one document and its reference can be
about it; the price is the padding.
Each record stores:

* `tokens` int32 [T]: the sequence; padded (with pad_id, which no text ever
  produces) at the end of a shard's last sequence and, with `align_chunks`, before
  documents moved to a chunk boundary;
* `next_token` int32: the token after the sequence in the stream (pad_id at the end),
  so the target of the last position is known: targets = tokens[1:] + [next_token];
  the loss mask is `targets != pad_id`;
* `chunk_doc_keys` int64 [T / chunk_length]: for each 64-token chunk, the
  `corpus.doc_key` of the document covering most of its tokens (earliest on ties;
  -1 for an all-padding chunk). Neighbor mining compares it with a reference's
  `doc_key` for optional same-document exclusion.

A shard packs a contiguous range of documents on its own, so shards are
independent (at most one padded sequence per shard).

Held-out documents for eval loss: document i goes to the validation split iff
`hash(eval_seed, i) < eval_fraction`, up to `eval_max_docs` documents (the first
ones by index); the decision depends only on the index, never on the text.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from data_pipeline import corpus as corpus_lib
from data_pipeline import references as references_lib
from data_pipeline import tfds_builders
from data_pipeline.tokenizer import Tokenizer

_MASK64 = (1 << 64) - 1


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser, vectorised (uint64 arithmetic wraps)."""
  x = x.astype(np.uint64)
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
  return x


def heldout_mask(start: int, stop: int, seed: int, fraction: float) -> np.ndarray:
  """Bool [stop - start]: whether documents start..stop-1 are eval candidates."""
  if fraction <= 0:
    return np.zeros(stop - start, bool)
  idx = np.arange(start, stop, dtype=np.uint64)
  with np.errstate(over="ignore"):
    h = _mix(idx + np.uint64((seed * 0x9E3779B97F4A7C15) & _MASK64))
  return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < fraction


def heldout_limit(n_docs: int, seed: int, fraction: float, max_docs: int) -> int:
  """Documents with index < limit that pass `heldout_mask` are held out (caps the count)."""
  if fraction <= 0 or max_docs <= 0:
    return 0
  seen = 0
  step = 1 << 20
  for lo in range(0, n_docs, step):
    hits = np.flatnonzero(heldout_mask(lo, min(lo + step, n_docs), seed, fraction))
    if seen + hits.size >= max_docs:
      return lo + int(hits[max_docs - seen - 1]) + 1
    seen += hits.size
  return n_docs


class Packer:
  """Streams documents in, full sequences out."""

  def __init__(self, seq_len: int, chunk_length: int, pad_id: int, align_chunks: bool = False):
    if seq_len % chunk_length:
      raise ValueError(f"seq_len {seq_len} is not a multiple of chunk_length {chunk_length}")
    self.T, self.L, self.pad = seq_len, chunk_length, pad_id
    self.align_chunks = align_chunks
    self._toks: list[np.ndarray] = []
    self._keys: list[np.ndarray] = []
    self._n = 0  # buffered tokens; the buffer starts at a sequence (hence chunk) boundary
    self.sequences = 0
    self.padding = 0

  def add(self, key: int, ids: np.ndarray) -> Iterator[dict[str, Any]]:
    ids = np.asarray(ids, np.int32)
    used = self._n % self.L
    if self.align_chunks and used and len(ids) <= self.L:
      gap = self.L - used
      self.padding += gap
      self._toks.append(np.full(gap, self.pad, np.int32))
      self._keys.append(np.full(gap, -1, np.int64))
      self._n += gap
    self._toks.append(ids)
    self._keys.append(np.full(len(ids), key, np.int64))
    self._n += len(ids)
    if self._n <= self.T:
      return
    toks, keys = np.concatenate(self._toks), np.concatenate(self._keys)
    m = (len(toks) - 1) // self.T  # full sequences whose next token is known
    for s in range(m):
      lo = s * self.T
      yield self._record(toks[lo:lo + self.T], keys[lo:lo + self.T], int(toks[lo + self.T]))
    self._toks, self._keys = [toks[m * self.T:]], [keys[m * self.T:]]
    self._n = len(self._toks[0])

  def finish(self) -> Iterator[dict[str, Any]]:
    if self._n == 0:
      return
    toks, keys = np.concatenate(self._toks), np.concatenate(self._keys)
    pad = self.T - len(toks)
    self.padding += pad
    toks = np.concatenate([toks, np.full(pad, self.pad, np.int32)])
    keys = np.concatenate([keys, np.full(pad, -1, np.int64)])
    self._toks, self._keys, self._n = [], [], 0
    yield self._record(toks, keys, self.pad)

  def _record(self, toks: np.ndarray, keys: np.ndarray, next_token: int) -> dict[str, Any]:
    self.sequences += 1
    return dict(tokens=toks.astype(np.int32), next_token=np.int32(next_token),
                chunk_doc_keys=chunk_majority(keys, self.L))


def chunk_majority(keys: np.ndarray, chunk_length: int) -> np.ndarray:
  """Per chunk: the key covering most positions (earliest on ties), -1 if all -1."""
  grid = keys.reshape(-1, chunk_length)
  out = grid[:, 0].copy()
  mixed = np.flatnonzero((grid != grid[:, :1]).any(axis=1))
  for c in mixed.tolist():  # rare: chunks spanning a document boundary or padding
    k = grid[c][grid[c] >= 0]
    vals, first, counts = np.unique(k, return_index=True, return_counts=True)
    out[c] = vals[np.lexsort((first, -counts))[0]]
  return out


class PackShard:
  """Shard generator: packs the training (or held-out) documents of [start, stop)."""

  def __init__(self, source_spec: dict[str, Any], start: int, stop: int, *, tokenizer_path: str,
               seq_len: int, chunk_length: int, heldout: bool, eval_seed: int,
               eval_fraction: float, eval_limit: int, stats: dict[str, int], threads: int = -1,
               progress=None, align_chunks: bool = False):
    self.source_spec, self.start, self.stop = source_spec, start, stop
    self.tokenizer_path, self.seq_len, self.chunk_length = tokenizer_path, seq_len, chunk_length
    self.heldout, self.eval_seed, self.eval_fraction = heldout, eval_seed, eval_fraction
    self.eval_limit, self.stats, self.threads = eval_limit, stats, threads
    self.progress = progress
    self.align_chunks = align_chunks

  def __call__(self) -> Iterator[tuple[int, dict[str, Any]]]:
    source = references_lib.open_documents(self.source_spec)
    tok = Tokenizer.load(self.tokenizer_path)
    packer = Packer(self.seq_len, self.chunk_length, tok.pad_id, self.align_chunks)
    st = self.stats
    k = 0
    for lo in range(self.start, self.stop, 1024):
      hi = min(lo + 1024, self.stop)
      held = heldout_mask(lo, hi, self.eval_seed, self.eval_fraction)
      held &= np.arange(lo, hi) < self.eval_limit
      idx = [i for i, h in zip(range(lo, hi), held.tolist()) if h == self.heldout]
      if self.progress is not None:
        self.progress.update(hi - lo)
      if not idx:
        continue
      texts = source.texts(idx)
      for text, ids in zip(texts, tok.encode_batch(texts, add_bos=True, add_eos=True,
                                                   num_threads=self.threads)):
        st["documents"] += 1
        st["tokens"] += len(ids)
        for rec in packer.add(corpus_lib.doc_key(text), np.asarray(ids, np.int32)):
          yield k, rec
          k += 1
    for rec in packer.finish():
      yield k, rec
      k += 1
    st["sequences"] += packer.sequences
    st["padding_tokens"] += packer.padding


def check_splittable(n_docs: int, *, eval_fraction: float, eval_max_docs: int, eval_seed: int,
                     what: str) -> None:
  """Refuses a training text whose every document would go to the validation split.

  (With eval_seed=0, document 0 is always held out, so a one-document corpus has no
  training text.) The message names the fields and what to change.
  """
  limit = heldout_limit(n_docs, eval_seed, eval_fraction, eval_max_docs)
  held = int(np.count_nonzero(heldout_mask(0, limit, eval_seed, eval_fraction)))
  if n_docs and held >= n_docs:
    raise corpus_lib.CorpusError(
        f"training text {what} is too small to split: all {n_docs} of its document(s) go to "
        f"the validation split (data.eval_fraction={eval_fraction}, data.eval_seed="
        f"{eval_seed}); give it more documents (documents are separated by a blank line in "
        ".txt, one per line in .jsonl), or train on all of them without held-out loss: "
        "--config.data.eval_fraction=0 --config.train.eval_every=0")


def write_packed(data_dir: str, source_spec: dict[str, Any], tokenizer: Tokenizer, *,
                 seq_len: int, chunk_length: int, eval_fraction: float, eval_max_docs: int,
                 eval_seed: int, shard_docs: int = 20000, align_chunks: bool = False,
                 threads: int = -1, progress=None) -> tuple[str, dict[str, Any]]:
  """Packs the documents of `source_spec` into train/validation sequences."""
  n_docs = len(references_lib.open_documents(source_spec))
  check_splittable(n_docs, eval_fraction=eval_fraction, eval_max_docs=eval_max_docs,
                   eval_seed=eval_seed, what=references_lib.describe_spec(source_spec))
  limit = heldout_limit(n_docs, eval_seed, eval_fraction, eval_max_docs)
  stats = {s: dict(documents=0, tokens=0, sequences=0, padding_tokens=0)
           for s in ("train", "validation")}
  common = dict(tokenizer_path=tokenizer.path, seq_len=seq_len, chunk_length=chunk_length,
                eval_seed=eval_seed, eval_fraction=eval_fraction, eval_limit=limit,
                threads=threads, align_chunks=align_chunks)
  # Progress counts the training pass only (the validation pass reads few documents).
  shards = {"train": [PackShard(source_spec, lo, min(lo + shard_docs, n_docs), heldout=False,
                                stats=stats["train"], progress=progress, **common)
                      for lo in range(0, n_docs, shard_docs)]}
  if limit > 0:
    shards["validation"] = [PackShard(source_spec, 0, limit, heldout=True,
                                      stats=stats["validation"], **common)]
  meta = dict(tokenizer_hash=tokenizer.hash, seq_len=seq_len, chunk_length=chunk_length,
              pad_id=tokenizer.pad_id, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
  path = tfds_builders.write_dataset(
      tfds_builders.M3jaxPacked, data_dir,
      features=tfds_builders.packed_features(seq_len, chunk_length), shards=shards,
      metadata=meta, description="Packed training sequences; record i has seq_index i.")
  if stats["train"]["sequences"] == 0:
    raise ValueError(f"training text {references_lib.describe_spec(source_spec)} produced no "
                     "sequences")
  return path, stats
