"""The lexical embedder: hashed TF-IDF of words, word bigrams and character n-grams.

The default embedder (`data.embedder = "lexical"`), no model: hashed word
unigrams, word bigrams and character n-grams, TF-IDF weighted (sublinear tf,
IDF fitted on the references), each feature group normalised, then
signed-hashed into `data.embed_dim` dimensions. It ranks a reference first when
the query shares its rare words, which is what a knowledge base of facts needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Iterable, Sequence

import numpy as np

from m3jax.core import artifacts as atomic_io
from m3jax.retrieval import embedder as emb_lib
from m3jax.retrieval.embedder import EmbedderError


_WORD = re.compile(r"\w+", re.UNICODE)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_BIGRAM_SALT = np.uint64(0x9E3779B97F4A7C15)
_GROUPS = ("word", "bigram", "char")


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser: a fixed, platform-independent 64-bit mixing of uint64s."""
  x = x ^ (x >> np.uint64(30))
  x = x * _M1
  x = x ^ (x >> np.uint64(27))
  x = x * _M2
  return x ^ (x >> np.uint64(31))


def _hash64(tag: bytes, s: str) -> int:
  """Deterministic 64-bit hash (Python's str hash is salted per process)."""
  return int.from_bytes(hashlib.blake2b(tag + s.encode("utf-8"), digest_size=8).digest(),
                        "little")


@dataclasses.dataclass(frozen=True)
class LexicalSettings:
  """Everything that shapes a `LexicalEmbedder`'s vectors (all in its fingerprint)."""
  dim: int = 256
  idf_bits: int = 20  # IDF is kept per 2**idf_bits feature buckets, before projection
  char_ngram_min: int = 3
  char_ngram_max: int = 5
  word_weight: float = 1.0
  bigram_weight: float = 0.5
  char_weight: float = 0.5
  lowercase: bool = True

  def check(self) -> None:
    if not (isinstance(self.dim, int) and self.dim > 0):
      raise EmbedderError(f"data.embed_dim must be a positive integer, got {self.dim!r}")
    if not 8 <= self.idf_bits <= 26:
      raise EmbedderError(f"idf_bits must be in [8, 26], got {self.idf_bits}")
    if not 1 <= self.char_ngram_min <= self.char_ngram_max:
      raise EmbedderError(f"char n-gram range [{self.char_ngram_min}, "
                          f"{self.char_ngram_max}] is empty")
    for g in _GROUPS:
      if getattr(self, f"{g}_weight") < 0:
        raise EmbedderError(f"{g}_weight must be >= 0")


