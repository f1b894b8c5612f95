"""The model embedder: mean-pooled hidden states of the m3jax model at one layer.

Used with `data.embedder = "model"`; see `ModelEmbedder` for why the model
itself is a sound embedder. Its fingerprint includes the params' fingerprint
(m3jax.core.artifacts.params_fingerprint), so an index built with other
weights is refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.core import artifacts as atomic_io
from m3jax.core import config as config_lib
from m3jax.model import params_io
from m3jax.model import transformer as model_lib
from m3jax.retrieval import embedder as emb_lib
from m3jax.retrieval.embedder import EmbedderError


class ModelEmbedder(emb_lib.Embedder):
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
    for batch in emb_lib.batches(texts, batch_size):
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
          self.kind, emb_lib.STATE_VERSION, self.model_config.fingerprint(), self.params_id,
          self.layer, self.max_len, self.tokenizer_hash,
          hashlib.sha256(self.mean.astype("<f4").tobytes()).hexdigest())
    return self._fingerprint

  def save(self, path: str) -> None:
    settings = dict(layer=self.layer, max_len=self.max_len, tokenizer_hash=self.tokenizer_hash,
                    params_id=self.params_id, model=self.model_config.fingerprint())
    atomic_io.save_npz(path, kind=np.array(self.kind), version=np.array(emb_lib.STATE_VERSION),
                       settings=np.array(json.dumps(settings, sort_keys=True)),
                       mean=self.mean, fingerprint=np.array(self.fingerprint()))

  def load_state(self, path: str) -> "ModelEmbedder":
    """Restores `fit` state saved by `save`; refuses state from another model or layer."""
    z = emb_lib.read_state(path)
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


def model_embedder_inputs(params_dir: str, tokenizer: Any) -> dict[str, Any]:
  """model_config, params, encode and tokenizer_hash for a `ModelEmbedder`."""
  saved_cfg, params = params_io.load_params(params_dir)
  return dict(model_config=config_lib.model_config(saved_cfg), params=params,
              encode=tokenizer.encode, tokenizer_hash=getattr(tokenizer, "hash", ""))
