"""Text embedders for retrieval: texts -> L2-normalised float32 vectors.

The paper embeds references and 64-token query chunks with BGE-M3 and searches by
cosine similarity. m3jax downloads no checkpoints, so it ships two embedders:

- `LexicalEmbedder` (default, `data.embedder = "lexical"`): no model. Hashed word
  unigrams, word bigrams and character n-grams, TF-IDF weighted (sublinear tf,
  IDF fitted on the references), each feature group normalised, then signed-hashed
  into `data.embed_dim` dimensions. It ranks a reference first when the query
  shares its rare words, which is what a knowledge base of facts needs.
- `ModelEmbedder` (`data.embedder = "model"`): mean-pooled hidden states of the
  m3jax model itself (see its docstring for why that is a sound choice).

Every embedder has `dim`, `embed(texts)` and a `fingerprint()` that changes with
every setting and fitted statistic that changes its vectors; an index records the
fingerprint of the embedder that built it and refuses queries from another one.
State (fitted IDF or mean vector) is saved as `.npz` without pickle.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import hashlib
import json
import os
import re
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from m3jax.core import artifacts as atomic_io
from m3jax.core import config as config_lib
from m3jax.core.config import ConfigError
from m3jax.model import params_io
from m3jax.model import transformer as model_lib

STATE_VERSION = 1


class EmbedderError(ValueError):
  """Bad embedder state or settings; the message names the file or field."""


class Embedder(abc.ABC):
  """texts -> float32 [n, dim], rows L2-normalised (a text with no features: zeros)."""

  kind: str = ""

  @property
  @abc.abstractmethod
  def dim(self) -> int:
    """Width of the vectors."""

  @abc.abstractmethod
  def embed(self, texts: Sequence[str]) -> np.ndarray:
    """float32 [len(texts), dim]."""

  @abc.abstractmethod
  def fingerprint(self) -> str:
    """Hash of everything that changes the vectors (settings and fitted state)."""

  @abc.abstractmethod
  def save(self, path: str) -> None:
    """Writes the embedder's settings and fitted state to `path` (.npz)."""


