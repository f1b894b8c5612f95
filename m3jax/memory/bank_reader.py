"""Reading a finished memory bank (warm start): `MemoryBank`, with a RAM LRU and prefetch.

`MemoryBank.open` refuses a bank made by another model config, tokenizer,
checkpoint or quantization, naming the mismatch; shards are memory-mapped and
checksum-verified (m3jax.memory.bank_shards) before their first read.
"""

from __future__ import annotations

import glob
import os
import queue
import threading
from typing import Any, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np

from m3jax.core.config import ModelConfig
from m3jax.core.config import model_config as to_model_config
from m3jax.memory.bank_format import (MANIFEST_FILE, SHARDS_DIR, SPEC_FILE, VERIFY_MODES,
                                      BankError, CorruptShardError, IncompleteBankError,
                                      bank_settings, check_compatible, load_codec, read_json,
                                      record_dtype)
from m3jax.memory.bank_shards import shard_path, verify_shard
from m3jax.memory.source import LRUCache, MemorySource, check_ref_ids



class MemoryBank(MemorySource):
  """A finished bank on disk (warm start): memories by ref id, cached, checksummed.

  Open with `MemoryBank.open(...)`. `lookup(ids)` serves each distinct id of a call
  from the RAM LRU cache (a hit) or from its memory-mapped shard (a miss), decoding
  quantized codes on the CPU. Hit/miss counters count distinct ids >= 0 per call.
  With `prefetch=True`, `prefetch(ids)` hands ids to a background thread that loads
  them into the cache ahead of their lookup (loads counted as `prefetched`).
  """

  def __init__(self, root: str, meta: dict[str, Any], config: ModelConfig, *,
               cache_memories: int = 4096, prefetch: bool = False, verify: str = "touch",
               dtype: Any = jnp.bfloat16):
    if verify not in VERIFY_MODES:
      raise ValueError(f"verify={verify!r}: one of {VERIFY_MODES}")
    self.root = root
    self.meta = meta
    self.config = config
    self.memory_shape = config.memory_shape
    self.dtype = np.dtype(dtype)
    self.codec = load_codec(root, meta, config)
    self.record_dtype = record_dtype(self.codec, config)
    if self.record_dtype.itemsize != meta["layout"]["record_bytes"]:
      raise BankError(f"{root}: records of {meta['layout']['record_bytes']} bytes, this m3jax "
                      f"makes {self.record_dtype.itemsize}")
    self.num_references = int(meta["references"]["count"])
    self.shard_size = int(meta["layout"]["shard_size"])
    self.num_shards = int(meta["layout"]["num_shards"])
    self.verify_mode = verify
    self.cache = LRUCache(cache_memories)
    self._maps: dict[int, np.ndarray] = {}
    self._touched: set[int] = set()
    self._lock = threading.RLock()
    self._inflight: dict[int, threading.Event] = {}
    self._counts = dict(records_read=0, shard_opens=0, shards_verified=0, prefetched=0)
    self._prefetch_queue: queue.Queue | None = None
    self._prefetch_thread: threading.Thread | None = None
    self._prefetch_error: BaseException | None = None
    if prefetch:
      self._start_prefetch()

  # ---------------------------------------------------------------- opening

  @classmethod
  def open(cls, path: str, *, model_config: ModelConfig, tokenizer_hash: str | None,
           checkpoint_step: int | None = None, params: Any = None,
           quantization: str | None = None, cache_memories: int = 4096,
           prefetch: bool = False, verify: str = "touch", dtype: Any = jnp.bfloat16
           ) -> "MemoryBank":
    """Opens a finished bank, refusing one made by another model/tokenizer/settings.

    Args:
      model_config: the model that will read the memories (fingerprint must match).
      tokenizer_hash: hash of the tokenizer in use (None skips this check).
      checkpoint_step, params: optional; check which checkpoint encoded the bank.
      quantization: expected method ("none", "int8", "pq"); None accepts any.
      cache_memories: RAM LRU capacity in memories (0 = off).
      prefetch: start the background prefetch thread.
      verify: "none", "size" (file sizes now), "touch" (sizes now, full sha256 when
        a shard is first read) or "full" (sha256 of every shard now).
      dtype: dtype of returned memories (bfloat16, or float32 for analysis).
    """
    root = os.path.abspath(path)
    manifest = os.path.join(root, MANIFEST_FILE)
    if not os.path.exists(manifest):
      spec = os.path.join(root, SPEC_FILE)
      if os.path.exists(spec):
        done = len(glob.glob(os.path.join(root, SHARDS_DIR, "shard-*.npy")))
        total = read_json(spec)["layout"]["num_shards"]
        raise IncompleteBankError(
            f"{root}: bank is incomplete ({done} of {total} shards, no {MANIFEST_FILE}); "
            "rerun `m3jax encode-memory` with the same flags to finish it, or open it with "
            "ColdStartBank")
      raise BankError(f"{manifest} not found: {root} is not a memory bank")
    meta = read_json(manifest)
    check_compatible(meta, manifest, model_config=model_config, tokenizer_hash=tokenizer_hash,
                     checkpoint_step=checkpoint_step, params=params, quantization=quantization)
    bank = cls(root, meta, model_config, cache_memories=cache_memories, prefetch=prefetch,
               verify=verify, dtype=dtype)
    if verify != "none":
      bank.verify(full=verify == "full")
    return bank

  @classmethod
  def from_config(cls, path: str, cfg: ml_collections.ConfigDict, *,
                  tokenizer_hash: str | None, **kwargs) -> "MemoryBank":
    """`open` with the model and the cache/prefetch/verify settings of a config."""
    s = bank_settings(cfg)
    opts = dict(cache_memories=s.cache_memories, prefetch=s.prefetch, verify=s.verify)
    opts.update(kwargs)
    return cls.open(path, model_config=to_model_config(cfg), tokenizer_hash=tokenizer_hash,
                    **opts)

  def _shard_info(self, shard: int) -> dict[str, Any]:
    return self.meta["shards"][shard]

  def verify(self, full: bool = True, shards: Sequence[int] | None = None) -> None:
    """Checks sizes (and with `full`, sha256) of shards; raises naming a corrupt one."""
    for s in range(self.num_shards) if shards is None else shards:
      info = self._shard_info(s)
      verify_shard(self.root, info, full=full)
      if full:
        with self._lock:
          self._touched.add(s)
          self._counts["shards_verified"] += 1

  # ---------------------------------------------------------------- reading records

  def _shard_map(self, shard: int) -> np.ndarray:
    with self._lock:
      mm = self._maps.get(shard)
      if mm is not None:
        return mm
      info = self._shard_info(shard)
      path = shard_path(self.root, info)
      if self.verify_mode == "touch" and shard not in self._touched:
        verify_shard(self.root, info, full=True)
        self._touched.add(shard)
        self._counts["shards_verified"] += 1
      try:
        mm = np.load(path, mmap_mode="r", allow_pickle=False)
      except (OSError, ValueError) as e:
        raise CorruptShardError(f"{path}: cannot read shard ({e})") from e
      if mm.dtype != self.record_dtype or mm.shape != (self.shard_size,):
        raise CorruptShardError(f"{path}: holds {mm.dtype} x {mm.shape}, expected records "
                                f"{self.record_dtype} x ({self.shard_size},)")
      self._maps[shard] = mm
      self._counts["shard_opens"] += 1
      return mm

  def read_records(self, ref_ids: Any) -> np.ndarray:
    """Raw stored records [n] of ids >= 0 (no cache, no decoding)."""
    ids = check_ref_ids(ref_ids, self.num_references)
    if (ids < 0).any():
      raise IndexError("read_records: ids must be >= 0")
    out = np.empty(len(ids), self.record_dtype)
    shards = ids // self.shard_size
    for s in np.unique(shards):
      sel = np.nonzero(shards == s)[0]
      out[sel] = self._shard_records(int(s), ids[sel] - s * self.shard_size)
    with self._lock:
      self._counts["records_read"] += len(ids)
    return out

  def _shard_records(self, shard: int, rows: np.ndarray) -> np.ndarray:
    return self._shard_map(shard)[rows]

  def _decode(self, records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mem = np.asarray(self.codec.decode(records))
    return mem.astype(self.dtype, copy=False), records["pos"] >= 0

  def _load(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reads and decodes distinct ids >= 0: (memories [n, ...], token masks [n, ...])."""
    return self._decode(self.read_records(ids))

  # ---------------------------------------------------------------- lookup

  def lookup(self, ref_ids: Any) -> tuple[np.ndarray, np.ndarray]:
    ids = check_ref_ids(ref_ids, self.num_references)
    self._raise_prefetch_error()
    mem = np.zeros((len(ids),) + self.memory_shape, self.dtype)
    l, _, h, k, _ = self.memory_shape
    mask = np.zeros((len(ids), l, h, k), bool)
    unique, inverse = np.unique(ids, return_inverse=True)
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    misses = []
    for rid in unique.tolist():
      if rid < 0:
        continue
      hit = self.cache.get(rid)
      if hit is not None:
        found[rid] = hit
        continue
      event = self._inflight.get(rid)
      if event is not None:  # a prefetch is loading it: wait instead of reading twice
        event.wait()
        value = self.cache.peek(rid)
        if value is not None:
          found[rid] = value
          continue
      misses.append(rid)
    if misses:
      loaded_mem, loaded_mask = self._load(np.asarray(misses, np.int64))
      for i, rid in enumerate(misses):
        value = (loaded_mem[i], loaded_mask[i])
        found[rid] = value
        self.cache.put(rid, value)
    for j, rid in enumerate(unique.tolist()):
      if rid >= 0:
        rows = inverse == j
        mem[rows], mask[rows] = found[rid]
    return mem, mask

  def lookup_positions(self, ref_ids: Any) -> np.ndarray:
    """Stored rotary positions [n, L_mem, H_mem, k] (-1 = empty slot or id -1)."""
    ids = check_ref_ids(ref_ids, self.num_references)
    l, _, h, k, _ = self.memory_shape
    out = np.full((len(ids), l, h, k), -1, np.int32)
    ok = ids >= 0
    if ok.any():
      out[ok] = self.read_records(ids[ok])["pos"]
    return out

  # ---------------------------------------------------------------- prefetch

  def _start_prefetch(self) -> None:
    self._prefetch_queue = queue.Queue()
    self._prefetch_thread = threading.Thread(target=self._prefetch_loop, daemon=True,
                                             name="m3jax-bank-prefetch")
    self._prefetch_thread.start()

  def _prefetch_loop(self) -> None:
    assert self._prefetch_queue is not None
    while True:
      item = self._prefetch_queue.get()
      if item is None:
        return
      ids, events = item
      try:
        mem, mask = self._load(ids)
        for i, rid in enumerate(ids.tolist()):
          self.cache.put(rid, (mem[i], mask[i]))
        with self._lock:
          self._counts["prefetched"] += len(ids)
      except BaseException as e:  # surfaced on the next lookup
        self._prefetch_error = e
      finally:
        for rid, ev in events.items():
          with self._lock:
            self._inflight.pop(rid, None)
          ev.set()

  def _raise_prefetch_error(self) -> None:
    if self._prefetch_error is not None:
      e, self._prefetch_error = self._prefetch_error, None
      raise e

  def prefetch(self, ref_ids: Any) -> None:
    """Starts loading ids into the cache in the background (no-op without prefetch)."""
    if self._prefetch_queue is None or self.cache.capacity == 0:
      return
    ids = check_ref_ids(ref_ids, self.num_references)
    todo = {}
    with self._lock:
      for rid in np.unique(ids[ids >= 0]).tolist():
        if rid in self._inflight or rid in self.cache:
          continue
        todo[rid] = self._inflight[rid] = threading.Event()
    if todo:
      self._prefetch_queue.put((np.asarray(sorted(todo), np.int64), todo))

  def wait_prefetch(self) -> None:
    """Blocks until every prefetch issued so far has been loaded."""
    while True:
      with self._lock:
        events = list(self._inflight.values())
      if not events:
        return
      for ev in events:
        ev.wait()

  # ---------------------------------------------------------------- stats

  @property
  def bytes_per_memory(self) -> int:
    """Stored bytes of one record (keys/values or codes, plus positions)."""
    return self.record_dtype.itemsize

  def stats(self) -> dict[str, Any]:
    out = {f"cache_{k}": v for k, v in self.cache.stats().items()}
    with self._lock:
      out.update(self._counts)
    return out

  def close(self) -> None:
    if self._prefetch_thread is not None and self._prefetch_queue is not None:
      self._prefetch_queue.put(None)
      self._prefetch_thread.join(timeout=30)
      self._prefetch_thread = None
      self._prefetch_queue = None
    with self._lock:
      self._maps.clear()
