"""An edited bank's knowledge base: its references and index as of the bank's version.

A bank that `m3jax bank update` (m3jax.memory.bank_update) has edited records, in its
manifest, `version` (0 = as encoded, +1 per edit), the history of `edits`, and the
`overlay` of the current version:

    <bank>/edits/v000003/references.npz   references changed by versions 1..3
                                          (data_pipeline.reference_edits)
    <bank>/edits/v000003/vectors.npz      their index vectors (ids, vectors)
    <bank>/edits/v000003/index/           exact delta index over those vectors
    <bank>/shards/shard-000007-v000003.npy   a shard rewritten by version 3

Everything a version names is written before the manifest that names it and never
modified afterwards, so a reader that reads the manifest once (MemoryBank.open keeps
it as `meta`) sees one version throughout: `edited_references` and `edited_index`
take that `meta`, so references, index and memories always come from the same
version. An unedited bank returns its inputs unchanged.
"""

from __future__ import annotations

import os
from typing import Any

from data_pipeline import reference_edits
from m3jax.core import artifacts
from m3jax.memory.bank_format import MANIFEST_FILE, BankError, BankMismatchError, read_json
from m3jax.retrieval import edited_index as edited_index_lib
from m3jax.retrieval import index as index_lib

EDITS_DIR = "edits"


def version_dir(version: int) -> str:
  """Directory (relative to the bank root) of one version's overlay files."""
  return f"{EDITS_DIR}/v{version:06d}"


def edited_shard_file(shard: int, version: int) -> str:
  """A shard rewritten by `version` (the original is `shards/shard-NNNNNN.npy`)."""
  return f"shards/shard-{shard:06d}-v{version:06d}.npy"


def read_meta(root: str) -> dict[str, Any]:
  """The bank's manifest (one read: pass it on, so every view is of one version)."""
  path = os.path.join(root, MANIFEST_FILE)
  if not os.path.isfile(path):
    raise BankError(f"{path} not found: {root} is not a finished memory bank")
  return read_json(path)


def version(meta: dict[str, Any]) -> int:
  return int(meta.get("version", 0))


def index_identity(index: Any) -> dict[str, Any]:
  """What an edit records of the base index it masks (checked when the edit is read)."""
  path = getattr(index, "path", None)
  digest = (artifacts.sha256_file(os.path.join(path, index_lib.MANIFEST))
            if path and os.path.isfile(os.path.join(path, index_lib.MANIFEST)) else "")
  return dict(count=int(index.count), embedder_fingerprint=index.fingerprint,
              manifest_sha256=digest)


def _check_base_references(meta: dict[str, Any], references: Any, where: str) -> None:
  want = int(meta["overlay"]["base_references"])
  have = len(getattr(references, "base", references))
  if have != want:
    raise BankMismatchError(f"{where}: the bank's edits were made over a references dataset "
                            f"of {want} references; the one given holds {have} (pass the "
                            "prepare-data directory the bank was encoded from)")


def edited_references(root: str, meta: dict[str, Any], references: Any) -> Any:
  """`references` (the base store) as of the bank's version."""
  if version(meta) == 0:
    return references
  where = os.path.join(root, MANIFEST_FILE)
  _check_base_references(meta, references, where)
  path = os.path.join(root, meta["overlay"]["references"])
  digest = artifacts.sha256_file(path)
  if digest != meta["overlay"]["references_sha256"]:
    raise BankMismatchError(f"{path}: sha256 {digest[:16]}... does not match the manifest's "
                            f"{meta['overlay']['references_sha256'][:16]}...")
  return reference_edits.EditedReferences.open(references, path)


def edited_index(root: str, meta: dict[str, Any], index: Any) -> Any:
  """`index` (the base index build-index wrote) as of the bank's version."""
  if version(meta) == 0:
    return index
  where = os.path.join(root, MANIFEST_FILE)
  want = meta["overlay"]["base_index"]
  have = index_identity(index)
  for key in ("count", "embedder_fingerprint", "manifest_sha256"):
    if want.get(key) and have[key] and want[key] != have[key]:
      raise BankMismatchError(f"{where}: the bank's edits mask the index with {key} "
                              f"{want[key]}; the index given ({getattr(index, 'path', '?')}) "
                              f"has {have[key]} (pass the index the edits were made over)")
  delta = None
  if meta["overlay"].get("index"):
    delta = index_lib.load_index(os.path.join(root, meta["overlay"]["index"]),
                                 fingerprint=index.fingerprint, dim=index.dim)
  return edited_index_lib.EditedIndex(index, delta, meta["overlay"]["masked"])


def apply_to_retriever(root: str, meta: dict[str, Any], retriever: Any, references: Any
                       ) -> tuple[Any, Any]:
  """(retriever, references) as of the bank's version: the retriever searches the
  edited index and its leakage filter reads the edited references."""
  refs = edited_references(root, meta, references)
  if retriever is not None:
    retriever.index = edited_index(root, meta, retriever.index)
    retriever.references = refs if retriever.references is not None else None
  return retriever, refs
