"""The cold-start bank: a reference is encoded the first time it is retrieved, then kept.

Storage follows the warm layout (m3jax.memory.bank_format) exactly, so a cold-start
bank that has seen every reference is the bank `m3jax encode-memory` would write.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from m3jax.core import artifacts
from m3jax.core.config import ConfigError, ModelConfig
from m3jax.memory import bank_format
from m3jax.memory import bank_shards
from m3jax.memory import codecs
from m3jax.memory import pq as pq_lib
from m3jax.memory.bank_format import BankSettings
from m3jax.memory.bank_reader import MemoryBank
from m3jax.memory.encoder import ReferenceEncoder, encode_batch_records


class ColdStartBank(MemoryBank):
  """Encodes a reference the first time it is retrieved, stores it, reuses it.

  Storage follows the warm layout exactly: a miss encodes the whole fixed encode
  batch that holds the id (the same batch, padding and jitted encoder as
  `m3jax encode-memory`) and saves it under `pending/`; when every batch of a
  shard exists, the shard file is assembled and written like the encoding job
  writes it, and when every shard exists the manifest is written: the directory
  is then byte for byte the bank the warm job would have produced (same
  encoder devices and batch size), and `MemoryBank.open` takes it.

  Create with `ColdStartBank.create(...)`; an existing (partial or complete) bank
  directory with the same spec is continued.
  """

  def __init__(self, root, meta, config, *, encoder, references, **kwargs):
    super().__init__(root, meta, config, **kwargs)
    self.encoder = encoder
    self.references = references
    self._write_lock = threading.Lock()
    self._done_shards: dict[int, dict[str, Any]] = {}
    self._counts.update(encoded_batches=0, encoded_references=0, shards_completed=0)

  @classmethod
  def create(cls, path: str, *, encoder: ReferenceEncoder, references: Any,
             settings: BankSettings,
             checkpoint: dict[str, Any] | None = None,
             quantizer: pq_lib.ProductQuantizer | None = None,
             references_source: str = "", dtype: Any = jnp.bfloat16) -> "ColdStartBank":
    """Starts (or continues) a cold-start bank in `path`.

    `encoder` is an `m3jax.memory.encoder.ReferenceEncoder` (batch size =
    settings.encode_batch_size); `references` answers tokens_by_ids and has
    `tokenizer_hash`. quantization=pq needs a trained `quantizer`.
    """
    config: ModelConfig = encoder.config
    if encoder.batch_size != settings.encode_batch_size:
      raise ConfigError(f"config field `bank.encode_batch_size`: {settings.encode_batch_size} "
                        f"but the encoder was built for batches of {encoder.batch_size}")
    root = os.path.abspath(path)
    os.makedirs(root, exist_ok=True)
    codec = codecs.make_codec(settings.quantization, config.memory_shape, quantizer)
    q_sha = None
    if settings.quantization == "pq":
      q_sha = bank_shards.store_quantizer(root, quantizer)
    spec = bank_format.make_spec(config=config, tokenizer_hash=references.tokenizer_hash,
                     n_references=len(references),
                     reference_length=references.reference_length, settings=settings,
                     codec=codec, checkpoint=checkpoint,
                     references_source=references_source or getattr(references, "path", ""),
                     quantizer_sha256=q_sha)
    bank_format.check_or_write_spec(root, spec)
    meta = dict(spec)
    meta["shards"] = [None] * spec["layout"]["num_shards"]
    return cls(root, meta, config, encoder=encoder, references=references,
               cache_memories=settings.cache_memories, prefetch=settings.prefetch,
               verify=settings.verify, dtype=dtype)

  @property
  def complete(self) -> bool:
    return os.path.exists(os.path.join(self.root, bank_format.MANIFEST_FILE))

  def _shard_info(self, shard: int) -> dict[str, Any]:
    info = self._done_shards.get(shard)
    if info is None:
      info = bank_shards.shard_record(self.root, shard)
      if info is None:
        raise KeyError(shard)
      self._done_shards[shard] = info
    return info

  def verify(self, full: bool = True, shards: Sequence[int] | None = None) -> None:
    todo = range(self.num_shards) if shards is None else shards
    for s in todo:
      if bank_shards.shard_record(self.root, s) is not None:
        super().verify(full, [s])

  def _shard_records(self, shard: int, rows: np.ndarray) -> np.ndarray:
    if shard in self._done_shards or bank_shards.shard_record(self.root, shard) is not None:
      return super()._shard_records(shard, rows)
    with self._write_lock:
      if bank_shards.shard_record(self.root, shard) is not None:
        return super()._shard_records(shard, rows)
      batch = self.meta["layout"]["encode_batch_size"]
      out = np.empty(len(rows), self.record_dtype)
      for b in np.unique(rows // batch).tolist():
        sel = (rows // batch) == b
        recs = self._pending_batch(shard, b)
        out[sel] = recs[rows[sel] - b * batch]
      self._maybe_complete(shard)
      return out

  def _pending_batch(self, shard: int, b: int) -> np.ndarray:
    path = os.path.join(self.root, bank_format.pending_file(shard, b))
    if os.path.exists(path):
      recs = np.load(path, allow_pickle=False)
      if recs.dtype == self.record_dtype:
        return recs
      logging.warning("%s: unexpected dtype %s; re-encoding", path, recs.dtype)
    ids = bank_format.shard_batches(shard, self.meta["layout"], self.num_references)[b]
    recs, _ = encode_batch_records(self.encoder, self.references, self.codec, ids)
    artifacts.save_npy(path, recs)
    with self._lock:
      self._counts["encoded_batches"] += 1
      self._counts["encoded_references"] += int((ids >= 0).sum())
    return recs

  def _maybe_complete(self, shard: int) -> None:
    """Assembles the shard once all its batches are pending; then maybe the manifest."""
    layout = self.meta["layout"]
    n_batches = layout["shard_size"] // layout["encode_batch_size"]
    batches = bank_format.shard_batches(shard, layout, self.num_references)
    paths = [os.path.join(self.root, bank_format.pending_file(shard, b)) for b in range(n_batches)]
    for b, p in enumerate(paths):
      if not os.path.exists(p) and (batches[b] >= 0).any():
        return
    parts = []
    for b, p in enumerate(paths):
      parts.append(np.load(p, allow_pickle=False) if os.path.exists(p) else
                   bank_format.empty_records(self.codec, self.config, len(batches[b])))
    ids = np.concatenate(batches)
    real = ids[ids >= 0]
    _, lengths = self.references.tokens_by_ids(real)
    info = bank_shards.write_shard(self.root, shard, np.concatenate(parts), n_refs=len(real),
                       tokens=int(lengths.sum()))
    self._done_shards[shard] = info
    self._touched.add(shard)  # its checksum was computed from the bytes just written
    with self._lock:
      self._counts["shards_completed"] += 1
    bank_shards.remove_pending(self.root, shard)
    if all(bank_shards.shard_record(self.root, s) is not None for s in range(self.num_shards)):
      self.meta = bank_shards.finalize(self.root)

  def encode_all(self) -> None:
    """Fills every missing shard (what the warm job does, single process)."""
    for s in range(self.num_shards):
      if bank_shards.shard_record(self.root, s) is None:
        self._shard_records(s, np.arange(self.shard_size))
