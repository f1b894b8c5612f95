"""The memory bank on disk: layout, writer helpers, warm-start and cold-start readers.

A bank is a directory (WORKSPACE.md "Memory bank"):

    spec.json                     what the bank is: model fingerprint, checkpoint,
                                  tokenizer hash, sparsification, layout, codec
    quantizer.npz                 PQ codebooks + rotation (quantization=pq only)
    shards/shard-000000.npy       records of ref_ids [0, S); shard s: [s*S, (s+1)*S)
    shards/shard-000000.npy.json  its sha256, size, reference and token counts
    pending/shard-000007/batch-0003.npy   cold start: encoded batches of unfinished shards
    manifest.json                 spec + every shard's checksum; written last, so its
                                  presence means "complete"

A shard is one `.npy` file holding a 1-D structured array of S records, one per
reference (row = ref_id - s*S; rows past the last reference are empty records).
A record is one memory, contiguous on disk: the codec's fields (`kv`: bfloat16 bit
patterns as uint16; or `kv_int8` + `kv_scale`; or `kv_codes`) and `pos`, the kept
tokens' rotary positions (int16, -1 = empty slot). Why `.npy`: any numpy reads it
(no pickle: structured dtypes load with allow_pickle=False), it memory-maps, so a
lookup reads just the requested records, one contiguous range each (also a single
HTTP range read per memory on object storage), and one file per shard makes
"written completely or not at all" a single rename. Zarr/tensorstore would add
chunk files and a dependency for no gain: bf16 keys/values do not compress.

Every file is written to a temporary name and renamed; a shard's `.json` checksum
record is written before the shard is renamed into place, so a visible shard always
has its checksum. `MemoryBank.open` refuses a bank made by another model config,
tokenizer, checkpoint or quantization, naming the mismatch.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import queue
import threading
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from m3jax.core import artifacts as atomic_io
from m3jax.memory import quantize as quant_lib
from m3jax.core.config import ConfigError, ModelConfig
from m3jax.memory.source import LRUCache, MemorySource, check_ref_ids
from m3jax.core.config import model_config as to_model_config

FORMAT = "m3jax-memory-bank"
FORMAT_VERSION = 1
SPEC_FILE = "spec.json"
MANIFEST_FILE = "manifest.json"
QUANTIZER_FILE = "quantizer.npz"
SHARDS_DIR = "shards"
PENDING_DIR = "pending"
VERIFY_MODES = ("none", "size", "touch", "full")
_HASH_CHUNK = 8 << 20


class BankError(ValueError):
  """A bank directory cannot be used; the message names the file or field."""


class BankMismatchError(BankError):
  """The bank was made by another model, tokenizer, checkpoint or settings."""


class CorruptShardError(BankError):
  """A shard file's size or checksum differs from its record."""


class IncompleteBankError(BankError):
  """The bank has no manifest yet: its encoding job has not finished."""


# ------------------------------------------------------------------ settings


@dataclasses.dataclass(frozen=True)
class BankSettings:
  """The `bank` config section, validated (see configs/base.py)."""
  shard_size: int = 1024
  encode_batch_size: int = 64
  quantization: str = "none"
  pq_subvectors: tuple[int, ...] = (10, 4)
  pq_groups: str = "layer_kv"
  pq_train_references: int = 4096
  pq_iterations: int = 20
  pq_opq_iterations: int = 0
  pq_seed: int = 0
  cache_memories: int = 4096
  prefetch: bool = False
  verify: str = "touch"

  def __post_init__(self):
    def need(cond, field, msg):
      if not cond:
        raise ConfigError(f"config field `bank.{field}`: {msg}")
    need(self.shard_size > 0, "shard_size", f"must be positive, got {self.shard_size}")
    need(self.encode_batch_size > 0, "encode_batch_size",
         f"must be positive, got {self.encode_batch_size}")
    need(self.shard_size % self.encode_batch_size == 0, "encode_batch_size",
         f"{self.encode_batch_size} does not divide bank.shard_size={self.shard_size}")
    need(self.quantization in quant_lib.METHODS, "quantization",
         f"one of {quant_lib.METHODS}, got {self.quantization!r}")
    need(len(self.pq_subvectors) > 0 and all(int(m) > 0 for m in self.pq_subvectors),
         "pq_subvectors", f"positive sub-vector counts per stage, got {self.pq_subvectors}")
    need(self.pq_groups in quant_lib.GROUPINGS, "pq_groups",
         f"one of {quant_lib.GROUPINGS}, got {self.pq_groups!r}")
    need(self.pq_train_references > 0, "pq_train_references", "must be positive")
    need(self.pq_iterations > 0, "pq_iterations", "must be positive")
    need(self.pq_opq_iterations >= 0, "pq_opq_iterations", "must be >= 0")
    need(self.cache_memories >= 0, "cache_memories", "must be >= 0 (0 = off)")
    need(self.verify in VERIFY_MODES, "verify", f"one of {VERIFY_MODES}, got {self.verify!r}")

  def pq_settings(self) -> dict[str, Any]:
    return dict(subvectors=list(self.pq_subvectors), grouping=self.pq_groups,
                train_references=self.pq_train_references, iterations=self.pq_iterations,
                opq_iterations=self.pq_opq_iterations, seed=self.pq_seed)


