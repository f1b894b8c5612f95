"""Writing and checking a bank's shard files: checksummed shards, verification, manifest.

Every file is written under a temporary name and renamed; a shard's `.json`
checksum record is written before the shard is renamed into place, so a visible
shard always has its checksum, and a killed writer leaves only temporaries
(removed by `remove_stale_temporaries`). The format itself: m3jax.memory.bank_format.
"""

from __future__ import annotations

import glob
import hashlib
import os
from typing import Any, Callable, Iterable

import numpy as np

from m3jax.core import artifacts
from m3jax.memory import pq as pq_lib
from m3jax.memory.bank_format import (MANIFEST_FILE, PENDING_DIR, QUANTIZER_FILE, SPEC_FILE,
                                      BankError, BankMismatchError, CorruptShardError,
                                      IncompleteBankError, read_json, shard_file)


class _HashingWriter:
  """File wrapper that hashes and counts what is written (one pass over a large shard)."""

  def __init__(self, f):
    self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

  def write(self, data) -> int:
    mv = memoryview(data).cast("B")
    self.sha.update(mv)
    self.bytes += mv.nbytes
    return self.f.write(mv)


def write_npy(path: str, array: np.ndarray,
              before_rename: Callable[[str, int], None] | None = None) -> tuple[str, int]:
  """Writes `array` as .npy atomically, hashing while writing; returns (sha256, bytes).

  `before_rename(sha256, bytes)` runs after the data is on disk under its temporary
  name and before the rename (a shard's checksum record is written there).
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = artifacts.tmp_name(path)
  with open(tmp, "wb") as f:
    w = _HashingWriter(f)
    np.lib.format.write_array(w, np.ascontiguousarray(array), allow_pickle=False)
    f.flush()
    os.fsync(f.fileno())
  digest = w.sha.hexdigest()
  if before_rename is not None:
    before_rename(digest, w.bytes)
  os.replace(tmp, path)
  return digest, w.bytes


def write_shard(root: str, shard: int, records: np.ndarray, *, n_refs: int, tokens: int
                ) -> dict[str, Any]:
  """Writes one complete shard: data to a temp name, checksum record, then the rename.

  A crash leaves either no shard file (only temporaries, removed on the next run)
  or a complete one whose `.json` record already exists.
  """
  path = os.path.join(root, shard_file(shard))
  info: dict[str, Any] = {}

  def record(digest: str, n_bytes: int) -> None:
    info.update(shard=shard, file=shard_file(shard), sha256=digest, bytes=n_bytes,
                refs=int(n_refs), tokens=int(tokens))
    artifacts.write_json(path + ".json", info)

  write_npy(path, records, before_rename=record)
  return info


def shard_record(root: str, shard: int) -> dict[str, Any] | None:
  """The checksum record of a finished shard, or None if the shard is not there."""
  path = os.path.join(root, shard_file(shard))
  if not os.path.exists(path):
    return None
  side = path + ".json"
  if not os.path.exists(side):
    raise CorruptShardError(f"{path} has no checksum record {side}; it was not written by "
                            "m3jax (delete it to have it re-encoded)")
  return read_json(side)


def shard_path(root: str, info: dict[str, Any]) -> str:
  """The file of a shard record (`info["file"]`), confined to the bank directory."""
  return artifacts.confined_path(root, info.get("file"), f"bank {root}: shard file")


def verify_shard(root: str, info: dict[str, Any], *, full: bool = True) -> None:
  """Raises CorruptShardError naming the file when its size (or sha256) is wrong."""
  path = shard_path(root, info)
  if not os.path.exists(path):
    raise CorruptShardError(f"{path}: shard file missing")
  size = os.path.getsize(path)
  if size != info["bytes"]:
    raise CorruptShardError(f"{path}: {size} bytes, its record says {info['bytes']} "
                            "(truncated or replaced)")
  if full:
    digest = artifacts.sha256_file(path)
    if digest != info["sha256"]:
      raise CorruptShardError(f"{path}: sha256 {digest[:16]}... does not match the recorded "
                              f"{info['sha256'][:16]}... (corrupt shard)")


def remove_stale_temporaries(root: str, shards: Iterable[int]) -> int:
  """Deletes leftover `*.tmp-*` files of the given shards (from a killed run)."""
  n = 0
  for s in shards:
    for tmp in glob.glob(os.path.join(root, shard_file(s)) + "*.tmp-*"):
      os.remove(tmp)
      n += 1
  return n


def finalize(root: str) -> dict[str, Any]:
  """Writes `manifest.json` once every shard exists; returns it.

  Checks each shard's size against its record (the checksums were computed while
  writing, or verified when a rerun skipped the shard). Deterministic: the same
  shards give the same manifest bytes, so concurrent finalisers agree.
  """
  spec = read_json(os.path.join(root, SPEC_FILE))
  n_shards = spec["layout"]["num_shards"]
  shards, missing = [], []
  for s in range(n_shards):
    info = shard_record(root, s)
    if info is None:
      missing.append(s)
      continue
    verify_shard(root, info, full=False)
    shards.append(info)
  if missing:
    raise IncompleteBankError(
        f"{root}: {len(missing)} of {n_shards} shards are missing (e.g. "
        f"{', '.join(shard_file(s) for s in missing[:3])}); rerun the encoding job")
  manifest = dict(spec)
  bytes_total = sum(i["bytes"] for i in shards)
  manifest["totals"] = dict(references=spec["references"]["count"],
                            tokens=sum(i["tokens"] for i in shards), shards=n_shards,
                            bytes=bytes_total, record_bytes=spec["layout"]["record_bytes"])
  manifest["shards"] = shards
  manifest["complete"] = True
  artifacts.write_json(os.path.join(root, MANIFEST_FILE), manifest)
  pending = os.path.join(root, PENDING_DIR)
  if os.path.isdir(pending) and not os.listdir(pending):
    os.rmdir(pending)
  return manifest


def remove_pending(root: str, shard: int) -> None:
  """Deletes the cold-start batches of a shard once the shard file exists."""
  pending = os.path.join(root, PENDING_DIR, f"shard-{shard:06d}")
  if os.path.isdir(pending):
    for name in os.listdir(pending):
      os.remove(os.path.join(pending, name))
    os.rmdir(pending)


def store_quantizer(root: str, quantizer: pq_lib.ProductQuantizer | None) -> str:
  """Saves the PQ quantizer into the bank (or checks the one there); returns its sha256."""
  path = os.path.join(root, QUANTIZER_FILE)
  if quantizer is None:
    if not os.path.exists(path):
      raise BankError(f"quantization=pq: no quantizer given and {path} does not exist")
    return artifacts.sha256_file(path)
  data = quantizer.to_bytes()
  digest = hashlib.sha256(data).hexdigest()
  if os.path.exists(path):
    old = artifacts.sha256_file(path)
    if old != digest:
      raise BankMismatchError(f"{path}: the bank already holds another quantizer "
                              f"(sha256 {old[:12]}, given {digest[:12]})")
    return old
  quantizer.save(path)
  return digest