def _batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
  batch: list[Any] = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def _read_npz(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise EmbedderError(f"embedder state {path!r} does not exist")
  try:
    with np.load(path, allow_pickle=False) as z:
      out = {k: z[k] for k in z.files}
  except Exception as e:  # noqa: BLE001 - any read failure means a corrupt file
    raise EmbedderError(f"embedder state {path!r} is unreadable: {e}") from e
  for key in ("kind", "settings", "version"):
    if key not in out:
      raise EmbedderError(f"embedder state {path!r} lacks the field {key!r}")
  if int(out["version"]) != STATE_VERSION:
    raise EmbedderError(f"embedder state {path!r} has version {int(out['version'])}; "
                        f"this m3jax reads version {STATE_VERSION}")
  return out


# ---------------------------------------------------------------- lexical

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


class LexicalEmbedder(Embedder):
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
    for batch in _batches(texts, batch_size):
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
      self._fingerprint = atomic_io.content_digest(self.kind, STATE_VERSION, dataclasses.asdict(self.settings),
                                  self.n_docs, state)
    return self._fingerprint

  def save(self, path: str) -> None:
    atomic_io.save_npz(path, kind=np.array(self.kind), version=np.array(STATE_VERSION),
               settings=np.array(json.dumps(dataclasses.asdict(self.settings), sort_keys=True)),
               df=self.df.astype(np.uint32 if self.n_docs < 2**32 else np.int64),
               n_docs=np.array(self.n_docs, dtype=np.int64),
               fingerprint=np.array(self.fingerprint()))

  @classmethod
  def _from_state(cls, path: str, z: dict[str, np.ndarray]) -> "LexicalEmbedder":
    try:
      settings = LexicalSettings(**json.loads(str(z["settings"])))
    except (TypeError, ValueError) as e:
      raise EmbedderError(f"embedder state {path!r}: bad settings: {e}") from e
    emb = cls(settings)
    if "df" not in z or z["df"].shape != emb.df.shape:
      raise EmbedderError(f"embedder state {path!r}: document frequencies missing or of "
                          f"the wrong size for idf_bits={settings.idf_bits}")
    emb.df = z["df"].astype(np.int64)
    emb.n_docs = int(z["n_docs"])
    emb._refresh()
    if "fingerprint" in z and str(z["fingerprint"]) != emb.fingerprint():
      raise EmbedderError(f"embedder state {path!r} is corrupt: its contents hash to "
                          f"{emb.fingerprint()}, the file says {str(z['fingerprint'])}")
    return emb


# ---------------------------------------------------------------- model

class ModelEmbedder(Embedder):
  """Mean-pooled hidden states of the m3jax model at one layer.

  Why the model itself: no external checkpoint may be downloaded, and the model
  was (warmup-)trained on this very corpus, so its middle layers already encode
  which entities and facts a text is about - the signal retrieval needs - in the
  tokenizer the references use. Mean pooling over the text's tokens (excluding
  the leading `<s>`, whose state is an attention sink with a huge norm) at a
  middle layer is the standard decoder-only sentence embedding; the last layers
  specialise in next-token prediction. Raw LM states are anisotropic (one common
  direction dominates every cosine), so `fit` on the references stores their
  mean vector, which is subtracted before normalising.

  Texts are encoded with `<s>` prepended, cut to `max_len` tokens, right-padded to
  a fixed [batch_size, max_len] shape (one compilation) and run causally with
  memory off, so padding never changes a real token's state and a text's vector
  does not depend on the other texts of its batch. Only the layers up to `layer`
  are computed (the rest is pruned by XLA).
  """

  kind = "model"

  def __init__(self, model_config: Any, params: Any, encode: Callable[[str], Sequence[int]],
               *, layer: int | None = None, max_len: int | None = None,
               batch_size: int = 32, tokenizer_hash: str = "", params_id: str | None = None):
    self.model_config = model_config
    n_layers = model_config.n_layers
    layer = n_layers // 2 if layer is None or layer < 0 else int(layer)
    if not 0 <= layer < n_layers:
      raise EmbedderError(f"data.embed_model_layer={layer} is out of range [0, {n_layers})")
    self.layer = layer
    self.max_len = int(max_len or (model_config.reference_length + 1))
    if self.max_len < 2:
      raise EmbedderError(f"ModelEmbedder max_len={self.max_len} leaves no room for text")
    self.batch_size = int(batch_size)
    self.encode = encode
    self.tokenizer_hash = tokenizer_hash
    self.params = params
    self.params_id = params_id or atomic_io.params_fingerprint(params)
    self.mean = np.zeros(model_config.d_model, dtype=np.float32)
    self._fingerprint: str | None = None
    self._pooled = _pooled_states_fn(model_config, layer)

  @property
  def dim(self) -> int:
    return self.model_config.d_model

  def _tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    cfg = self.model_config
    tokens = np.full((len(texts), self.max_len), cfg.pad_id, dtype=np.int32)
    valid = np.zeros((len(texts), self.max_len), dtype=bool)
    for i, text in enumerate(texts):
      if not isinstance(text, str):
        raise EmbedderError(f"embed: texts[{i}] is {type(text).__name__}, not str")
      ids = [cfg.bos_id] + list(self.encode(text))[:self.max_len - 1]
      tokens[i, :len(ids)] = ids
      valid[i, 1:len(ids)] = True
    return tokens, valid

  def _raw(self, texts: Sequence[str]) -> np.ndarray:
    """Pooled, unnormalised states [n, d_model] (float32)."""
    out = np.zeros((len(texts), self.dim), dtype=np.float32)
    bs = self.batch_size
    for b in range(0, len(texts), bs):
      part = texts[b:b + bs]
      tokens, valid = self._tokens(part)
      if len(part) < bs:  # pad the batch: one compiled shape
        tokens = np.concatenate([tokens, np.zeros((bs - len(part), self.max_len), np.int32)])
        valid = np.concatenate([valid, np.zeros((bs - len(part), self.max_len), bool)])
      pooled = np.asarray(self._pooled(self.params, tokens, valid))
      out[b:b + len(part)] = pooled[:len(part)]
    return out

  def fit(self, texts: Iterable[str], batch_size: int = 1024) -> "ModelEmbedder":
    """Stores the mean pooled state of `texts` (the references), subtracted in `embed`."""
    total = np.zeros(self.dim, dtype=np.float64)
    n = 0
    for batch in _batches(texts, batch_size):
      raw = self._raw(batch)
      total += (raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)).sum(0)
      n += len(batch)
    self.mean = (total / max(n, 1)).astype(np.float32)
    self._fingerprint = None
    return self

  def embed(self, texts: Sequence[str]) -> np.ndarray:
    texts = list(texts)
    raw = self._raw(texts)
    norms = np.linalg.norm(raw, axis=1, keepdims=True)
    has_text = np.array([len(t.strip()) > 0 for t in texts], dtype=bool)[:, None]
    x = raw / np.maximum(norms, 1e-12) - self.mean
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.divide(x, norms, out=np.zeros_like(x), where=(norms > 0) & has_text)
    return x.astype(np.float32)

  def fingerprint(self) -> str:
    if self._fingerprint is None:
      self._fingerprint = atomic_io.content_digest(
          self.kind, STATE_VERSION, self.model_config.fingerprint(), self.params_id,
          self.layer, self.max_len, self.tokenizer_hash,
          hashlib.sha256(self.mean.astype("<f4").tobytes()).hexdigest())
    return self._fingerprint

  def save(self, path: str) -> None:
    settings = dict(layer=self.layer, max_len=self.max_len, tokenizer_hash=self.tokenizer_hash,
                    params_id=self.params_id, model=self.model_config.fingerprint())
    atomic_io.save_npz(path, kind=np.array(self.kind), version=np.array(STATE_VERSION),
               settings=np.array(json.dumps(settings, sort_keys=True)),
               mean=self.mean, fingerprint=np.array(self.fingerprint()))

  def load_state(self, path: str) -> "ModelEmbedder":
    """Restores `fit` state saved by `save`; refuses state from another model or layer."""
    z = _read_npz(path)
    if str(z["kind"]) != self.kind:
      raise EmbedderError(f"embedder state {path!r} is for a {str(z['kind'])!r} embedder")
    saved = json.loads(str(z["settings"]))
    mine = dict(layer=self.layer, max_len=self.max_len, tokenizer_hash=self.tokenizer_hash,
                params_id=self.params_id, model=self.model_config.fingerprint())
    if saved.get("params_id") != self.params_id:
      raise EmbedderError(
          f"embedder state {path!r}: the model embedder fingerprint of its params is "
          f"{saved.get('params_id')!r}, these params give {self.params_id!r} (other params, or "
          "an index built before m3jax.core.artifacts.params_fingerprint); rebuild the index "
          "with `m3jax build-index --overwrite`")
    for key, value in mine.items():
      if saved.get(key) != value:
        raise EmbedderError(f"embedder state {path!r} was fitted with {key}="
                            f"{saved.get(key)!r}, this embedder has {value!r}")
    self.mean = z["mean"].astype(np.float32)
    self._fingerprint = None
    return self


