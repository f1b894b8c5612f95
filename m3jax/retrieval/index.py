"""ScaNN nearest-neighbour index over reference embeddings (cosine = inner product).

The paper retrieves with dense cosine search; m3jax uses ScaNN (CPU, no
TensorFlow). Below `brute_force_below` vectors (or with `force_brute_force`) the
searcher scores every vector exactly; above it, it is a k-means tree with
anisotropic-hashing scoring and exact float32 re-ranking of the best candidates.
How many leaves it searches and how many candidates it re-ranks are chosen at
build time for a target recall (m3jax.retrieval.index_tuning), measured on a
sample of the indexed vectors used as queries (each one's own entry left out).

An index directory holds:

    manifest.json   format, version, count, dim, embedder fingerprint and kind,
                    build settings, source (what was indexed: references settings
                    hash and count, tokenizer hash, embedder settings), and the
                    size + sha256 of every file below
    ids.npy         int64 [count]: our id (ref_id) of each ScaNN datapoint
    embedder.npz    optional: the state of the embedder that built the index
    scann/          the ScaNN searcher (`serialize`, relative asset paths)

It is written to a temporary directory and renamed into place, so a directory
with a manifest is always complete. Loading checks the manifest, the files and
(optionally) the embedder fingerprint and vector width, with errors naming the
directory and the field. m3jax.retrieval.sharded_index merges several such
directories; m3jax.retrieval.reference_index builds and opens the index of a
prepared workdir.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Any, Sequence

import numpy as np

from m3jax.core import artifacts as atomic_io
from m3jax.core import errors
from m3jax.retrieval import index_tuning

FORMAT = "m3jax-index"
VERSION = 1
MANIFEST = "manifest.json"
IDS = "ids.npy"
EMBEDDER_STATE = "embedder.npz"
SEARCHER = "scann"


class IndexDirError(errors.UserError, ValueError):
  """A missing, corrupt or mismatched index directory; the message names it."""


@dataclasses.dataclass(frozen=True)
class IndexSettings:
  """How an index is built and searched (recorded in its manifest).

  num_leaves = 0 picks ~sqrt(count) leaves. With `target_recall` > 0 the build
  chooses leaves_to_search and reorder: the least work whose recall@`tune_k` on
  `tune_queries` indexed vectors (used as queries, their own entry left out)
  reaches the target; the default 0.96 leaves room for the sampling error of
  ~0.005 so that new queries from the same distribution get >= 0.95. With
  `target_recall` = 0, leaves_to_search = 0 searches ~1/8 of the leaves (at least
  16) and `reorder` candidates are re-ranked.
  """
  brute_force_below: int = 20_000
  force_brute_force: bool = False
  num_leaves: int = 0
  leaves_to_search: int = 0
  training_sample_size: int = 250_000
  dims_per_block: int = 2
  anisotropic_threshold: float = 0.2
  reorder: int = 256
  training_threads: int = 0
  target_recall: float = 0.96
  tune_k: int = 5
  tune_queries: int = 1000
  tune_seed: int = 0

  def resolved(self, count: int) -> dict[str, Any]:
    """Concrete settings for `count` vectors (mode, leaves, ...)."""
    d = dataclasses.asdict(self)
    if self.force_brute_force or count < self.brute_force_below:
      d["mode"] = "brute_force"
      return d
    leaves = self.num_leaves or int(min(max(math.sqrt(count), 16), count // 20 or 1))
    d["mode"] = "tree_ah"
    d["num_leaves"] = leaves
    d["leaves_to_search"] = self.leaves_to_search or min(leaves, max(16, leaves // 8))
    d["training_sample_size"] = min(self.training_sample_size, count)
    return d


def normalise_queries(queries: np.ndarray, dim: int, where: str) -> np.ndarray:
  """`queries` as a contiguous float32 [q, dim] array; a wrong width names `where`."""
  q = np.asarray(queries, dtype=np.float32)
  if q.ndim == 1:
    q = q[None]
  if q.ndim != 2 or q.shape[1] != dim:
    raise ValueError(f"{where}: queries have shape {q.shape}, the index holds {dim}-dim "
                     "vectors (was it built with another embedder or data.embed_dim?)")
  return np.ascontiguousarray(q)


def top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Best k per row by score (ties: smaller id first); pads with id -1, score -inf."""
  q, n = scores.shape
  if n < k:
    scores = np.concatenate([scores, np.full((q, k - n), -np.inf, np.float32)], axis=1)
    ids = np.concatenate([ids, np.full((q, k - n), -1, np.int64)], axis=1)
  # Sort by (-score, id); -1 padding sorts last because its score is -inf.
  order = np.lexsort((ids, -scores), axis=1)[:, :k]
  return (np.take_along_axis(ids, order, axis=1),
          np.take_along_axis(scores, order, axis=1).astype(np.float32))


