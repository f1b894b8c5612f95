"""The memory bank's on-disk format: layout, spec, settings and the errors of a bank.

A bank is a directory (docs/architecture.md, "Memory bank"):

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

Shards are encoded in fixed batches (`shard_batches`), so warm encoding
(m3jax.memory.encode_job) and cold start (m3jax.memory.cold_start) store the same
bytes. Writing and checking shard files: m3jax.memory.bank_shards; reading:
m3jax.memory.bank_reader.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from m3jax.core import artifacts
from m3jax.core import errors
from m3jax.core.config import ConfigError, ModelConfig
from m3jax.memory import codecs
from m3jax.memory import pq as pq_lib

FORMAT = "m3jax-memory-bank"
FORMAT_VERSION = 1
SPEC_FILE = "spec.json"
MANIFEST_FILE = "manifest.json"
QUANTIZER_FILE = "quantizer.npz"
SHARDS_DIR = "shards"
PENDING_DIR = "pending"
VERIFY_MODES = ("none", "size", "touch", "full")


class BankError(errors.UserError, ValueError):
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
    need(self.quantization in codecs.METHODS, "quantization",
         f"one of {codecs.METHODS}, got {self.quantization!r}")
    need(len(self.pq_subvectors) > 0 and all(int(m) > 0 for m in self.pq_subvectors),
         "pq_subvectors", f"positive sub-vector counts per stage, got {self.pq_subvectors}")
    need(self.pq_groups in codecs.GROUPINGS, "pq_groups",
         f"one of {codecs.GROUPINGS}, got {self.pq_groups!r}")
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


def record_dtype(codec: codecs.MemoryCodec, config: ModelConfig) -> np.dtype:
  """One memory's record: the codec's fields, then `pos` [L_mem, H_mem, k]."""
  l, _, h, k, _ = config.memory_shape
  fields = [(n, t, s) for n, t, s in codec.fields()]
  return np.dtype(fields + [("pos", positions_dtype(config), (l, h, k))])


def make_records(codec: codecs.MemoryCodec, config: ModelConfig, memories: Any,
                 positions: Any) -> np.ndarray:
  """memories [n, L, 2, H, k, d] + positions [n, L, H, k] -> structured records [n]."""
  fields = codec.encode(memories)
  pos = np.asarray(jax.device_get(positions))
  out = np.zeros(pos.shape[0], record_dtype(codec, config))
  for name, value in fields.items():
    out[name] = value
  out["pos"] = pos
  return out


def empty_records(codec: codecs.MemoryCodec, config: ModelConfig, n: int) -> np.ndarray:
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



def checkpoint_info(path: str | None, step: int | None, params: Any) -> dict[str, Any]:
  """What a bank records about the parameters that encoded it (spec `checkpoint`)."""
  return dict(path=os.path.abspath(path) if path else "", step=step,
              params_fingerprint=artifacts.params_fingerprint(params))


def make_spec(*, config: ModelConfig, tokenizer_hash: str, n_references: int,
              reference_length: int, settings: BankSettings, codec: codecs.MemoryCodec,
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


def read_json(path: str) -> Any:
  """A bank JSON file; a damaged one raises BankError naming it."""
  try:
    return artifacts.read_json(path)
  except ValueError as e:
    raise BankError(str(e)) from e


def check_or_write_spec(root: str, spec: dict[str, Any]) -> None:
  """Writes `spec.json`, or refuses to continue a bank whose spec differs."""
  path = os.path.join(root, SPEC_FILE)
  if os.path.exists(path):
    old = read_json(path)
    diffs = artifacts.dict_diff(old, spec)
    if diffs:
      raise BankMismatchError(
          f"{path}: this bank was started with other settings; refusing to mix them "
          f"({'; '.join(diffs[:8])}{' ...' if len(diffs) > 8 else ''}). Use a new --out "
          "directory, or rerun with the original settings.")
    return
  os.makedirs(os.path.join(root, SHARDS_DIR), exist_ok=True)
  artifacts.write_json(path, spec)


# ------------------------------------------------------------------ fixed encode batches


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


def pending_file(shard: int, batch: int) -> str:
  """Path (relative to the bank root) of a cold-start batch of an unfinished shard."""
  return f"{PENDING_DIR}/shard-{shard:06d}/batch-{batch:04d}.npy"


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
    diffs = artifacts.dict_diff(meta["model"]["config"], model_identity(model_config))
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
    fp = artifacts.params_fingerprint(params)
    if fp != ckpt["params_fingerprint"]:
      raise BankMismatchError(
          f"{where}: bank was encoded with other parameters (params fingerprint "
          f"{ckpt['params_fingerprint']}, these params {fp}; checkpoint "
          f"{ckpt.get('path', '?')} step {ckpt.get('step')})")
  method = meta["storage"]["method"]
  if quantization is not None and method != quantization:
    raise BankMismatchError(f"{where}: bank stores quantization={method!r}, expected "
                            f"{quantization!r}")


def load_codec(root: str, meta: dict[str, Any], config: ModelConfig) -> codecs.MemoryCodec:
  """The codec a bank's records were written with (pq: its quantizer, checksum-checked)."""
  storage = meta["storage"]
  quantizer = None
  if storage["method"] == "pq":
    path = artifacts.confined_path(root, storage.get("quantizer_file", QUANTIZER_FILE),
                                   f"bank {root}: storage.quantizer_file")
    if not os.path.exists(path):
      raise BankError(f"{path} not found: a pq bank needs its quantizer")
    digest = artifacts.sha256_file(path)
    if digest != storage.get("quantizer_sha256"):
      raise CorruptShardError(f"{path}: sha256 {digest[:16]}... does not match the bank's "
                              f"{str(storage.get('quantizer_sha256'))[:16]}...")
    quantizer = pq_lib.ProductQuantizer.load(path)
  return codecs.make_codec(storage["method"], config.memory_shape, quantizer)
