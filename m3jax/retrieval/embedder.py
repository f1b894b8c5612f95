"""Text embedders for retrieval: the interface every embedder implements.

An embedder maps texts to L2-normalised float32 vectors. The paper embeds
references and 64-token query chunks with BGE-M3 and searches by cosine
similarity (docs/model.md); m3jax downloads no checkpoints, so it ships two:

- `LexicalEmbedder` (m3jax.retrieval.lexical_embedder; default,
  `data.embedder = "lexical"`): hashed TF-IDF of words, bigrams and character
  n-grams, no model.
- `ModelEmbedder` (m3jax.retrieval.model_embedder; `data.embedder = "model"`):
  mean-pooled hidden states of the m3jax model itself.

m3jax.retrieval.embedder_factory builds one from a config or loads a saved one.

Every embedder has `dim`, `embed(texts)` and a `fingerprint()` that changes with
every setting and fitted statistic that changes its vectors; an index records the
fingerprint of the embedder that built it and refuses queries from another one.
State (fitted IDF or mean vector) is saved as `.npz` without pickle; `read_state`
reads and checks such a file.
"""

from __future__ import annotations

import abc
import os
from typing import Any, Iterable, Sequence

import numpy as np

from m3jax.core import errors

STATE_VERSION = 1


class EmbedderError(errors.UserError, ValueError):
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


def batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
  """`items` in lists of `size` (the last may be shorter)."""
  batch: list[Any] = []
  for item in items:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def read_state(path: str) -> dict[str, np.ndarray]:
  """The arrays of a saved embedder state, checked for kind, settings and version."""
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