@functools.lru_cache(maxsize=8)
def _pooled_states_fn(model_config: Any, layer: int) -> Callable:
  """jit(params, tokens [B, L], valid [B, L]) -> mean state of layer `layer` [B, D].

  Cached per (config, layer) so every embedder of one model shares a compilation.
  Only layers 0..layer feed the output; XLA prunes the rest and the LM head.
  """
  import jax
  import jax.numpy as jnp

  module = model_lib.Transformer(model_config)
  name = f"layers_{layer}"

  def pooled(params, tokens, valid):
    _, state = module.apply(
        {"params": params}, tokens, mutable=["intermediates"],
        capture_intermediates=lambda mdl, method: mdl.name == name and method == "__call__")
    out = state["intermediates"][name]["__call__"][0]
    h = (out[0] if isinstance(out, (tuple, list)) else out).astype(jnp.float32)
    w = valid.astype(jnp.float32)[..., None]
    return (h * w).sum(axis=1) / jnp.maximum(w.sum(axis=1), 1.0)

  return jax.jit(pooled)


# ---------------------------------------------------------------- factory

def load_embedder(path: str, *, model_config: Any = None, params: Any = None,
                  encode: Callable[[str], Sequence[int]] | None = None,
                  tokenizer_hash: str = "") -> Embedder:
  """Rebuilds the embedder saved at `path` (a lexical state is self-contained;
  a model state needs the same model's config, params and tokenizer)."""
  z = _read_npz(path)
  kind = str(z["kind"])
  if kind == LexicalEmbedder.kind:
    return LexicalEmbedder._from_state(path, z)
  if kind == ModelEmbedder.kind:
    if model_config is None or params is None or encode is None:
      raise EmbedderError(f"embedder state {path!r} is for the model embedder: pass the "
                          "model config, params and tokenizer encode function")
    settings = json.loads(str(z["settings"]))
    emb = ModelEmbedder(model_config, params, encode, layer=settings["layer"],
                        max_len=settings["max_len"], tokenizer_hash=tokenizer_hash)
    return emb.load_state(path)
  raise EmbedderError(f"embedder state {path!r} has unknown kind {kind!r}")


