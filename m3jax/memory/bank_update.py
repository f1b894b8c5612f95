"""Live knowledge edits: add, replace and delete references in a finished bank.

    update_bank(bank_dir, encoder=..., tokenizer=..., references=..., index=...,
                embedder=..., replace={ref_id: text}, add=[text, ...], delete=[ref_id])

Only what the edit touches is computed: the new and replaced references are encoded
with the bank's own model and codec (m3jax.memory.encoder) and written into new
versions of the shards that hold them (deleted rows become empty records: no memory
is left to read); their index vectors go into a small delta index; the references
overlay records their text and tokens (m3jax.memory.bank_edits describes the files).
Nothing the previous version uses is modified.

Steps, each written atomically and skipped on a rerun when already there:

  journal     edits/vN/edit.json: the inputs' digest; a rerun with other inputs is refused
  references  edits/vN/references.npz (cumulative overlay)
  shards      shards/shard-S-vN.npy (+ .json checksum) for every touched shard S
  index       edits/vN/vectors.npz, edits/vN/index/ (delta over every edited reference)
  commit      manifest.json names version N: THE switch (one rename)
  cleanup     files only versions < N-1 used are deleted (a reader still holding version
              N-1 keeps working)

A job killed at any point leaves the bank at version N-1 for every reader; rerunning
the same command finishes version N.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import time
from typing import Any, Callable, Sequence

import numpy as np

from data_pipeline import reference_edits
from m3jax.core import artifacts
from m3jax.memory import bank_edits
from m3jax.memory import bank_format
from m3jax.memory import bank_shards
from m3jax.memory.bank_format import BankError, MANIFEST_FILE
from m3jax.memory.encoder import ReferenceEncoder, encode_batch_records
from m3jax.retrieval import edited_index
from m3jax.retrieval import index as index_lib

STEPS = ("journal", "references", "shards", "index", "commit", "cleanup")
JOURNAL = "edit.json"
OVERLAY = "references.npz"
VECTORS = "vectors.npz"
DELTA_INDEX = "index"


@dataclasses.dataclass
class UpdateResult:
  version: int
  added: list[int]
  replaced: list[int]
  deleted: list[int]
  shards_written: list[int]
  references_encoded: int
  seconds: float
  encode_seconds: float


def inputs_digest(base_version: int, replace: dict[int, str], add: Sequence[str],
                  delete: Sequence[int]) -> str:
  """Identifies one edit of one version (a rerun of a finished edit is recognised by it)."""
  return artifacts.content_digest(
      dict(base_version=int(base_version), add=list(add), delete=sorted(int(i) for i in delete),
           replace=sorted([int(k), v] for k, v in replace.items())))


def _remove_temporaries(path: str) -> None:
  for tmp in glob.glob(path + "*.tmp-*"):
    if os.path.isdir(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
    else:
      os.remove(tmp)


def _write_journal(root: str, vdir: str, new_version: int, digest: str,
                   summary: dict[str, list[int]]) -> None:
  path = os.path.join(root, vdir, JOURNAL)
  if os.path.exists(path):
    old = bank_format.read_json(path)
    if old.get("inputs_sha256") != digest:
      raise BankError(
          f"{path}: an unfinished edit (version {new_version}) with other inputs is in "
          f"progress; rerun it with its own inputs to finish it, or delete "
          f"{os.path.join(root, vdir)} to discard it")
    return
  artifacts.write_json(path, dict(version=new_version, base_version=new_version - 1,
                                  inputs_sha256=digest, **summary))


def _current_overlay(root: str, meta: dict[str, Any], reference_length: int
                     ) -> dict[str, np.ndarray]:
  if bank_edits.version(meta) == 0:
    return reference_edits.empty_overlay(reference_length)
  return reference_edits.load_overlay(os.path.join(root, meta["overlay"]["references"]))[0]


def _shard_records(root: str, meta: dict[str, Any], shard: int, empty: np.ndarray
                   ) -> np.ndarray:
  """The current version's records of `shard` (a copy), or empty records past the end."""
  if shard >= len(meta["shards"]):
    return empty.copy()
  info = meta["shards"][shard]
  bank_shards.verify_shard(root, info, full=True)
  return np.array(np.load(os.path.join(root, info["file"]), allow_pickle=False))


