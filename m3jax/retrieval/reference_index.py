"""The reference index of a prepared workdir: `<data root>/index` (m3jax build-index).

`build_reference_index` fits the configured embedder (`data.embedder`) on every
reference text, embeds them and saves a ScaNN index (m3jax.retrieval.index)
with ids = ref_id, the embedder state beside it, and a `source` record of what
was indexed (references settings hash, tokenizer, embedder and index settings),
so a rerun with the same inputs reuses it and later stages refuse a stale one.
`load_reference_index` opens it together with its embedder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from data_pipeline import prepared
from m3jax.core import workspace
from m3jax.core.progress import Progress
from m3jax.retrieval import embedder_factory
from m3jax.retrieval import index as index_lib
from m3jax.retrieval import model_embedder
from m3jax.retrieval.index import Index, IndexDirError, IndexSettings


def build_reference_index(cfg: Any, workdir: str, *, params_dir: str | None = None,
                          out: str | None = None, overwrite: bool = False,
                          settings: IndexSettings | None = None, batch_size: int = 4096,
                          progress_every_s: float | None = 30.0) -> Index:
  """Embeds every reference of a prepared workdir and saves the index (ids = ref_id).

  The embedder comes from `cfg.data.embedder` (fitted on the reference texts) and
  is saved in the index directory. An existing index built from the same inputs
  is reused; one built from other inputs is refused unless `overwrite`.
  """

  root = workspace.data_root(cfg, workdir)
  manifest = prepared.load_manifest(root)
  refs = prepared.open_references(root)
  tok = prepared.open_tokenizer(root)
  out = os.path.abspath(out or workspace.index_dir(cfg, workdir))
  emb = embedder_factory.make_embedder(cfg, params_dir=params_dir, tokenizer=tok)
  settings = settings or IndexSettings()
  source = dict(references=dict(settings_hash=manifest["stages"]["references"]["settings_hash"],
                                count=len(refs)),
                tokenizer=tok.hash, embedder=embedder_factory.embedder_settings(emb),
                index_settings=dataclasses.asdict(settings))
  if os.path.exists(out) and not overwrite:
    old = index_lib.read_manifest(out).get("source")
    if old != json.loads(json.dumps(source)):
      raise IndexDirError(f"{out} holds an index of other inputs (source {old} vs {source}); "
                          "pass --overwrite or another --out")
    print(f"build-index: reusing {out} ({len(refs)} references)", flush=True)
    return index_lib.load_index(out)
  n = len(refs)
  if n == 0:
    raise IndexDirError(f"{root}: the reference dataset is empty; nothing to index")

  def texts():
    for lo in range(0, n, batch_size):
      yield from refs.texts_by_ids(range(lo, min(n, lo + batch_size)))

  emb.fit(texts())
  progress = Progress(n, desc="build-index: embedding", unit="refs",
                      every_s=progress_every_s or 0.0, enabled=progress_every_s is not None)
  vectors = np.zeros((n, emb.dim), np.float32)
  for lo in range(0, n, batch_size):
    hi = min(n, lo + batch_size)
    vectors[lo:hi] = emb.embed(refs.texts_by_ids(range(lo, hi)))
    progress.update(hi - lo)
  progress.close()
  index = Index.build(vectors, np.arange(n, dtype=np.int64), fingerprint=emb.fingerprint(),
                      settings=settings, embedder_kind=emb.kind)
  index.save(out, embedder=emb, overwrite=overwrite, source=source)
  return index


def load_reference_index(path: str, *, params_dir: str | None = None,
                         tokenizer: Any = None) -> tuple[Index, Any]:
  """Opens an index directory and the embedder saved in it; returns (index, embedder).

  A model embedder also needs the params directory and tokenizer it was built with.
  """
  manifest = index_lib.read_manifest(path)
  state = os.path.join(path, index_lib.EMBEDDER_STATE)
  kwargs: dict[str, Any] = {}
  if manifest.get("embedder_kind") == "model":
    if params_dir is None or tokenizer is None:
      raise IndexDirError(f"index {path} was built with the model embedder: pass the params "
                          "directory (--params) and the tokenizer")
    kwargs = model_embedder.model_embedder_inputs(params_dir, tokenizer)
  emb = embedder_factory.load_embedder(state, **kwargs)
  return index_lib.load_index(path, embedder=emb), emb