# ---------------------------------------------------------------- from a config

def model_embedder_inputs(params_dir: str, tokenizer: Any) -> dict[str, Any]:
  """model_config, params, encode and tokenizer_hash for a `ModelEmbedder`."""
  saved_cfg, params = params_io.load_params(params_dir)
  return dict(model_config=config_lib.model_config(saved_cfg), params=params,
              encode=tokenizer.encode, tokenizer_hash=getattr(tokenizer, "hash", ""))


def make_embedder(cfg: Any, *, params_dir: str | None = None, tokenizer: Any = None) -> Embedder:
  """The (unfitted) embedder `cfg.data.embedder` names.

  "lexical" needs nothing else; "model" needs a params directory (`m3jax convert`
  or an exported checkpoint) and the tokenizer.
  """
  kind = cfg.data.embedder
  if kind == LexicalEmbedder.kind:
    return LexicalEmbedder.from_config(cfg)
  if kind == ModelEmbedder.kind:
    if not params_dir or tokenizer is None:
      raise ConfigError("config field `data.embedder`: 'model' needs --params (a params "
                        "directory of the trained model) and the workdir's tokenizer")
    inputs = model_embedder_inputs(params_dir, tokenizer)
    return ModelEmbedder(inputs["model_config"], inputs["params"], inputs["encode"],
                         layer=int(cfg.data.get("embed_model_layer", -1)),
                         tokenizer_hash=inputs["tokenizer_hash"])
  raise ConfigError(f"config field `data.embedder`: must be 'lexical' or 'model', got {kind!r}")


def embedder_settings(embedder: Embedder) -> dict[str, Any]:
  """What, besides the fitted state, identifies an embedder (recorded by indexes)."""
  if isinstance(embedder, ModelEmbedder):
    return dict(kind=embedder.kind, layer=embedder.layer, max_len=embedder.max_len,
                model=embedder.model_config.fingerprint(), params=embedder.params_id)
  return dict(kind=embedder.kind, **dataclasses.asdict(embedder.settings))