def _write_shards(root: str, meta: dict[str, Any], new_version: int, edit_ids: np.ndarray,
                  deleted: np.ndarray, refs: Any, encoder: ReferenceEncoder, codec: Any,
                  count: int, printer: Callable[[str], None]
                  ) -> tuple[dict[int, dict[str, Any]], list[int], int, float]:
  """Writes every shard the edit touches; returns (shard infos, written, encoded, seconds)."""
  config = encoder.config
  size = int(meta["layout"]["shard_size"])
  batch = encoder.batch_size
  empty = bank_format.empty_records(codec, config, size)
  infos, written, n_encoded, encode_s = {}, [], 0, 0.0
  for s in np.unique(edit_ids // size).tolist():
    rel = bank_edits.edited_shard_file(s, new_version)
    path = os.path.join(root, rel)
    _remove_temporaries(path)
    if os.path.exists(path) and os.path.exists(path + ".json"):
      info = bank_format.read_json(path + ".json")
      try:
        bank_shards.verify_shard(root, info, full=True)
        infos[s] = info
        continue
      except bank_format.CorruptShardError as e:
        printer(f"bank update: {e}; writing it again")
    records = _shard_records(root, meta, s, empty)
    in_shard = edit_ids[(edit_ids // size) == s]
    gone = in_shard[np.isin(in_shard, deleted)]
    records[gone - s * size] = empty[:len(gone)]
    todo = in_shard[~np.isin(in_shard, deleted)]
    t0 = time.perf_counter()
    for lo in range(0, len(todo), batch):
      ids = np.full(batch, -1, np.int64)
      part = todo[lo:lo + batch]
      ids[:len(part)] = part
      recs, _ = encode_batch_records(encoder, refs, codec, ids)
      records[part - s * size] = recs[:len(part)]
    encode_s += time.perf_counter() - t0
    n_encoded += len(todo)
    ids = np.arange(s * size, min((s + 1) * size, count))
    lengths = refs.tokens_by_ids(ids)[1]
    info: dict[str, Any] = {}

    def record(digest: str, n_bytes: int, s=s, rel=rel, lengths=lengths, info=info) -> None:
      info.update(shard=s, file=rel, sha256=digest, bytes=n_bytes,
                  refs=int((lengths > 0).sum()), tokens=int(lengths.sum()))
      artifacts.write_json(os.path.join(root, rel) + ".json", info)

    bank_shards.write_npy(path, records, before_rename=record)
    infos[s] = info
    written.append(s)
  return infos, written, n_encoded, encode_s


def _write_index(root: str, vdir: str, meta: dict[str, Any], overlay: dict[str, np.ndarray],
                 edit_ids: np.ndarray, refs: Any, index: Any, embedder: Any) -> str | None:
  """Vectors of every live edited reference (previous ones reused) and their delta index."""
  out = os.path.join(root, vdir)
  vec_path = os.path.join(out, VECTORS)
  live = np.sort(overlay["ids"][~overlay["deleted"]])
  if not os.path.exists(vec_path):
    ids = np.zeros(0, np.int64)
    vectors = np.zeros((0, index.dim), np.float32)
    if bank_edits.version(meta) > 0:
      with np.load(os.path.join(root, meta["overlay"]["vectors"]), allow_pickle=False) as z:
        ids, vectors = z["ids"], z["vectors"]
    keep = np.isin(ids, live) & ~np.isin(ids, edit_ids)
    ids, vectors = ids[keep], vectors[keep]
    new = live[np.isin(live, edit_ids)]
    if len(new):
      embedder_vectors = np.asarray(embedder.embed(refs.texts_by_ids(new.tolist())), np.float32)
      ids = np.concatenate([ids, new])
      vectors = np.concatenate([vectors, embedder_vectors])
    order = np.argsort(ids)
    artifacts.save_npz(vec_path, ids=ids[order], vectors=vectors[order])
  if not len(live):
    return None
  idx_path = os.path.join(out, DELTA_INDEX)
  if not os.path.exists(os.path.join(idx_path, index_lib.MANIFEST)):
    shutil.rmtree(idx_path, ignore_errors=True)
    with np.load(vec_path, allow_pickle=False) as z:
      delta = edited_index.build_delta(z["vectors"], z["ids"], index.fingerprint,
                                       getattr(index, "embedder_kind", ""))
    delta.save(idx_path, source=dict(kind="bank-edit-delta", version=vdir))
  return f"{vdir}/{DELTA_INDEX}"


def _new_manifest(meta: dict[str, Any], *, new_version: int, vdir: str, count: int,
                  infos: dict[int, dict[str, Any]], overlay_sha: str, index_rel: str | None,
                  masked: np.ndarray, base_index: dict[str, Any], base_count: int,
                  entry: dict[str, Any]) -> dict[str, Any]:
  out = json.loads(json.dumps(meta))
  size = out["layout"]["shard_size"]
  n_shards = bank_format.num_shards(count, size)
  shards = list(out["shards"]) + [None] * (n_shards - len(out["shards"]))
  for s, info in infos.items():
    shards[s] = info
  out["shards"] = shards
  out["layout"]["num_shards"] = n_shards
  out["references"]["count"] = int(count)
  out["totals"].update(references=int(count), shards=n_shards,
                       tokens=sum(i["tokens"] for i in shards),
                       bytes=sum(i["bytes"] for i in shards))
  out["version"] = new_version
  out["overlay"] = dict(references=f"{vdir}/{OVERLAY}", references_sha256=overlay_sha,
                        vectors=f"{vdir}/{VECTORS}", index=index_rel,
                        masked=masked.tolist(), base_references=int(base_count),
                        base_index=base_index)
  out["edits"] = list(out.get("edits", [])) + [entry]
  return out


def _cleanup(root: str, keep: Sequence[dict[str, Any]]) -> int:
  """Deletes shard files and version directories that none of `keep` (manifests) names."""
  names = {i["file"] for m in keep for i in m["shards"]}
  versions = {bank_edits.version(m) for m in keep}
  removed = 0
  for path in glob.glob(os.path.join(root, "shards", "shard-*.npy")):
    rel = os.path.relpath(path, root)
    if rel in names:
      continue
    stem = os.path.basename(path)[:-len(".npy")]
    made_by = int(stem.rsplit("-v", 1)[1]) if "-v" in stem else 0
    if made_by < max(versions):
      for p in (path, path + ".json"):
        if os.path.exists(p):
          os.remove(p)
      removed += 1
  for path in glob.glob(os.path.join(root, bank_edits.EDITS_DIR, "v*")):
    name = os.path.basename(path)[1:]
    if name.isdigit() and int(name) < min(versions):
      shutil.rmtree(path, ignore_errors=True)
      removed += 1
  return removed


def update_bank(root: str, *, encoder: ReferenceEncoder, tokenizer: Any, references: Any,
                index: Any, embedder: Any, replace: dict[int, str] | None = None,
                add: Sequence[str] = (), delete: Sequence[int] = (),
                keep_previous: bool = True, on_step: Callable[[str], None] | None = None,
                printer: Callable[[str], None] = print) -> UpdateResult:
  """Applies one edit to the finished bank at `root` (see the module docstring).

  Args:
    encoder: a ReferenceEncoder of the bank's model and parameters, with the bank's
      encode batch size (the caller checks the parameters: m3jax.memory.edit_job).
    tokenizer: the data root's tokenizer (its hash must be the bank's).
    references: the base references dataset (a ReferenceStore) the bank was encoded from.
    index, embedder: the base index build-index wrote and its embedder.
    replace: ref_id -> new text (one reference); add: new documents; delete: ref_ids.
    keep_previous: keep the files of the previous version (readers that opened it keep
      working); False deletes them now (a deleted reference's bytes leave the disk).
    on_step: called with each step's name once it is done (tests inject failures here).
  """
  t0 = time.perf_counter()
  root = os.path.abspath(root)
  meta = bank_edits.read_meta(root)
  where = os.path.join(root, MANIFEST_FILE)
  bank_format.check_compatible(meta, where, model_config=encoder.config,
                               tokenizer_hash=tokenizer.hash)
  if encoder.batch_size != int(meta["layout"]["encode_batch_size"]):
    raise BankError(f"{where}: encoded in batches of {meta['layout']['encode_batch_size']}, "
                    f"the encoder uses {encoder.batch_size}")
  step = on_step or (lambda name: None)
  config = encoder.config
  replace = {int(k): v for k, v in (replace or {}).items()}
  add, delete = list(add), [int(i) for i in delete]
  v = bank_edits.version(meta)
  if v and meta["edits"][-1]["inputs_sha256"] == inputs_digest(v - 1, replace, add, delete):
    printer(f"bank update: this edit is already version {v} of {root} (finished by an "
            "earlier run); nothing to do")
    last = meta["edits"][-1]
    return UpdateResult(v, last["added"], last["replaced"], last["deleted"], [], 0, 0.0, 0.0)
  length = int(meta["references"]["reference_length"])
  cur = bank_edits.edited_references(root, meta, references)
  base_index = (meta["overlay"]["base_index"] if v else bank_edits.index_identity(index))
  bank_edits.edited_index(root, meta, index)  # refuses an index the edits were not made over
  try:
    edit = reference_edits.tokenize_edit(tokenizer, length, base_count=len(cur),
                                         replace=replace, add=add, delete=delete,
                                         doc_ids_of=cur.doc_ids)
  except reference_edits.ReferenceEditError as e:
    raise BankError(f"bank update: {e}") from e
  if not len(edit["ids"]):
    raise BankError("bank update: nothing to do (give references to add, replace or delete)")
  new_version = v + 1
  vdir = bank_edits.version_dir(new_version)
  summary = reference_edits.describe(edit, len(cur))
  _remove_temporaries(os.path.join(root, vdir))
  _write_journal(root, vdir, new_version, inputs_digest(v, replace, add, delete), summary)
  step("journal")

  overlay = reference_edits.merge(_current_overlay(root, meta, length), edit)
  count = max(len(cur), int(edit["ids"].max()) + 1)
  ov_path = os.path.join(root, vdir, OVERLAY)
  if not os.path.exists(ov_path):
    reference_edits.save_overlay(ov_path, overlay, count)
  refs = reference_edits.EditedReferences.open(getattr(cur, "base", cur), ov_path)
  step("references")

  codec = bank_format.load_codec(root, meta, config)
  deleted = edit["ids"][edit["deleted"]]
  infos, written, n_encoded, encode_s = _write_shards(
      root, meta, new_version, np.sort(edit["ids"]), deleted, refs, encoder, codec, count,
      printer)
  step("shards")

  index_rel = _write_index(root, vdir, meta, overlay, edit["ids"], refs, index, embedder)
  step("index")

  base_count = len(getattr(cur, "base", cur))
  masked = np.sort(overlay["ids"][overlay["ids"] < base_count])
  seconds = time.perf_counter() - t0
  entry = dict(version=new_version, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               inputs_sha256=bank_format.read_json(os.path.join(root, vdir, JOURNAL))
               ["inputs_sha256"], shards_written=sorted(infos), **summary)
  new_meta = _new_manifest(meta, new_version=new_version, vdir=vdir, count=count, infos=infos,
                           overlay_sha=artifacts.sha256_file(ov_path), index_rel=index_rel,
                           masked=masked, base_index=base_index, base_count=base_count,
                           entry=entry)
  artifacts.write_json(where, new_meta)
  step("commit")
  _cleanup(root, [meta, new_meta] if keep_previous else [new_meta])
  step("cleanup")
  printer(f"bank update: version {new_version}: {len(summary['added'])} added, "
          f"{len(summary['replaced'])} replaced, {len(summary['deleted'])} deleted; "
          f"{n_encoded} references encoded into {len(infos)} shard(s) in "
          f"{encode_s:.2f}s; {time.perf_counter() - t0:.2f}s in all")
  return UpdateResult(new_version, summary["added"], summary["replaced"], summary["deleted"],
                      written, n_encoded, time.perf_counter() - t0, encode_s)