def bank_settings(cfg: ml_collections.ConfigDict | None = None, **overrides) -> BankSettings:
  """BankSettings from `cfg.bank` (defaults where absent) plus keyword overrides."""
  values = {}
  if cfg is not None and "bank" in cfg:
    known = {f.name for f in dataclasses.fields(BankSettings)}
    for key, value in cfg.bank.items():
      if key not in known:
        raise ConfigError(f"config field `bank.{key}`: unknown field")
      values[key] = value
  values.update(overrides)
  if "pq_subvectors" in values:
    values["pq_subvectors"] = tuple(int(m) for m in values["pq_subvectors"])
  return BankSettings(**values)


# ------------------------------------------------------------------ layout


def shard_file(shard: int) -> str:
  """Path of shard `shard` relative to the bank root."""
  return f"{SHARDS_DIR}/shard-{shard:06d}.npy"


def num_shards(n_references: int, shard_size: int) -> int:
  return max(1, -(-n_references // shard_size))


def positions_dtype(config: ModelConfig) -> str:
  return "<i2" if config.prefix_length + config.reference_length < 2**15 else "<i4"


def record_dtype(codec: quant_lib.MemoryCodec, config: ModelConfig) -> np.dtype:
  """One memory's record: the codec's fields, then `pos` [L_mem, H_mem, k]."""
  l, _, h, k, _ = config.memory_shape
  fields = [(n, t, s) for n, t, s in codec.fields()]
  return np.dtype(fields + [("pos", positions_dtype(config), (l, h, k))])


def make_records(codec: quant_lib.MemoryCodec, config: ModelConfig, memories: Any,
                 positions: Any) -> np.ndarray:
  """memories [n, L, 2, H, k, d] + positions [n, L, H, k] -> structured records [n]."""
  fields = codec.encode(memories)
  pos = np.asarray(jax.device_get(positions))
  out = np.zeros(pos.shape[0], record_dtype(codec, config))
  for name, value in fields.items():
    out[name] = value
  out["pos"] = pos
  return out


def empty_records(codec: quant_lib.MemoryCodec, config: ModelConfig, n: int) -> np.ndarray:
  """Records of id -1 / rows past the last reference: zero memories, positions -1."""
  l, _, h, k, _ = config.memory_shape
  return make_records(codec, config, np.zeros((n,) + config.memory_shape, np.float32),
                      np.full((n, l, h, k), -1, np.int32))


# ------------------------------------------------------------------ spec and manifest


_MODEL_IDENTITY_SKIP = ("dtype", "remat_policy", "max_seq_len", "init_std")


def model_identity(config: ModelConfig) -> dict[str, Any]:
  """The model fields a memory depends on (those in `ModelConfig.fingerprint()`)."""
  d = config.to_dict()
  for k in _MODEL_IDENTITY_SKIP:
    d.pop(k, None)
  return json.loads(json.dumps(d))


def params_fingerprint(params: Any, samples_per_leaf: int = 4096) -> str:
  """Short hash of a parameter tree: which checkpoint a bank was encoded with.

  Hashes paths, shapes and an evenly strided sample of each leaf (in float32), so
  it costs a few KB of transfers even for a sharded multi-GB tree.
  """
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves_with_path(params)
  for path, x in sorted(leaves, key=lambda e: jax.tree_util.keystr(e[0])):
    size = int(np.prod(x.shape))
    stride = max(1, size // samples_per_leaf)
    sample = jnp.asarray(x).reshape(-1)[::stride].astype(jnp.float32)
    try:
      host = np.asarray(jax.device_get(sample))
    except RuntimeError:  # not fully addressable (multi-host sharded)
      from jax.experimental import multihost_utils
      host = np.asarray(multihost_utils.process_allgather(sample, tiled=True))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(repr(tuple(x.shape)).encode())
    h.update(host.tobytes())
  return h.hexdigest()[:16]


def make_spec(*, config: ModelConfig, tokenizer_hash: str, n_references: int,
              reference_length: int, settings: BankSettings, codec: quant_lib.MemoryCodec,
              checkpoint: dict[str, Any] | None = None, references_source: str = "",
              quantizer_sha256: str | None = None) -> dict[str, Any]:
  """Everything that determines a bank's bytes (compared on every resume and open)."""
  rec = record_dtype(codec, config)
  storage = dict(codec.describe())
  storage.pop("train", None)
  if quantizer_sha256:
    storage.update(quantizer_file=QUANTIZER_FILE, quantizer_sha256=quantizer_sha256,
                   settings=settings.pq_settings())
  return json.loads(json.dumps(dict(
      format=FORMAT, format_version=FORMAT_VERSION,
      model=dict(fingerprint=config.fingerprint(), config=model_identity(config)),
      sparsification=dict(memory_layers=list(config.memory_layers),
                          memory_heads=list(config.memory_heads),
                          memory_tokens_per_head=config.memory_tokens_per_head,
                          reference_length=config.reference_length,
                          reference_prefix_ids=list(config.reference_prefix_ids),
                          head_dim=config.head_dim),
      memory_shape=list(config.memory_shape),
      checkpoint=dict(checkpoint or {}),
      tokenizer_hash=tokenizer_hash,
      references=dict(count=int(n_references), reference_length=int(reference_length),
                      source=references_source),
      layout=dict(shard_size=settings.shard_size,
                  num_shards=num_shards(n_references, settings.shard_size),
                  encode_batch_size=settings.encode_batch_size,
                  file_pattern=f"{SHARDS_DIR}/shard-{{shard:06d}}.npy",
                  row="ref_id - shard * shard_size",
                  record_dtype=[[n, rec.fields[n][0].base.str, list(rec.fields[n][0].shape)]
                                for n in rec.names],
                  record_bytes=rec.itemsize,
                  kv_encoding=("bfloat16 bit patterns as little-endian uint16"
                               if codec.method == "none" else codec.method),
                  positions=f"{positions_dtype(config)}: rotary position of each kept "
                            "token (prefix_length + index in the reference), -1 = empty"),
      storage=storage,
  )))


def diff_dicts(old: Any, new: Any, prefix: str = "") -> list[str]:
  """'a.b: old -> new' for every leaf that differs."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += diff_dicts(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
    return out
  return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise BankError(f"{path}: not valid JSON ({e})") from e


def check_or_write_spec(root: str, spec: dict[str, Any]) -> None:
  """Writes `spec.json`, or refuses to continue a bank whose spec differs."""
  path = os.path.join(root, SPEC_FILE)
  if os.path.exists(path):
    old = read_json(path)
    diffs = diff_dicts(old, spec)
    if diffs:
      raise BankMismatchError(
          f"{path}: this bank was started with other settings; refusing to mix them "
          f"({'; '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}). Use a new --out "
          "directory, or rerun with the original settings.")
    return
  os.makedirs(os.path.join(root, SHARDS_DIR), exist_ok=True)
  atomic_io.write_json(path, spec)


# ------------------------------------------------------------------ writing shards


class _HashingWriter:
  """File wrapper that hashes and counts what is written."""

  def __init__(self, f):
    self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

  def write(self, data) -> int:
    mv = memoryview(data).cast("B")
    self.sha.update(mv)
    self.bytes += mv.nbytes
    return self.f.write(mv)


def write_npy_atomic(path: str, array: np.ndarray) -> tuple[str, int]:
  """Writes `array` as .npy under a temporary name, fsyncs, renames; (sha256, bytes)."""
  tmp = atomic_io.tmp_name(path)
  with open(tmp, "wb") as f:
    w = _HashingWriter(f)
    np.lib.format.write_array(w, np.ascontiguousarray(array), allow_pickle=False)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return w.sha.hexdigest(), w.bytes


def write_shard(root: str, shard: int, records: np.ndarray, *, n_refs: int, tokens: int
                ) -> dict[str, Any]:
  """Writes one complete shard: data to a temp name, checksum record, then the rename.

  A crash leaves either no shard file (only temporaries, removed on the next run)
  or a complete one whose `.json` record already exists.
  """
  path = os.path.join(root, shard_file(shard))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = atomic_io.tmp_name(path)
  with open(tmp, "wb") as f:
    w = _HashingWriter(f)
    np.lib.format.write_array(w, np.ascontiguousarray(records), allow_pickle=False)
    f.flush()
    os.fsync(f.fileno())
  info = dict(shard=shard, file=shard_file(shard), sha256=w.sha.hexdigest(), bytes=w.bytes,
              refs=int(n_refs), tokens=int(tokens))
  atomic_io.write_json(path + ".json", info)
  os.replace(tmp, path)
  return info


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      block = f.read(_HASH_CHUNK)
      if not block:
        return h.hexdigest()
      h.update(block)


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


def verify_shard(root: str, info: dict[str, Any], *, full: bool = True) -> None:
  """Raises CorruptShardError naming the file when its size (or sha256) is wrong."""
  path = os.path.join(root, info["file"])
  if not os.path.exists(path):
    raise CorruptShardError(f"{path}: shard file missing")
  size = os.path.getsize(path)
  if size != info["bytes"]:
    raise CorruptShardError(f"{path}: {size} bytes, its record says {info['bytes']} "
                            "(truncated or replaced)")
  if full:
    digest = sha256_file(path)
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
  atomic_io.write_json(os.path.join(root, MANIFEST_FILE), manifest)
  pending = os.path.join(root, PENDING_DIR)
  if os.path.isdir(pending) and not os.listdir(pending):
    os.rmdir(pending)
  return manifest


# ------------------------------------------------------------------ checks on open


def check_compatible(meta: dict[str, Any], where: str, *, model_config: ModelConfig,
                     tokenizer_hash: str | None, checkpoint_step: int | None = None,
                     params: Any = None, quantization: str | None = None) -> None:
  """Raises BankMismatchError naming the first kind of mismatch (model, tokenizer, ...)."""
  if meta.get("format") != FORMAT:
    raise BankError(f"{where}: not an m3jax memory bank (format {meta.get('format')!r})")
  if meta.get("format_version") != FORMAT_VERSION:
    raise BankError(f"{where}: bank format version {meta.get('format_version')} is not "
                    f"supported (this m3jax reads version {FORMAT_VERSION})")
  if meta["model"]["fingerprint"] != model_config.fingerprint():
    diffs = diff_dicts(meta["model"]["config"], model_identity(model_config))
    raise BankMismatchError(
        f"{where}: bank was encoded by another model config (fingerprint "
        f"{meta['model']['fingerprint']}, this model {model_config.fingerprint()}): "
        f"{'; '.join('model.' + d for d in diffs[:6]) or 'fields differ'}")
  if tokenizer_hash is not None and meta.get("tokenizer_hash") != tokenizer_hash:
    raise BankMismatchError(
        f"{where}: bank references were tokenized with tokenizer hash "
        f"{str(meta.get('tokenizer_hash'))[:12]}, the tokenizer in use has "
        f"{tokenizer_hash[:12]}")
  ckpt = meta.get("checkpoint", {})
  if checkpoint_step is not None and ckpt.get("step") != checkpoint_step:
    raise BankMismatchError(f"{where}: bank was encoded from checkpoint step "
                            f"{ckpt.get('step')} ({ckpt.get('path', '?')}), expected step "
                            f"{checkpoint_step}")
  if params is not None and ckpt.get("params_fingerprint"):
    fp = params_fingerprint(params)
    if fp != ckpt["params_fingerprint"]:
      raise BankMismatchError(
          f"{where}: bank was encoded with other parameters (params fingerprint "
          f"{ckpt['params_fingerprint']}, these params {fp}; checkpoint "
          f"{ckpt.get('path', '?')} step {ckpt.get('step')})")
  method = meta["storage"]["method"]
  if quantization is not None and method != quantization:
    raise BankMismatchError(f"{where}: bank stores quantization={method!r}, expected "
                            f"{quantization!r}")


def _load_codec(root: str, meta: dict[str, Any], config: ModelConfig) -> quant_lib.MemoryCodec:
  storage = meta["storage"]
  quantizer = None
  if storage["method"] == "pq":
    path = os.path.join(root, storage.get("quantizer_file", QUANTIZER_FILE))
    if not os.path.exists(path):
      raise BankError(f"{path} not found: a pq bank needs its quantizer")
    digest = sha256_file(path)
    if digest != storage.get("quantizer_sha256"):
      raise CorruptShardError(f"{path}: sha256 {digest[:16]}... does not match the bank's "
                              f"{str(storage.get('quantizer_sha256'))[:16]}...")
    quantizer = quant_lib.ProductQuantizer.load(path)
  return quant_lib.make_codec(storage["method"], config.memory_shape, quantizer)


# ------------------------------------------------------------------ the bank


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
    self.codec = _load_codec(root, meta, config)
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
      path = os.path.join(self.root, info["file"])
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


# ------------------------------------------------------------------ cold start


def shard_batches(shard: int, settings_or_layout: Any, n_references: int
                  ) -> list[np.ndarray]:
  """The fixed encode batches of a shard: ref ids, -1 past the last reference.

  Batch b of shard s is ids [s*S + b*B, s*S + (b+1)*B). Warm encoding and cold
  start both encode exactly these batches, so they store identical bytes.
  """
  if isinstance(settings_or_layout, dict):
    size, batch = settings_or_layout["shard_size"], settings_or_layout["encode_batch_size"]
  else:
    size, batch = settings_or_layout.shard_size, settings_or_layout.encode_batch_size
  out = []
  for lo in range(shard * size, (shard + 1) * size, batch):
    ids = np.arange(lo, lo + batch, dtype=np.int64)
    out.append(np.where(ids < n_references, ids, -1))
  return out


def encode_batch_records(encoder: Any, references: Any, codec: quant_lib.MemoryCodec,
                         config: ModelConfig, ids: np.ndarray) -> tuple[np.ndarray, int]:
  """Records [B] of one fixed batch (ids -1 = padding); returns (records, real tokens)."""
  if (ids < 0).all():
    return empty_records(codec, config, len(ids)), 0
  tokens, lengths = references.tokens_by_ids(ids)
  lengths = np.where(ids >= 0, lengths, 0)
  memories, positions = encoder(tokens, lengths)
  records = make_records(codec, config, memories, positions)
  pad = ids < 0
  if pad.any():
    records[pad] = empty_records(codec, config, int(pad.sum()))
  return records, int(lengths.sum())


def pending_file(shard: int, batch: int) -> str:
  return f"{PENDING_DIR}/shard-{shard:06d}/batch-{batch:04d}.npy"


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
  def create(cls, path: str, *, encoder: Any, references: Any, settings: BankSettings,
             checkpoint: dict[str, Any] | None = None,
             quantizer: quant_lib.ProductQuantizer | None = None,
             references_source: str = "", dtype: Any = jnp.bfloat16) -> "ColdStartBank":
    """Starts (or continues) a cold-start bank in `path`.

    `encoder` is an `m3jax.memory.encode_job.ReferenceEncoder` (batch size =
    settings.encode_batch_size); `references` answers tokens_by_ids and has
    `tokenizer_hash`. quantization=pq needs a trained `quantizer`.
    """
    config: ModelConfig = encoder.config
    if encoder.batch_size != settings.encode_batch_size:
      raise ConfigError(f"config field `bank.encode_batch_size`: {settings.encode_batch_size} "
                        f"but the encoder was built for batches of {encoder.batch_size}")
    root = os.path.abspath(path)
    os.makedirs(root, exist_ok=True)
    codec = quant_lib.make_codec(settings.quantization, config.memory_shape, quantizer)
    q_sha = None
    if settings.quantization == "pq":
      q_sha = store_quantizer(root, quantizer)
    spec = make_spec(config=config, tokenizer_hash=references.tokenizer_hash,
                     n_references=len(references),
                     reference_length=references.reference_length, settings=settings,
                     codec=codec, checkpoint=checkpoint,
                     references_source=references_source or getattr(references, "path", ""),
                     quantizer_sha256=q_sha)
    check_or_write_spec(root, spec)
    meta = dict(spec)
    meta["shards"] = [None] * spec["layout"]["num_shards"]
    return cls(root, meta, config, encoder=encoder, references=references,
               cache_memories=settings.cache_memories, prefetch=settings.prefetch,
               verify=settings.verify, dtype=dtype)

  @property
  def complete(self) -> bool:
    return os.path.exists(os.path.join(self.root, MANIFEST_FILE))

  def _shard_info(self, shard: int) -> dict[str, Any]:
    info = self._done_shards.get(shard)
    if info is None:
      info = shard_record(self.root, shard)
      if info is None:
        raise KeyError(shard)
      self._done_shards[shard] = info
    return info

  def verify(self, full: bool = True, shards: Sequence[int] | None = None) -> None:
    todo = range(self.num_shards) if shards is None else shards
    for s in todo:
      if shard_record(self.root, s) is not None:
        super().verify(full, [s])

  def _shard_records(self, shard: int, rows: np.ndarray) -> np.ndarray:
    if shard in self._done_shards or shard_record(self.root, shard) is not None:
      return super()._shard_records(shard, rows)
    with self._write_lock:
      if shard_record(self.root, shard) is not None:
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
    path = os.path.join(self.root, pending_file(shard, b))
    if os.path.exists(path):
      recs = np.load(path, allow_pickle=False)
      if recs.dtype == self.record_dtype:
        return recs
      logging.warning("%s: unexpected dtype %s; re-encoding", path, recs.dtype)
    ids = shard_batches(shard, self.meta["layout"], self.num_references)[b]
    recs, _ = encode_batch_records(self.encoder, self.references, self.codec, self.config, ids)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_npy_atomic(path, recs)
    with self._lock:
      self._counts["encoded_batches"] += 1
      self._counts["encoded_references"] += int((ids >= 0).sum())
    return recs

  def _maybe_complete(self, shard: int) -> None:
    """Assembles the shard once all its batches are pending; then maybe the manifest."""
    layout = self.meta["layout"]
    n_batches = layout["shard_size"] // layout["encode_batch_size"]
    batches = shard_batches(shard, layout, self.num_references)
    paths = [os.path.join(self.root, pending_file(shard, b)) for b in range(n_batches)]
    for b, p in enumerate(paths):
      if not os.path.exists(p) and (batches[b] >= 0).any():
        return
    parts = []
    for b, p in enumerate(paths):
      parts.append(np.load(p, allow_pickle=False) if os.path.exists(p) else
                   empty_records(self.codec, self.config, len(batches[b])))
    ids = np.concatenate(batches)
    real = ids[ids >= 0]
    _, lengths = self.references.tokens_by_ids(real)
    info = write_shard(self.root, shard, np.concatenate(parts), n_refs=len(real),
                       tokens=int(lengths.sum()))
    self._done_shards[shard] = info
    self._touched.add(shard)  # its checksum was computed from the bytes just written
    with self._lock:
      self._counts["shards_completed"] += 1
    for p in paths:
      if os.path.exists(p):
        os.remove(p)
    d = os.path.join(self.root, PENDING_DIR, f"shard-{shard:06d}")
    if os.path.isdir(d) and not os.listdir(d):
      os.rmdir(d)
    if all(shard_record(self.root, s) is not None for s in range(self.num_shards)):
      self.meta = finalize(self.root)

  def encode_all(self) -> None:
    """Fills every missing shard (what the warm job does, single process)."""
    for s in range(self.num_shards):
      if shard_record(self.root, s) is None:
        self._shard_records(s, np.arange(self.shard_size))


def store_quantizer(root: str, quantizer: quant_lib.ProductQuantizer | None) -> str:
  """Saves the PQ quantizer into the bank (or checks the one there); returns its sha256."""
  path = os.path.join(root, QUANTIZER_FILE)
  if quantizer is None:
    if not os.path.exists(path):
      raise BankError(f"quantization=pq: no quantizer given and {path} does not exist")
    return sha256_file(path)
  data = quantizer.to_bytes()
  digest = hashlib.sha256(data).hexdigest()
  if os.path.exists(path):
    old = sha256_file(path)
    if old != digest:
      raise BankMismatchError(f"{path}: the bank already holds another quantizer "
                              f"(sha256 {old[:12]}, given {digest[:12]})")
    return old
  quantizer.save(path)
  return digest
