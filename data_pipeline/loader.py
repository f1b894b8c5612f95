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

Determinism: the global order is a per-epoch permutation of `seed` (grain's index
shuffle), walked continuously across epochs; global batch s is positions
[s*B, (s+1)*B) of it and each process reads its own rows of that batch. So the
global batch at step s is a pure function of (seed, s), whatever the number of
hosts, and `get_state()` (JSON bytes: the step plus what the stream belongs to) is
restored exactly mid-epoch by `set_state`, also on another host count; a state of
another seed, batch size or dataset fails loudly.

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
from data_pipeline import prepared
from m3jax.core.errors import InputError

STATE_VERSION = 2


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


class AddTargets(grain.MapTransform):
  """tokens + next_token -> targets, loss_mask."""

  def __init__(self, pad_id: int):
    self.pad_id = pad_id

  def map(self, rec: dict[str, Any]) -> dict[str, Any]:
    if "next_token" not in rec:  # chat / preference records carry their targets and mask
      return rec
    tokens = rec["tokens"]
    targets = np.concatenate([tokens[1:], np.asarray([rec.pop("next_token")], np.int32)])
    rec["targets"] = targets
    rec["loss_mask"] = (targets != self.pad_id).astype(np.float32)
    return rec


class AddReferences(grain.MapTransform):
  """Continual-stage enrichment: the neighbor ref ids and their tokens per chunk.

  `neighbors[seq_index]` must give int32 [C] ref ids (-1 = none), e.g. the neighbor
  table of `m3jax.retrieval.neighbors`; `references` is a ReferenceStore (anything
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

  The global order is one permutation of the records per epoch (grain's index
  shuffle of `seed` and the epoch, O(1) memory), walked continuously across
  epochs; global batch s is positions [s*B, (s+1)*B) of that walk. A process reads
  only its rows of each global batch, so the global batch does not depend on the
  number of processes (a job restarted on another host count continues the same
  stream) and the iterator state is just the step.

  Args:
    source: a PackedSource (or any grain random-access source with the same records).
    global_batch_size: B, over all processes.
    seed: shuffling seed (32-bit).
    shuffle: shuffle the records (a new permutation every epoch).
    num_epochs: None = repeat forever (training); an int = that many passes (eval;
      the last batch is filled with padding rows).
    sharding: NamedSharding for the batch (first spec entry = batch axis); None for
      host-local numpy batches, read as row shard `jax.process_index()` of
      `process_count()`.
    shard_options: explicit grain ShardOptions: read row shard `shard_index` of
      `shard_count` of every global batch (overrides what the sharding implies).
    neighbors, references: enable `AddReferences` (both or neither).
    transforms: grain MapTransforms applied to each record after those (e.g. the RAG
      reader's contexts, m3jax.training.rag_reader).
    worker_count: grain worker processes (0 = in-process; >0 needs a __main__ guard).
  """

  def __init__(self, source: Any, *, global_batch_size: int, seed: int = 0, shuffle: bool = True,
               num_epochs: int | None = None, sharding: Any = None,
               shard_options: grain.ShardOptions | None = None, neighbors: Any = None,
               references: Any = None, worker_count: int = 0, read_threads: int = 4,
               transforms: Any = ()):
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
      raise InputError(f"data.batch_size={self.global_batch_size} is not divisible by the "
                       f"{count} data shards (processes)")
    self.local_batch_size = self.global_batch_size // count
    lo = shard_options.shard_index * self.local_batch_size
    self.rows = (lo, lo + self.local_batch_size)  # this process's rows of every batch
    n = len(source)
    if n == 0:
      raise InputError(f"{source!r} holds no sequences")
    if num_epochs is None and n < self.global_batch_size:
      raise InputError(f"{n} sequences are fewer than one global batch of "
                       f"{self.global_batch_size} (data.batch_size)")
    self.num_records = n
    ops: list[Any] = [AddTargets(self.pad_id)]
    if self.with_references:
      ops.append(AddReferences(neighbors, references, self.n_chunks))
    ops.extend(transforms)
    self._ops = ops

    order = grain.MapDataset.range(n)
    if self.shuffle:
      order = order.shuffle(seed=self.seed)  # index >= n continues with the next epoch
    total = self.num_batches
    length = (total if total is not None else 2**62 // self.global_batch_size)
    B, lb, pad_rows = self.global_batch_size, self.local_batch_size, self._padding_rows

    def record(k: int) -> dict[str, Any]:
      g = (k // lb) * B + lo + k % lb  # global position of local element k
      if total is not None and g >= n * num_epochs:
        return {key: v[0] for key, v in pad_rows(1).items()}
      rec = source[int(order[g] if self.shuffle else g % n)]
      for op in ops:
        rec = op.map(rec)
      return rec

    ds = grain.MapDataset.range(length * lb).map(record).batch(lb)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                 prefetch_buffer_size=64))
    if worker_count:
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    self._dataset = it_ds
    self._iter = iter(it_ds)
    self._step = 0

  # ---------------------------------------------------------------- sizes

  @property
  def steps_per_epoch(self) -> int:
    """Global batches per epoch (training: full batches; eval: the last one padded)."""
    if self.num_epochs is None:
      return self.num_records // self.global_batch_size
    return math.ceil(self.num_records / self.global_batch_size)

  @property
  def num_batches(self) -> int | None:
    if self.num_epochs is None:
      return None
    return math.ceil(self.num_records * self.num_epochs / self.global_batch_size)

  # ---------------------------------------------------------------- iteration

  def __iter__(self) -> "Loader":
    return self

  def __next__(self) -> dict[str, Any]:
    total = self.num_batches
    if total is not None and self._step >= total:
      raise StopIteration
    batch = next(self._iter)
    self._step += 1
    return self._globalise(batch)

  def _padding_rows(self, n: int) -> dict[str, np.ndarray]:
    if "next_token" not in self.source[0]:  # records with their own fields: zeros like them
      rec = self._ops[-1].map(self.source[0]) if self.with_references else self.source[0]
      rows = {k: np.zeros((n,) + np.shape(v), np.asarray(v).dtype) for k, v in rec.items()}
      rows["seq_index"][:] = -1
      if "neighbors" in rows:
        rows["neighbors"][:] = -1
      return rows
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
    # No process count here: the stream is the same for any number of hosts.
    return dict(seed=self.seed, shuffle=self.shuffle, global_batch_size=self.global_batch_size,
                num_records=self.num_records, num_epochs=self.num_epochs)

  def get_state(self) -> bytes:
    """JSON bytes: the step (the exact position, mid-epoch too) and what it belongs to."""
    return json.dumps(dict(version=STATE_VERSION, step=self._step, **self._identity()),
                      sort_keys=True).encode()

  def set_state(self, state: bytes | str) -> None:
    d = json.loads(state)
    if d.get("version") != STATE_VERSION:
      raise ValueError(f"data iterator state version {d.get('version')!r}, expected "
                       f"{STATE_VERSION}")
    diffs = [f"{k}: saved {d.get(k)!r}, now {v!r}" for k, v in self._identity().items()
             if d.get(k) != v]
    if diffs:
      raise ValueError("data iterator state belongs to another loader: " + "; ".join(diffs))
    self._iter = iter(self._dataset)
    self._iter.set_state({"next_index": int(d["step"])})
    self._step = int(d["step"])

  @property
  def step(self) -> int:
    return self._step


def packed_source(root: str, split: str = "train") -> PackedSource:
  """The packed split of a prepared data directory (`<workdir>/data`)."""
  return PackedSource(prepared.dataset_path(root, "packed"), split)


def make_loader(cfg: Any, root: str, *, split: str = "train", sharding: Any = None,
                neighbors: Any = None, references: Any = None,
                num_epochs: int | None = None, shuffle: bool | None = None,
                transforms: Any = ()) -> Loader:
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
                references=references, worker_count=cfg.data.worker_count,
                transforms=transforms)
