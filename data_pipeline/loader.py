"""The training / eval loader: grain over the packed-sequence TFDS dataset.

Batches are dicts of arrays with the global batch size B and sequence length T:

  tokens     int32   [B, T]  the packed sequence (pad_id = 0 only at a shard's end)
  targets    int32   [B, T]  next tokens: tokens[:, 1:] then the stored `next_token`
  loss_mask  float32 [B, T]  1.0 where targets != pad_id (padding never counts)
  seq_index  int32   [B]     record index in the packed split (-1 for a padding row);
                             the key of the neighbor table
and with a neighbor table and a ReferenceStore (continual training):
  neighbors   int32 [B, C]     ref id per 64-token chunk (-1 = none), C = T / chunk_length
  ref_tokens  int32 [B, C, R]  those references' tokens, right-padded with pad_id
  ref_lengths int32 [B, C]     their lengths (0 for -1)

Determinism: records are sharded over hosts (contiguous, equal ranges by default),
shuffled within the shard with a per-epoch permutation of `seed`, and batched in
order, so the batch at step s on host h is a pure function of (seed, s, h) and the
host count (not of grain's worker_count: records are batched after the workers). `get_state()` returns JSON bytes (grain's position plus ours) that
`set_state` restores exactly mid-epoch; the state also records the seed, batch size
and shard so that a mismatching restore fails loudly.

With `sharding` (a NamedSharding whose first spec entry shards the batch axis),
batches are global `jax.Array`s built with `jax.make_array_from_process_local_data`;
each process reads the rows its devices hold, derived from the sharding, so hosts
that hold the same rows (a batch axis not split over them) read the same records.
Without it, batches are host-local numpy arrays.

Finite epochs (eval): every host yields the same number of batches; missing rows
are padding rows (loss_mask 0, seq_index -1), so collective steps never hang.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterator

import grain.python as grain
import numpy as np

from data_pipeline import tfds_builders

STATE_VERSION = 1


class PackedSource(grain.RandomAccessDataSource):
  """Records of a packed split with `seq_index`; pickles by path (grain workers)."""

  def __init__(self, path: str, split: str = "train"):
    self.path, self.split = os.path.abspath(path), split
    self._source = tfds_builders.open_split(self.path, split)
    self._n = len(self._source)
    meta = tfds_builders.metadata(self.path)
    self.seq_len = int(meta["seq_len"])
    self.chunk_length = int(meta["chunk_length"])
    self.pad_id = int(meta.get("pad_id", 0))
    self.tokenizer_hash = str(meta.get("tokenizer_hash", ""))
    if self._n >= 2**31:
      raise ValueError(f"{self.path} split {split}: {self._n} sequences do not fit int32 "
                       "seq_index")

  def __getstate__(self):
    return dict(path=self.path, split=self.split)

  def __setstate__(self, state):
    self.__init__(state["path"], state["split"])

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rec = self._source[int(index)]
    return dict(tokens=np.asarray(rec["tokens"], np.int32),
                next_token=np.int32(rec["next_token"]), seq_index=np.int32(index))

  def record(self, index: int) -> dict[str, np.ndarray]:
    """The stored record: tokens [T], next_token, chunk_doc_keys [C] (for neighbor mining)."""
    rec = self._source[int(index)]
    return dict(tokens=np.asarray(rec["tokens"], np.int32), next_token=np.int32(rec["next_token"]),
                chunk_doc_keys=np.asarray(rec["chunk_doc_keys"], np.int64))

  def iter_batches(self, start: int = 0, stop: int | None = None, batch: int = 256
                   ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (seq_index [n], tokens [n, T], chunk_doc_keys [n, C]) in index order."""
    stop = self._n if stop is None else min(stop, self._n)
    for lo in range(start, stop, batch):
      idx = list(range(lo, min(lo + batch, stop)))
      recs = self._source.__getitems__(idx)
      yield (np.asarray(idx, np.int64), np.stack([r["tokens"] for r in recs]).astype(np.int32),
             np.stack([r["chunk_doc_keys"] for r in recs]).astype(np.int64))

  def __repr__(self) -> str:
    return f"PackedSource({self.path!r}, {self.split!r})"