class LexicalEmbedder(emb_lib.Embedder):
  """Hashed TF-IDF of words, word bigrams and character n-grams (no model).

  Features of a text: its lower-cased `\\w+` words, adjacent word pairs, and
  the character n-grams (`char_ngram_min`..`char_ngram_max`) of each word padded
  as `<word>`. Words and bigrams get weight (1 + log tf) * idf, with
  idf = log((1 + N) / (1 + df)) + 1 fitted on the references over 2**idf_bits
  hash buckets (large, so rare words stay rare); once fitted, words and bigrams
  never seen in the references are dropped, as with a fitted vocabulary. A
  word's character n-grams form a unit vector of their own (sublinear counts
  within the word) that enters with the word's tf-idf weight: inflections and
  misspellings of a rare word still match, and common words add little. Every
  feature adds +-weight to one of `dim` coordinates (coordinate and sign from
  bits of its 64-bit blake2b/splitmix hash, never Python's salted `hash`); each
  group's vector is normalised, scaled by its group weight, and the sum
  normalised. Inner products approximate the cosine of the sparse TF-IDF vectors.
  """

  kind = "lexical"

  def __init__(self, settings: LexicalSettings | None = None, *, dim: int | None = None):
    settings = settings or LexicalSettings()
    if dim is not None:
      settings = dataclasses.replace(settings, dim=dim)
    settings.check()
    self.settings = settings
    self.df = np.zeros(1 << settings.idf_bits, dtype=np.int64)
    self.n_docs = 0
    self._idf = np.ones(1 << settings.idf_bits, dtype=np.float32)
    self._word_cache: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
    self._fingerprint: str | None = None

  @classmethod
  def from_config(cls, cfg: Any) -> "LexicalEmbedder":
    return cls(dim=int(cfg.data.embed_dim))

  @property
  def dim(self) -> int:
    return self.settings.dim

  @property
  def fitted(self) -> bool:
    return self.n_docs > 0

  # ------------------------------------------------------------ features

  def _columns(self, hs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Output coordinate and sign of each hashed feature."""
    col = ((hs >> np.uint64(40)) % np.uint64(self.dim)).astype(np.int64)
    sign = np.where((hs >> np.uint64(39)) & np.uint64(1), -1.0, 1.0)
    return col, sign

  def _word(self, w: str) -> tuple[int, np.ndarray, np.ndarray]:
    """(word hash, coordinates, values) of the word's unit character-n-gram vector."""
    hit = self._word_cache.get(w)
    if hit is None:
      s = self.settings
      padded = f"<{w}>"
      grams = [padded[i:i + n] for n in range(s.char_ngram_min, s.char_ngram_max + 1)
               for i in range(len(padded) - n + 1)] or [padded]
      gh, counts = np.unique(np.array([_hash64(b"c\x00", g) for g in grams], dtype=np.uint64),
                             return_counts=True)
      col, sign = self._columns(gh)
      val = sign * (1.0 + np.log(counts))
      hit = (_hash64(b"w\x00", w), col, val / np.linalg.norm(val))
      if len(self._word_cache) >= 200_000:
        self._word_cache.clear()
      self._word_cache[w] = hit
    return hit

  def _tokens(self, texts: Sequence[str]):
    """Per word occurrence: text index, word hash, and its cache entry."""
    lengths, entries = [], []
    lower = self.settings.lowercase
    get, make = self._word_cache.get, self._word
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise EmbedderError(f"embed: texts[{i}] is {type(text).__name__}, not str")
      words = _WORD.findall(text.lower() if lower else text)
      entries.extend([get(w) or make(w) for w in words])
      lengths.append(len(words))
    text_of = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
    hashes = np.fromiter((e[0] for e in entries), dtype=np.uint64, count=len(entries))
    return text_of, hashes, entries

  @staticmethod
  def _count(idx: np.ndarray, hs: np.ndarray):
    """Distinct (text, hash) pairs: (text, hash, count, index of one occurrence)."""
    order = np.lexsort((hs, idx))
    i, h = idx[order], hs[order]
    new = np.ones(len(h), dtype=bool)
    new[1:] = (i[1:] != i[:-1]) | (h[1:] != h[:-1])
    starts = np.nonzero(new)[0]
    return i[starts], h[starts], np.diff(np.append(starts, len(h))), order[starts]

  def _word_and_bigram_counts(self, texts: Sequence[str]):
    idx, wh, entries = self._tokens(texts)
    same = idx[1:] == idx[:-1]  # a bigram never straddles two texts
    bh = _mix(wh[:-1] ^ _mix(wh[1:] + _BIGRAM_SALT))[same]
    return self._count(idx, wh), self._count(idx[:-1][same], bh), entries

  def _bucket(self, hs: np.ndarray) -> np.ndarray:
    return (hs & np.uint64((1 << self.settings.idf_bits) - 1)).astype(np.int64)

  # ------------------------------------------------------------ fitting

  def fit(self, texts: Iterable[str], batch_size: int = 1024) -> "LexicalEmbedder":
    """Fits document frequencies on `texts` (the references); replaces any earlier fit."""
    self.df[:] = 0
    self.n_docs = 0
    for batch in emb_lib.batches(texts, batch_size):
      self._accumulate(batch)
    self._refresh()
    return self

  def _accumulate(self, texts: Sequence[str]) -> None:
    words, bigrams, _ = self._word_and_bigram_counts(texts)
    size = len(self.df)
    # A bucket counts once per document, whichever features fell into it.
    key = np.unique(np.concatenate([words[0] * size + self._bucket(words[1]),
                                    bigrams[0] * size + self._bucket(bigrams[1])]))
    self.df += np.bincount(key % size, minlength=size)
    self.n_docs += len(texts)

  def _refresh(self) -> None:
    if self.n_docs:
      self._idf = (np.log((1.0 + self.n_docs) / (1.0 + self.df)) + 1.0).astype(np.float32)
    else:
      self._idf = np.ones(len(self.df), dtype=np.float32)
    self._fingerprint = None

  # ------------------------------------------------------------ embedding

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    texts = list(texts)
    n, dim, s = len(texts), self.dim, self.settings
    out = np.zeros((n, dim), dtype=np.float64)
    if n == 0:
      return out.astype(np.float32)
    (wi, wh, wc, wfirst), (bi, bh, bc, _), entries = self._word_and_bigram_counts(texts)
    parts = []
    for idx, hs, counts in ((wi, wh, wc), (bi, bh, bc)):
      bucket = self._bucket(hs)
      w = (1.0 + np.log(counts)) * self._idf[bucket]
      if self.fitted:  # like a fitted vocabulary: unseen words can only add noise
        w = np.where(self.df[bucket] > 0, w, 0.0)
      col, sign = self._columns(hs)
      parts.append((idx, col, sign * w))
    # Character n-grams: each distinct word's unit n-gram vector at the word's tf-idf
    # weight (unseen words included: their n-grams can still match inflections).
    word_w = (1.0 + np.log(wc)) * self._idf[self._bucket(wh)]
    chosen = [entries[j] for j in wfirst]
    lens = np.array([len(e[1]) for e in chosen], dtype=np.int64)
    if len(chosen):
      parts.append((np.repeat(wi, lens), np.concatenate([e[1] for e in chosen]),
                    np.concatenate([e[2] for e in chosen]) * np.repeat(word_w, lens)))
    for g, (idx, col, val) in enumerate(parts):
      dense = np.bincount(idx * dim + col, weights=val,
                          minlength=n * dim).reshape(n, dim).astype(np.float64)
      norms = np.linalg.norm(dense, axis=1, keepdims=True)
      weight = (s.word_weight, s.bigram_weight, s.char_weight)[g]
      out += weight * np.divide(dense, norms, out=np.zeros_like(dense), where=norms > 0)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    out = np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)
    return out.astype(np.float32)

  # ------------------------------------------------------------ identity and state

  def fingerprint(self) -> str:
    if self._fingerprint is None:
      state = (hashlib.sha256(self.df.astype("<i8").tobytes()).hexdigest()
               if self.n_docs else "unfitted")
      self._fingerprint = atomic_io.content_digest(
          self.kind, emb_lib.STATE_VERSION, dataclasses.asdict(self.settings), self.n_docs, state)
    return self._fingerprint

  def save(self, path: str) -> None:
    atomic_io.save_npz(
        path, kind=np.array(self.kind), version=np.array(emb_lib.STATE_VERSION),
        settings=np.array(json.dumps(dataclasses.asdict(self.settings), sort_keys=True)),
        df=self.df.astype(np.uint32 if self.n_docs < 2**32 else np.int64),
        n_docs=np.array(self.n_docs, dtype=np.int64), fingerprint=np.array(self.fingerprint()))

  @classmethod
  def _from_state(cls, path: str, z: dict[str, np.ndarray]) -> "LexicalEmbedder":
    try:
      settings = LexicalSettings(**json.loads(str(z["settings"])))
    except (TypeError, ValueError) as e:
      raise EmbedderError(f"embedder state {path!r}: bad settings: {e}") from e
    out = cls(settings)
    if "df" not in z or z["df"].shape != out.df.shape:
      raise EmbedderError(f"embedder state {path!r}: document frequencies missing or of "
                          f"the wrong size for idf_bits={settings.idf_bits}")
    out.df = z["df"].astype(np.int64)
    out.n_docs = int(z["n_docs"])
    out._refresh()
    if "fingerprint" in z and str(z["fingerprint"]) != out.fingerprint():
      raise EmbedderError(f"embedder state {path!r} is corrupt: its contents hash to "
                          f"{out.fingerprint()}, the file says {str(z['fingerprint'])}")
    return out
