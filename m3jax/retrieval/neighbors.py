"""Neighbor mining: one retrieved reference per 64-token chunk of every training sequence.

For each packed training sequence and each of its chunks (model.chunk_length
tokens): decode the chunk, embed it, take the ScaNN top `data.neighbor_candidates`
references, drop any reference whose eq. 6 overlap with the WHOLE training
sequence exceeds `data.train_overlap_threshold` (0.9; the paper's anti-copying
rule), optionally drop references from a document of the sequence
(`data.exclude_same_doc`), and keep the best `data.neighbors_per_chunk` (1).
An all-padding chunk gets none. The embed -> search -> filter -> top-k sequence
is the retrieval core (m3jax.retrieval.search). The result is the neighbor
table (format and reader: m3jax.retrieval.neighbor_table).

Every shard is written to a temporary file and renamed, so an existing shard is
always complete. A rerun with the same inputs skips finished shards and, because
every step is deterministic, writes byte-identical files; a rerun with other
inputs is refused. Several processes split the shards (shard i goes to process
i mod process_count).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from data_pipeline import prepared
from data_pipeline import tfds_builders
from m3jax.core import artifacts as atomic_io
from m3jax.core import workspace
from m3jax.core.errors import InputError
from m3jax.core.progress import Progress
from m3jax.retrieval import index as index_lib
from m3jax.retrieval import neighbor_table as table_lib
from m3jax.retrieval import reference_index
from m3jax.retrieval import search as search_lib
from m3jax.retrieval.neighbor_table import MiningSettings, NeighborTableError

def _rejected(sequence: np.ndarray, candidates: np.ndarray, ref_tokens: Mapping[int, np.ndarray],
              settings: MiningSettings, sequence_doc_keys: np.ndarray | None,
              ref_doc_keys: Mapping[int, int] | None) -> np.ndarray:
  """bool [C, n]: candidates that copy the WHOLE sequence or (exclude_same_doc) share
  one of its documents."""
  t = np.asarray(sequence)
  t = t[t != settings.pad_id]
  bad = search_lib.overlapping(t, candidates, lambda ids: [ref_tokens[int(r)] for r in ids],
                               settings.overlap_threshold)
  if settings.exclude_same_doc:
    if sequence_doc_keys is None or ref_doc_keys is None:
      raise ValueError("exclude_same_doc needs the sequence's and the references' doc keys")
    own = {int(k) for k in np.asarray(sequence_doc_keys).reshape(-1) if k >= 0}
    same = [int(r) for r in np.unique(candidates[candidates >= 0])
            if int(ref_doc_keys[int(r)]) in own]
    bad |= np.isin(candidates, same)
  return bad


def select_neighbors(sequence: np.ndarray, candidates: np.ndarray,
                     ref_tokens: Mapping[int, np.ndarray], settings: MiningSettings, *,
                     sequence_doc_keys: np.ndarray | None = None,
                     ref_doc_keys: Mapping[int, int] | None = None) -> np.ndarray:
  """Picks each chunk's neighbors from its ranked candidates.

  Args:
    sequence: int [T] the training sequence (padding is ignored).
    candidates: int [C, n] ref ids per chunk, best first (-1 = none).
    ref_tokens: ref id -> its tokens, for every id in `candidates`.
    sequence_doc_keys: doc keys present in the sequence (exclude_same_doc).
    ref_doc_keys: ref id -> doc key (exclude_same_doc).

  Returns int32 [C, K], -1 where fewer than K candidates survive.
  """
  candidates = np.asarray(candidates, np.int64)
  bad = _rejected(sequence, candidates, ref_tokens, settings, sequence_doc_keys, ref_doc_keys)
  ids, _, _ = search_lib.keep_best(candidates, bad, settings.neighbors_per_chunk)
  return ids.astype(np.int32)


def mine_block(sequences: np.ndarray, *, decode: Callable[[list[np.ndarray]], list[str]],
               embedder: Any, index: Any,
               ref_tokens: Callable[[np.ndarray], Sequence[np.ndarray]],
               settings: MiningSettings, doc_keys: np.ndarray | None = None,
               ref_doc_keys: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
  """Neighbor rows for a block of sequences: int32 [S, C, K].

  `decode(list of token arrays) -> texts`; `ref_tokens(ids) -> token arrays`;
  `doc_keys` [S, C] (per chunk) and `ref_doc_keys(ids)` for exclude_same_doc.
  The chunks go through the retrieval core (m3jax.retrieval.search), filtered
  against their whole sequence.
  """
  seqs = np.asarray(sequences)
  if seqs.ndim != 2 or seqs.shape[1] % settings.chunk_length:
    raise ValueError(f"mine_block: sequences have shape {seqs.shape}; need [S, T] with T a "
                     f"multiple of chunk_length={settings.chunk_length}")
  if settings.exclude_same_doc and (doc_keys is None or ref_doc_keys is None):
    raise ValueError("data.exclude_same_doc needs doc keys of the sequences and references")
  S, T = seqs.shape
  C = T // settings.chunk_length
  n = settings.candidates
  chunks = seqs.reshape(S * C, settings.chunk_length)
  skip = np.isin(chunks, np.asarray(settings.skip_ids))
  live = np.nonzero(~skip.all(axis=1))[0]

  def reject(live_cands: np.ndarray) -> np.ndarray:
    cands = np.full((S * C, n), -1, dtype=np.int64)
    cands[live] = live_cands
    cands = cands.reshape(S, C, n)
    uniq = np.unique(cands[cands >= 0])
    toks = dict(zip(uniq.tolist(), ref_tokens(uniq))) if len(uniq) else {}
    rdk = None
    if settings.exclude_same_doc:
      rdk = dict(zip(uniq.tolist(), np.asarray(ref_doc_keys(uniq)).tolist())) if len(uniq) \
          else {}
    bad = np.stack([_rejected(seqs[s], cands[s], toks, settings,
                              None if doc_keys is None else doc_keys[s], rdk)
                    for s in range(S)])
    return bad.reshape(S * C, n)[live]

  out = np.full((S * C, settings.neighbors_per_chunk), -1, dtype=np.int32)
  if len(live):
    texts = decode([chunks[i][chunks[i] != settings.pad_id] for i in live])
    ids, _, _ = search_lib.retrieve(embedder, index, texts, k=settings.neighbors_per_chunk,
                                    fetch=n, reject=reject)
    out[live] = ids
  return out.reshape(S, C, settings.neighbors_per_chunk)


def mine_neighbors(out_dir: str, *, sequences: Any, decode: Callable[[list[np.ndarray]], list[str]],
                   embedder: Any, index: Any,
                   ref_tokens: Callable[[np.ndarray], Sequence[np.ndarray]],
                   settings: MiningSettings, inputs: Mapping[str, Any],
                   doc_keys: Any = None,
                   ref_doc_keys: Callable[[np.ndarray], np.ndarray] | None = None,
                   process_index: int = 0, process_count: int = 1,
                   max_shards: int | None = None,
                   progress_every_s: float | None = 30.0) -> dict[str, Any]:
  """Mines the neighbor table for `sequences` into `out_dir`, resumably.

  Args:
    sequences: [N, T] int array or anything with len() and [lo:hi] -> int [S, T].
    doc_keys: [N, C] per-chunk doc keys (same indexing), for exclude_same_doc.
    inputs: identity of corpus, references, index, embedder, tokenizer (stored in
      the manifest; a rerun with different inputs is refused).
    process_index / process_count: this process does shards i with
      i % process_count == process_index.
    max_shards: stop after writing this many new shards (tests; partial runs).
    progress_every_s: print a progress line (rate, ETA) this often; None = quiet.

  Returns the manifest. Raises NeighborTableError if `out_dir` holds a table
  made from other inputs or settings.
  """
  settings.check()
  index.check_embedder(embedder)
  n = len(sequences)
  if n == 0:
    raise InputError("mine_neighbors: no sequences")
  first = np.asarray(sequences[0:1])
  T = int(first.shape[-1])
  if T % settings.chunk_length:
    raise InputError(f"sequences have length {T}, not a multiple of chunk_length "
                     f"{settings.chunk_length} (model.chunk_length)")
  if not 0 <= process_index < process_count:
    raise InputError(f"process_index {process_index} not in [0, {process_count})")
  manifest = table_lib.table_manifest(n_sequences=n, seq_len=T, settings=settings, inputs=inputs)
  os.makedirs(out_dir, exist_ok=True)
  mpath = os.path.join(out_dir, table_lib.MANIFEST)
  if os.path.exists(mpath):
    with open(mpath) as f:
      old = json.load(f)
    if old != manifest:
      diffs = "; ".join(atomic_io.dict_diff(old, manifest)[:8])
      raise NeighborTableError(
          f"{out_dir} holds a neighbor table made with other inputs or settings ({diffs}); "
          "remove it or choose another directory")
  else:
    atomic_io.write_json(mpath, manifest)  # every process writes the same bytes
  for stale in glob.glob(os.path.join(out_dir, "*.tmp-*")):
    if stale.endswith(f".tmp-{os.getpid()}") or process_count == 1:
      os.remove(stale)
  mine = [i for i in range(manifest["n_shards"]) if i % process_count == process_index]
  todo = [i for i in mine if not os.path.exists(os.path.join(out_dir, table_lib.shard_name(i)))]
  progress = None
  if progress_every_s is not None:
    progress = Progress(sum(min(n, (i + 1) * settings.shard_size) - i * settings.shard_size
                            for i in todo), desc=f"mine-neighbors [{process_index}]",
                        unit="seqs", every_s=progress_every_s)
  written = 0
  for i in todo:
    if max_shards is not None and written >= max_shards:
      break
    lo, hi = i * settings.shard_size, min(n, (i + 1) * settings.shard_size)
    rows = mine_block(np.asarray(sequences[lo:hi]), decode=decode, embedder=embedder,
                      index=index, ref_tokens=ref_tokens, settings=settings,
                      doc_keys=None if doc_keys is None else np.asarray(doc_keys[lo:hi]),
                      ref_doc_keys=ref_doc_keys)
    if settings.neighbors_per_chunk == 1:
      rows = rows[..., 0]
    atomic_io.save_npy(os.path.join(out_dir, table_lib.shard_name(i)), np.ascontiguousarray(rows))
    written += 1
    if progress is not None:
      progress.update(hi - lo)
  if progress is not None:
    progress.close()
  return manifest


class PackedColumn:
  """One field of a packed split as an [N, ...] array-like: len() and [lo:hi]."""

  def __init__(self, source: Any, field: str, dtype: Any):
    self.source, self.field, self.dtype = source, field, dtype

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, item: slice) -> np.ndarray:
    if not isinstance(item, slice):
      raise TypeError("PackedColumn supports slices only")
    idx = list(range(*item.indices(len(self.source))))
    recs = self.source.__getitems__(idx) if idx else []
    return np.stack([np.asarray(r[self.field], self.dtype) for r in recs]) if recs else \
        np.zeros((0,), self.dtype)


def mine_workdir(cfg: Any, workdir: str, *, split: str = "train", params_dir: str | None = None,
                 index_path: str | None = None, out: str | None = None,
                 process_index: int = 0, process_count: int = 1,
                 max_shards: int | None = None,
                 progress_every_s: float | None = 30.0) -> dict[str, Any]:
  """Mines the neighbor table of a prepared workdir (after `m3jax build-index`)."""

  root = workspace.data_root(cfg, workdir)
  tok = prepared.open_tokenizer(root)
  refs = prepared.open_references(root)
  index_path = os.path.abspath(index_path or workspace.index_dir(cfg, workdir))
  if not os.path.isdir(index_path):
    raise index_lib.IndexDirError(f"index {index_path} not found: run `m3jax build-index` "
                                  "for this workdir first (or pass --index)")
  index, embedder = reference_index.load_reference_index(index_path, params_dir=params_dir,
                                                   tokenizer=tok)
  identity = table_lib.expected_identity(cfg, root, split)
  src = index.source
  want_refs = identity["inputs"]["references"]["settings_hash"]
  if src.get("references", {}).get("settings_hash") != want_refs or \
      src.get("tokenizer") != tok.hash:
    raise index_lib.IndexDirError(
        f"index {index_path} was built from other references or another tokenizer than "
        f"{root} has now; rerun `m3jax build-index --overwrite`")
  packed = tfds_builders.open_split(prepared.dataset_path(root, "packed"), split)
  settings = MiningSettings.from_config(cfg, int(cfg.data.get("neighbor_shard_size", 1024)))
  index_manifest = os.path.join(index_path, index_lib.MANIFEST)
  inputs = dict(identity["inputs"],
                index=dict(path=os.path.relpath(index_path, root), count=index.count,
                           manifest_sha256=atomic_io.sha256_file(index_manifest)),
                embedder=embedder.fingerprint())
  inputs["corpus"]["n_sequences"] = len(packed)

  def ref_tokens(ids: np.ndarray) -> list[np.ndarray]:
    toks, lens = refs.tokens_by_ids(ids)
    return [toks[i, :lens[i]] for i in range(len(ids))]

  return mine_neighbors(
      out or workspace.neighbors_dir(root, split),
      sequences=PackedColumn(packed, "tokens", np.int32), decode=tok.decode_batch,
      embedder=embedder, index=index, ref_tokens=ref_tokens, settings=settings, inputs=inputs,
      doc_keys=(PackedColumn(packed, "chunk_doc_keys", np.int64)
                if settings.exclude_same_doc else None),
      ref_doc_keys=refs.doc_keys if settings.exclude_same_doc else None,
      process_index=process_index, process_count=process_count, max_shards=max_shards,
      progress_every_s=progress_every_s)