class ShardSlice(grain.RandomAccessDataSource):
  """Records [lo, hi) of a source, keeping their global `seq_index`."""

  def __init__(self, source: Any, lo: int, hi: int):
    self.source, self.lo, self.hi = source, lo, hi

  def __len__(self) -> int:
    return self.hi - self.lo

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.source[self.lo + int(index)]

  def __repr__(self) -> str:
    return f"ShardSlice({self.source!r}, {self.lo}, {self.hi})"


class AddTargets(grain.MapTransform):
  """tokens + next_token -> targets, loss_mask."""

  def __init__(self, pad_id: int):
    self.pad_id = pad_id

  def map(self, rec: dict[str, Any]) -> dict[str, Any]:
    tokens = rec["tokens"]
    targets = np.concatenate([tokens[1:], np.asarray([rec.pop("next_token")], np.int32)])
    rec["targets"] = targets
    rec["loss_mask"] = (targets != self.pad_id).astype(np.float32)
    return rec


class AddReferences(grain.MapTransform):
  """Continual-stage enrichment: the neighbor ref ids and their tokens per chunk.

  `neighbors[seq_index]` must give int32 [C] ref ids (-1 = none), e.g. the neighbor
  table of `data_pipeline.neighbors`; `references` is a ReferenceStore (anything
  with `tokens_by_ids`).
  """

  def __init__(self, neighbors: Any, references: Any, n_chunks: int):
    self.neighbors, self.references, self.n_chunks = neighbors, references, n_chunks

  def map(self, rec: dict[str, Any]) -> dict[str, Any]:
    nb = np.asarray(self.neighbors[int(rec["seq_index"])], np.int32).reshape(-1)
    if nb.shape != (self.n_chunks,):
      raise ValueError(f"neighbor table row {int(rec['seq_index'])} has {nb.shape[0]} entries; "
                       f"expected one per chunk ({self.n_chunks})")
    toks, lens = self.references.tokens_by_ids(nb)
    rec["neighbors"] = nb
    rec["ref_tokens"] = toks.astype(np.int32)
    rec["ref_lengths"] = lens.astype(np.int32)
    return rec


def even_split(n: int, options: grain.ShardOptions) -> tuple[int, int]:
  """[lo, hi) of shard `shard_index`: contiguous; the remainder goes to the first shards
  unless drop_remainder (then every shard has n // shard_count records)."""
  k, i = options.shard_count, options.shard_index
  per, rem = divmod(n, k)
  if options.drop_remainder:
    return per * i, per * (i + 1)
  lo = per * i + min(i, rem)
  return lo, lo + per + (1 if i < rem else 0)


def process_rows(sharding: Any, global_batch_size: int) -> tuple[int, int]:
  """(shard_index, shard_count) of this process's contiguous rows of the batch axis."""
  import jax
  idx = sharding.addressable_devices_indices_map((global_batch_size,))
  starts, stops = set(), set()
  for sl in idx.values():
    s = sl[0] if isinstance(sl, tuple) else sl
    start, stop, _ = s.indices(global_batch_size)
    starts.add(start)
    stops.add(stop)
  lo, hi = min(starts), max(stops)
  rows = hi - lo
  if global_batch_size % rows or lo % rows:
    raise ValueError(f"process {jax.process_index()} holds rows [{lo}, {hi}) of the batch: not "
                     f"an even contiguous split of {global_batch_size}")
  covered = np.zeros(global_batch_size, bool)
  for sl in idx.values():
    s = sl[0] if isinstance(sl, tuple) else sl
    covered[s] = True
  if not covered[lo:hi].all():
    raise ValueError(f"process {jax.process_index()} holds non-contiguous rows of the batch")
  return lo // rows, global_batch_size // rows