def _leave_out(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
  """Each row of `ids` [q, k + 1] without the row's `own` id, first k kept (order kept)."""
  order = np.argsort(ids == np.asarray(own)[:, None], axis=1, kind="stable")[:, :k]
  return np.take_along_axis(ids, order, axis=1)


def brute_force_search(database: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int,
                       block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
  """Exact inner-product top-k over `database` [n, dim] (the recall reference)."""
  queries = np.asarray(queries, dtype=np.float32)
  ids = np.asarray(ids, dtype=np.int64)
  best_i = np.full((len(queries), 0), -1, np.int64)
  best_s = np.full((len(queries), 0), -np.inf, np.float32)
  for b in range(0, len(database), block):
    s = queries @ np.asarray(database[b:b + block], dtype=np.float32).T
    cand = min(k, s.shape[1])
    part = np.argpartition(-s, cand - 1, axis=1)[:, :cand] if cand < s.shape[1] else \
        np.broadcast_to(np.arange(s.shape[1]), s.shape)
    best_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
    best_i = np.concatenate([best_i, ids[b:b + block][part]], axis=1)
    best_i, best_s = top_k(best_s, best_i, min(k, best_s.shape[1]))
  return top_k(best_s, best_i, k)


class Index:
  """One ScaNN searcher plus the id map and the identity of its embedder."""

  def __init__(self, searcher: Any, ids: np.ndarray, dim: int, fingerprint: str,
               settings: dict[str, Any], path: str | None = None, embedder_kind: str = "",
               source: dict[str, Any] | None = None):
    self.searcher = searcher
    self.source = dict(source or {})  # what was indexed (references, tokenizer, ...)
    self.ids = np.asarray(ids, dtype=np.int64)
    self.dim = int(dim)
    self.fingerprint = fingerprint
    self.settings = settings
    self.path = path
    self.embedder_kind = embedder_kind
    self._vectors: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def count(self) -> int:
    return len(self.ids)

  # ------------------------------------------------------------ building

  @classmethod
  def build(cls, vectors: np.ndarray, ids: np.ndarray | None = None, *, fingerprint: str,
            settings: IndexSettings | None = None, embedder_kind: str = "") -> "Index":
    """Builds an index over L2-normalised float32 `vectors` [n, dim] with `ids` [n]."""
    from scann.scann_ops.py import scann_ops_pybind  # heavy native library, loaded on use

    vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
      raise ValueError(f"build_index: need a non-empty [n, dim] array, got {vectors.shape}")
    n, dim = vectors.shape
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if ids.shape != (n,):
      raise ValueError(f"build_index: ids have shape {ids.shape}, expected ({n},)")
    if len(np.unique(ids)) != n:
      raise ValueError("build_index: ids are not unique")
    if not np.all(np.isfinite(vectors)):
      raise ValueError("build_index: vectors contain NaN or inf")
    settings = settings or IndexSettings()
    resolved = settings.resolved(n)
    builder = scann_ops_pybind.builder(vectors, 10, "dot_product")
    if resolved["mode"] == "brute_force":
      builder = builder.score_brute_force()
    else:
      builder = builder.tree(
          num_leaves=resolved["num_leaves"], num_leaves_to_search=resolved["leaves_to_search"],
          training_sample_size=resolved["training_sample_size"]).score_ah(
              resolved["dims_per_block"],
              anisotropic_quantization_threshold=resolved["anisotropic_threshold"]).reorder(
                  resolved["reorder"])
    builder.set_n_training_threads(resolved["training_threads"])
    searcher = builder.build()
    index = cls(searcher, ids, dim, fingerprint, resolved, embedder_kind=embedder_kind)
    if resolved["mode"] != "brute_force" and settings.target_recall > 0:
      index.tune(vectors, settings.target_recall, k=settings.tune_k,
                 queries=settings.tune_queries, seed=settings.tune_seed)
    return index

  def tune(self, vectors: np.ndarray, target: float, *, k: int = 5, queries: int = 1000,
           seed: int = 0) -> index_tuning.Choice:
    """Sets leaves_to_search and reorder to the least work reaching recall@k >= `target`.

    `vectors` are the indexed vectors (row i = self.ids[i]); `queries` of them, drawn
    with `seed`, are searched for k + 1 neighbours and their own id is dropped from
    both the exact and the approximate answer (leave-one-out), so the sample behaves
    like new queries from the same distribution. The choice and the recall it reached
    are recorded in `settings` (and so in the manifest).
    """
    if self.settings["mode"] == "brute_force":
      raise ValueError("tune: a brute-force index has nothing to tune")
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.shape != (self.count, self.dim):
      raise ValueError(f"tune: vectors have shape {vectors.shape}, the index holds "
                       f"({self.count}, {self.dim})")
    if not 0 < target <= 1 or k < 1:
      raise ValueError(f"tune: need 0 < target <= 1 and k >= 1, got {target}, {k}")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(self.count, size=min(queries, self.count), replace=False))
    sample, own = vectors[rows], self.ids[rows]
    exact = _leave_out(brute_force_search(vectors, self.ids, sample, k + 1)[0], own, k)
    s = self.settings

    def recall_of(leaves: int, reorder: int) -> float:
      got, _ = self.search(sample, k + 1, leaves_to_search=leaves, reorder=reorder)
      return index_tuning.recall_at_k(_leave_out(got, own, k), exact, k)

    def work_of(leaves: int, reorder: int) -> float:
      return index_tuning.search_work(leaves, reorder, count=self.count,
                                      num_leaves=s["num_leaves"], dim=self.dim,
                                      dims_per_block=s["dims_per_block"])

    choice, tried = index_tuning.choose_search_settings(
        recall_of, work_of, target, num_leaves=s["num_leaves"], k=k)
    self.settings = dict(s, leaves_to_search=choice.leaves_to_search, reorder=choice.reorder,
                         tuning=dict(target_recall=target, k=k, queries=len(rows), seed=seed,
                                     recall=choice.recall, met=choice.met,
                                     settings_measured=len(tried)))
    return choice

  # ------------------------------------------------------------ searching

  def check_embedder(self, embedder: Any) -> None:
    """Refuses an embedder other than the one that built the index."""
    fp = embedder.fingerprint()
    if fp != self.fingerprint:
      raise IndexDirError(
          f"index {self.path or '(in memory)'} was built with embedder {self.fingerprint}; "
          f"the query embedder is {fp} ({type(embedder).__name__}, dim {embedder.dim}). "
          "Rebuild the index or load the embedder saved beside it.")

  def search(self, queries: np.ndarray, k: int, *, leaves_to_search: int | None = None,
             reorder: int | None = None, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (ids int64 [q, k], inner products float32 [q, k]); -1 / -inf pad."""
    if k <= 0:
      raise ValueError(f"search: k must be positive, got {k}")
    q = normalise_queries(queries, self.dim, f"index {self.path or '(in memory)'}")
    if len(q) == 0:
      return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    kw = dict(final_num_neighbors=min(k, self.count))
    if self.settings["mode"] != "brute_force":
      kw["leaves_to_search"] = leaves_to_search or self.settings["leaves_to_search"]
      kw["pre_reorder_num_neighbors"] = max(reorder or self._reorder_for(k), k)
    if threads > 1:
      self.searcher.set_num_threads(threads)
      pos, scores = self.searcher.search_batched_parallel(q, **kw)
    else:
      pos, scores = self.searcher.search_batched(q, **kw)
    pos = np.asarray(pos, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float32)
    got = np.where((pos >= 0) & (pos < self.count), self.ids[np.clip(pos, 0, self.count - 1)],
                   -1)
    scores = np.where(got >= 0, scores, -np.inf).astype(np.float32)
    return top_k(scores, got, k)

  def _reorder_for(self, k: int) -> int:
    """Candidates to re-rank for a top-k search: a tuned reorder was chosen for
    top-`tune_k`, so a larger k re-ranks proportionally more (a top-15 fetch keeps the
    recall the top-5 tuning measured)."""
    reorder = int(self.settings["reorder"])
    tuned_k = int(self.settings.get("tuning", {}).get("k", 0))
    return math.ceil(reorder * k / tuned_k) if tuned_k and k > tuned_k else reorder

  def search_texts(self, embedder: Any, texts: Sequence[str],
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeds `texts` with `embedder` (checked against the index) and searches."""
    self.check_embedder(embedder)
    return self.search(embedder.embed(texts), k)

  def vectors(self) -> np.ndarray:
    """The indexed vectors [count, dim] (memory-mapped from ScaNN's float32 copy)."""
    if self._vectors is None:
      if self.path is None:
        raise IndexDirError("vectors(): the index is not saved; pass the database instead")
      path = os.path.join(self.path, SEARCHER, "dataset.npy")
      if not os.path.isfile(path):
        raise IndexDirError(f"{path} not found: this searcher keeps no float32 dataset")
      self._vectors = np.load(path, mmap_mode="r")
    return self._vectors

  # ------------------------------------------------------------ storage

  def save(self, path: str, *, embedder: Any = None, overwrite: bool = False,
           source: dict[str, Any] | None = None) -> None:
    """Writes the index directory atomically (temp dir + rename).

    `embedder` is saved beside the searcher; `source` (JSON) records what was
    indexed, so later stages can refuse an index of other references.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
      raise IndexDirError(f"{path} already exists; refusing to overwrite an index")
    if embedder is not None:
      self.check_embedder(embedder)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, SEARCHER))
    if source is not None:
      self.source = json.loads(json.dumps(source))
    self.searcher.serialize(os.path.join(tmp, SEARCHER), relative_path=True)
    np.save(os.path.join(tmp, IDS), self.ids)
    if embedder is not None:
      embedder.save(os.path.join(tmp, EMBEDDER_STATE))
    files = {}
    for root, _, names in os.walk(tmp):
      for name in sorted(names):
        full = os.path.join(root, name)
        rel = os.path.relpath(full, tmp)
        files[rel] = {"bytes": os.path.getsize(full), "sha256": atomic_io.sha256_file(full)}
    manifest = dict(format=FORMAT, version=VERSION, count=self.count, dim=self.dim,
                    embedder_fingerprint=self.fingerprint, embedder_kind=self.embedder_kind,
                    settings=self.settings, source=self.source,
                    files=dict(sorted(files.items())))
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
    if os.path.exists(path):
      old = f"{path}.old-{os.getpid()}"
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, path)
    self.path = path


def read_manifest(path: str) -> dict[str, Any]:
  """The manifest of the index at `path`, checked for format and required fields."""
  if not os.path.isdir(path):
    raise IndexDirError(f"index directory {path!r} does not exist")
  mpath = os.path.join(path, MANIFEST)
  if not os.path.isfile(mpath):
    raise IndexDirError(f"{mpath} not found: {path!r} is not a finished m3jax index "
                        "(an interrupted build leaves no manifest)")
  try:
    with open(mpath) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise IndexDirError(f"{mpath} is not valid JSON: {e}") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise IndexDirError(f"{mpath}: field `format` is not {FORMAT!r}")
  if manifest.get("version") != VERSION:
    raise IndexDirError(f"{mpath}: field `version` is {manifest.get('version')!r}; "
                        f"this m3jax reads version {VERSION}")
  for key in ("count", "dim", "embedder_fingerprint", "settings", "files"):
    if key not in manifest:
      raise IndexDirError(f"{mpath}: missing field `{key}`")
  return manifest


def load_index(path: str, *, embedder: Any = None, fingerprint: str | None = None,
               dim: int | None = None, verify: bool = False) -> Index:
  """Opens an index directory.

  `embedder` (or `fingerprint`) and `dim` are checked against the manifest;
  `verify=True` also re-hashes every file (sizes are always checked).
  """
  from scann.scann_ops.py import scann_ops_pybind  # heavy native library, loaded on use

  path = os.path.abspath(path)
  manifest = read_manifest(path)
  for rel, info in manifest["files"].items():
    full = atomic_io.confined_path(path, rel, f"{os.path.join(path, MANIFEST)} files")
    if not os.path.isfile(full):
      raise IndexDirError(f"index {path}: file {rel} listed in the manifest is missing")
    if os.path.getsize(full) != info["bytes"]:
      raise IndexDirError(f"index {path}: file {rel} has {os.path.getsize(full)} bytes, "
                          f"the manifest says {info['bytes']} (truncated or replaced)")
    if verify and atomic_io.sha256_file(full) != info["sha256"]:
      raise IndexDirError(f"index {path}: file {rel} does not match its sha256 in the manifest")
  if dim is not None and int(dim) != manifest["dim"]:
    raise IndexDirError(f"index {path} holds {manifest['dim']}-dim vectors; expected {dim} "
                        "(data.embed_dim or the embedder changed)")
  if embedder is not None:
    fingerprint = embedder.fingerprint()
    if embedder.dim != manifest["dim"]:
      raise IndexDirError(f"index {path} holds {manifest['dim']}-dim vectors; the embedder "
                          f"gives {embedder.dim}")
  if fingerprint is not None and fingerprint != manifest["embedder_fingerprint"]:
    raise IndexDirError(f"index {path} was built with embedder "
                        f"{manifest['embedder_fingerprint']}, not {fingerprint}; rebuild it "
                        f"or use the embedder saved in {os.path.join(path, EMBEDDER_STATE)}")
  try:
    ids = np.load(os.path.join(path, IDS), allow_pickle=False)
  except (OSError, ValueError) as e:
    raise IndexDirError(f"index {path}: {IDS} is unreadable: {e}") from e
  if ids.shape != (manifest["count"],):
    raise IndexDirError(f"index {path}: {IDS} has shape {ids.shape}, manifest count is "
                        f"{manifest['count']}")
  if os.path.exists(os.path.join(path, SEARCHER, "scann_docids.pkl")):
    # ScaNN would unpickle it; m3jax never writes one (ids live in ids.npy).
    raise IndexDirError(f"index {path}: {SEARCHER}/scann_docids.pkl is not part of an m3jax "
                        "index; refusing to unpickle it")
  try:
    searcher = scann_ops_pybind.load_searcher(os.path.join(path, SEARCHER),
                                              assets_backcompat_shim=False)
  except Exception as e:  # noqa: BLE001 - ScaNN raises assorted errors on bad assets
    raise IndexDirError(f"index {path}: the ScaNN searcher in {SEARCHER}/ failed to "
                        f"load: {e}") from e
  if searcher.size() != manifest["count"]:
    raise IndexDirError(f"index {path}: searcher holds {searcher.size()} vectors, the "
                        f"manifest says {manifest['count']}")
  return Index(searcher, ids, manifest["dim"], manifest["embedder_fingerprint"],
               manifest["settings"], path=path, embedder_kind=manifest.get("embedder_kind", ""),
               source=manifest.get("source"))


def build_index(vectors: np.ndarray, ids: np.ndarray | None = None, *, fingerprint: str,
                settings: IndexSettings | None = None, embedder_kind: str = "") -> Index:
  """`Index.build` as a function."""
  return Index.build(vectors, ids, fingerprint=fingerprint, settings=settings,
                     embedder_kind=embedder_kind)


def measure_recall(index: Any, queries: np.ndarray, k: int,
                   database: np.ndarray | None = None,
                   ids: np.ndarray | None = None) -> float:
  """Recall@k of `index` (an Index or ShardedIndex) against exact search:
  mean |approx ∩ exact| / k.

  `database` (and its `ids`) default to the index's own vectors and id map.
  """
  if database is None:
    database, ids = index.vectors(), index.ids
  elif ids is None:
    ids = np.arange(len(database), dtype=np.int64)
  exact, _ = brute_force_search(database, ids, queries, k)
  approx, _ = index.search(queries, k)
  return index_tuning.recall_at_k(approx, exact, k)