class Loader:
  """Deterministic, sharded, checkpointable batches of packed sequences.

  Args:
    source: a PackedSource (or any grain random-access source with the same records).
    global_batch_size: B, over all processes.
    seed: shuffling seed (32-bit).
    shuffle: shuffle within the host's shard (a new permutation every epoch).
    num_epochs: None = repeat forever (training); an int = that many passes (eval).
    sharding: NamedSharding for the batch (first spec entry = batch axis); None for
      host-local numpy batches, read as shard `jax.process_index()` of `process_count()`.
    shard_options: explicit grain ShardOptions (overrides what the sharding implies).
    neighbors, references: enable `AddReferences` (both or neither).
    worker_count: grain worker processes (0 = in-process; >0 needs a __main__ guard).
  """

  def __init__(self, source: Any, *, global_batch_size: int, seed: int = 0, shuffle: bool = True,
               num_epochs: int | None = None, sharding: Any = None,
               shard_options: grain.ShardOptions | None = None, neighbors: Any = None,
               references: Any = None, worker_count: int = 0, read_threads: int = 4):
    if (neighbors is None) != (references is None):
      raise ValueError("give both a neighbor table and a ReferenceStore, or neither")
    self.source = source
    self.global_batch_size = int(global_batch_size)
    self.seed, self.shuffle, self.num_epochs = int(seed), bool(shuffle), num_epochs
    self.sharding = sharding
    self.pad_id = int(getattr(source, "pad_id", 0))
    self.seq_len = int(getattr(source, "seq_len", 0) or source[0]["tokens"].shape[0])
    self.chunk_length = int(getattr(source, "chunk_length", 0) or self.seq_len)
    self.n_chunks = self.seq_len // self.chunk_length
    self.with_references = neighbors is not None
    self.reference_length = int(getattr(references, "reference_length", 0))
    if shard_options is None:
      if sharding is not None:
        index, count = process_rows(sharding, self.global_batch_size)
      else:
        import jax
        index, count = jax.process_index(), jax.process_count()
      shard_options = grain.ShardOptions(index, count, drop_remainder=num_epochs is None)
    self.shard_options = shard_options
    count = shard_options.shard_count
    if self.global_batch_size % count:
      raise ValueError(f"data.batch_size={self.global_batch_size} is not divisible by the "
                       f"{count} data shards (processes)")
    self.local_batch_size = self.global_batch_size // count
    n = len(source)
    if num_epochs is None and n // count < self.local_batch_size:
      raise ValueError(f"{n} sequences give each of {count} shards fewer than one batch of "
                       f"{self.local_batch_size}")
    self.num_records = n
    # grain's own sharding drops records of uneven shards when epochs are finite, so the
    # shard is cut here (grain's even split) and grain sees an unsharded source.
    lo, hi = even_split(n, shard_options)
    self.shard_range = (lo, hi)
    ops: list[Any] = [AddTargets(self.pad_id)]
    if self.with_references:
      ops.append(AddReferences(neighbors, references, self.n_chunks))
    # Records are batched here, not by a grain Batch op (which batches inside each worker),
    # so the batches do not depend on worker_count: grain delivers records in index order.
    self._loader = None
    if hi > lo:
      sampler = grain.IndexSampler(num_records=hi - lo, shard_options=grain.NoSharding(),
                                   shuffle=self.shuffle, num_epochs=num_epochs, seed=self.seed)
      self._loader = grain.DataLoader(
          data_source=ShardSlice(source, lo, hi), sampler=sampler, operations=ops,
          worker_count=worker_count, shard_options=grain.NoSharding(),
          read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64))
    self._iter = iter(self._loader) if self._loader is not None else None
    self._step = 0
    self._exhausted = self._loader is None

  # ---------------------------------------------------------------- sizes

  @property
  def steps_per_epoch(self) -> int:
    """Batches per host per epoch (for finite epochs: the same on every host)."""
    count = self.shard_options.shard_count
    per_shard = (self.num_records // count if self.shard_options.drop_remainder
                 else math.ceil(self.num_records / count))  # the largest shard
    if self.num_epochs is None:
      return per_shard // self.local_batch_size
    return math.ceil(per_shard / self.local_batch_size)

  @property
  def num_batches(self) -> int | None:
    return None if self.num_epochs is None else self.steps_per_epoch * self.num_epochs

  # ---------------------------------------------------------------- iteration

  def __iter__(self) -> "Loader":
    return self

  def __next__(self) -> dict[str, Any]:
    total = self.num_batches
    if total is not None and self._step >= total:
      raise StopIteration
    rows = []
    while len(rows) < self.local_batch_size and not self._exhausted:
      try:
        rows.append(next(self._iter))
      except StopIteration:
        self._exhausted = True
    if not rows and total is None:
      raise StopIteration
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]} if rows else None
    if len(rows) < self.local_batch_size:
      pad = self._padding_rows(self.local_batch_size - len(rows))
      batch = pad if batch is None else {k: np.concatenate([batch[k], pad[k]]) for k in batch}
    self._step += 1
    return self._globalise(batch)

  def _padding_rows(self, n: int) -> dict[str, np.ndarray]:
    T = self.seq_len
    rows = dict(tokens=np.full((n, T), self.pad_id, np.int32),
                seq_index=np.full((n,), -1, np.int32),
                targets=np.full((n, T), self.pad_id, np.int32),
                loss_mask=np.zeros((n, T), np.float32))
    if self.with_references:
      C, R = self.n_chunks, self.reference_length
      rows.update(neighbors=np.full((n, C), -1, np.int32),
                  ref_tokens=np.full((n, C, R), self.pad_id, np.int32),
                  ref_lengths=np.zeros((n, C), np.int32))
    return rows

  def _globalise(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    if self.sharding is None:
      return batch
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    batch_axes = self.sharding.spec[0] if len(self.sharding.spec) else None
    out = {}
    for k, v in batch.items():
      sh = NamedSharding(self.sharding.mesh, PartitionSpec(batch_axes, *([None] * (v.ndim - 1))))
      out[k] = jax.make_array_from_process_local_data(
          sh, v, (self.global_batch_size,) + v.shape[1:])
    return out

  # ---------------------------------------------------------------- state

  def _identity(self) -> dict[str, Any]:
    return dict(seed=self.seed, shuffle=self.shuffle, global_batch_size=self.global_batch_size,
                seq_len=self.seq_len, references=self.with_references,
                num_records=self.num_records, num_epochs=self.num_epochs,
                shard_index=self.shard_options.shard_index,
                shard_count=self.shard_options.shard_count)

  def get_state(self) -> bytes:
    """JSON bytes: the exact position (restorable mid-epoch) and what it belongs to."""
    grain_state = self._iter.get_state() if self._iter is not None else ""
    if isinstance(grain_state, bytes):
      grain_state = grain_state.decode("utf-8")
    return json.dumps(dict(version=STATE_VERSION, step=self._step, exhausted=self._exhausted,
                           grain=grain_state, **self._identity()), sort_keys=True).encode()

  def set_state(self, state: bytes | str) -> None:
    d = json.loads(state)
    if d.get("version") != STATE_VERSION:
      raise ValueError(f"data iterator state version {d.get('version')!r}, expected "
                       f"{STATE_VERSION}")
    diffs = [f"{k}: saved {d.get(k)!r}, now {v!r}" for k, v in self._identity().items()
             if d.get(k) != v]
    if diffs:
      raise ValueError("data iterator state belongs to another loader: " + "; ".join(diffs))
    if self._iter is not None:
      self._iter.set_state(d["grain"].encode("utf-8"))
    self._step, self._exhausted = int(d["step"]), bool(d["exhausted"])

  @property
  def step(self) -> int:
    return self._step


def packed_source(root: str, split: str = "train") -> PackedSource:
  """The packed split of a prepared data directory (`<workdir>/data`)."""
  from data_pipeline import prepare
  return PackedSource(prepare.dataset_path(root, "packed"), split)


def make_loader(cfg: Any, root: str, *, split: str = "train", sharding: Any = None,
                neighbors: Any = None, references: Any = None,
                num_epochs: int | None = None, shuffle: bool | None = None) -> Loader:
  """A Loader from the config: data.batch_size, seed, data.shuffle, data.worker_count.

  Training: split="train", num_epochs=None. Eval loss: split="validation",
  num_epochs=1, shuffle=False.
  """
  source = packed_source(root, split)
  if source.seq_len != cfg.model.max_seq_len:
    raise ValueError(f"{source.path}: sequences have {source.seq_len} tokens but "
                     f"model.max_seq_len={cfg.model.max_seq_len}; rerun prepare-data")
  return Loader(source, global_batch_size=cfg.data.batch_size, seed=cfg.seed,
                shuffle=cfg.data.shuffle if shuffle is None else shuffle,
                num_epochs=num_epochs, sharding=sharding, neighbors=neighbors,
                references=references, worker_count=cfg.data.worker_count)
