"""Config loading, validation and the frozen model config the model code reads.

Experiment files in `configs/` return an `ml_collections.ConfigDict`. This module
loads them (from absl flags or a path plus `a.b=v` overrides), validates every
cross-field constraint once with errors that name the field, and freezes the
model section into a hashable `ModelConfig` that jitted code can close over.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import json
import os
from typing import Any, Sequence

import ml_collections

from m3jax.core import artifacts as atomic_io
from m3jax.core import errors


class ConfigError(errors.UserError, ValueError):
  """A config field is missing, unknown or inconsistent; the message names it."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model section of a config, validated and frozen (hashable for jit)."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  init_std: float = 0.02
  max_seq_len: int = 2048
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat_policy: str = "none"
  attention_impl: str = "auto"  # see ATTENTION_IMPLS and docs/model.md, "Attention implementations"
  attention_block_q: int = 512  # blockwise: queries per block (multiples of 128 suit TPUs)
  attention_block_kv: int = 512  # blockwise: keys per block
  memory_layers: tuple[int, ...] = ()
  memory_heads: tuple[int, ...] = ()
  memory_tokens_per_head: int = 8
  reference_length: int = 128
  chunk_length: int = 64
  memories_per_chunk: int = 5
  reference_prefix_ids: tuple[int, ...] = (2, 4)
  bos_id: int = 2
  eos_id: int = 3
  pad_id: int = 0

  @property
  def n_memory_layers(self) -> int:
    return len(self.memory_layers)

  @property
  def n_memory_heads(self) -> int:
    return len(self.memory_heads)

  @property
  def prefix_length(self) -> int:
    return len(self.reference_prefix_ids)

  @property
  def context_offset(self) -> int:
    """Position of the first context token when the reference prefix is on.

    The prefix occupies [0, P); every memory keeps its within-reference
    positions [P, P + reference_length) (the parallel span); the context follows.
    """
    return self.prefix_length + self.reference_length

  @property
  def memory_shape(self) -> tuple[int, int, int, int, int]:
    """Shape of one sparse memory: (L_mem, 2, H_mem, k, d_h)."""
    return (self.n_memory_layers, 2, self.n_memory_heads, self.memory_tokens_per_head,
            self.head_dim)

  @property
  def last_memory_layer(self) -> int:
    return max(self.memory_layers) if self.memory_layers else -1

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def identity(self) -> dict[str, Any]:
    """The fields that change a parameter tree or a memory (what `fingerprint` hashes).

    Compute dtype, remat and the attention implementation do not change results' meaning
    and are left out, so a bank encoded in bf16 on GPU opens with the same model trained in f32.
    """
    d = self.to_dict()
    for k in ("dtype", "remat_policy", "max_seq_len", "init_std", "attention_impl",
              "attention_block_q", "attention_block_kv"):
      d.pop(k)
    return d

  def fingerprint(self) -> str:
    """Stable hash of `identity()`."""
    blob = json.dumps(self.identity(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


TRAIN_STAGES = ("warmup", "continual", "sft", "dpo")
_REMAT = ("none", "full", "dots_saveable", "dots_with_no_batch_dims")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # see m3jax.model.dtypes
# Attention implementations (m3jax.model.attention_impls): "auto" picks one per backend.
ATTENTION_IMPLS = ("auto", "reference", "blockwise", "cudnn", "pallas_tpu")


def _require(cond: bool, field: str, msg: str) -> None:
  if not cond:
    raise ConfigError(f"config field `{field}`: {msg}")


def model_config(cfg: ml_collections.ConfigDict | dict) -> ModelConfig:
  """Validates `cfg.model` (or a plain dict of model fields) and freezes it."""
  m = cfg.model if hasattr(cfg, "model") else cfg
  m = m.to_dict() if hasattr(m, "to_dict") else dict(m)
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(m) - known)
  _require(not unknown, f"model.{unknown[0] if unknown else ''}", "unknown field")
  for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
               "mlp_dim", "memory_tokens_per_head", "reference_length", "chunk_length",
               "memories_per_chunk", "max_seq_len"):
    _require(name in m and isinstance(m[name], int) and m[name] > 0, f"model.{name}",
             f"must be a positive integer, got {m.get(name)!r}")
  _require(m["n_heads"] % m["n_kv_heads"] == 0, "model.n_heads",
           f"{m['n_heads']} query heads are not divisible by n_kv_heads={m['n_kv_heads']}")
  L = m["n_layers"]
  layers = m.get("memory_layers")
  layers = list(range(L // 2)) if layers is None else list(layers)
  for l in layers:
    _require(isinstance(l, int) and 0 <= l < L, "model.memory_layers",
             f"layer index {l!r} out of range [0, {L})")
  _require(len(set(layers)) == len(layers), "model.memory_layers", "duplicate layer index")
  m["memory_layers"] = tuple(sorted(layers))
  heads = m.get("memory_heads")
  heads = list(range(m["n_kv_heads"])) if heads is None else list(heads)
  for h in heads:
    _require(isinstance(h, int) and 0 <= h < m["n_kv_heads"], "model.memory_heads",
             f"KV head index {h!r} out of range [0, {m['n_kv_heads']})")
  _require(len(set(heads)) == len(heads), "model.memory_heads", "duplicate head index")
  m["memory_heads"] = tuple(sorted(heads))
  _require(m["memory_tokens_per_head"] <= m["reference_length"], "model.memory_tokens_per_head",
           f"cannot keep {m['memory_tokens_per_head']} of {m['reference_length']} tokens")
  _require(m["max_seq_len"] % m["chunk_length"] == 0, "model.max_seq_len",
           f"{m['max_seq_len']} is not a multiple of chunk_length={m['chunk_length']}")
  _require(m.get("dtype", "float32") in DTYPE_NAMES, "model.dtype", f"one of {DTYPE_NAMES}")
  _require(m.get("param_dtype", "float32") in DTYPE_NAMES, "model.param_dtype",
           f"one of {DTYPE_NAMES}")
  _require(m.get("remat_policy", "none") in _REMAT, "model.remat_policy", f"one of {_REMAT}")
  _require(m.get("attention_impl", "auto") in ATTENTION_IMPLS, "model.attention_impl",
           f"one of {ATTENTION_IMPLS}, got {m.get('attention_impl')!r}")
  for name in ("attention_block_q", "attention_block_kv"):
    _require(isinstance(m.get(name, 512), int) and m.get(name, 512) > 0, f"model.{name}",
             f"must be a positive integer, got {m.get(name)!r}")
  prefix = tuple(int(t) for t in m.get("reference_prefix_ids", ()))
  _require(len(prefix) > 0, "model.reference_prefix_ids", "must name at least one token")
  for name, ids in (("reference_prefix_ids", prefix),
                    ("bos_id", (m.get("bos_id", 2),)), ("pad_id", (m.get("pad_id", 0),))):
    for t in ids:
      _require(0 <= t < m["vocab_size"], f"model.{name}",
               f"token id {t} out of range [0, {m['vocab_size']})")
  m["reference_prefix_ids"] = prefix
  return ModelConfig(**m)


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every section; returns cfg unchanged so calls can be chained."""
  model_config(cfg)
  if "mesh" in cfg:
    for ax in ("data", "fsdp", "tensor"):
      v = cfg.mesh[ax]
      _require(isinstance(v, int) and (v == -1 or v > 0), f"mesh.{ax}",
               f"must be -1 (fill) or a positive integer, got {v!r}")
    n_fill = sum(cfg.mesh[ax] == -1 for ax in ("data", "fsdp", "tensor"))
    _require(n_fill <= 1, "mesh", "at most one axis may be -1")
  if "train" in cfg:
    t = cfg.train
    _require(t.stage in TRAIN_STAGES, "train.stage",
             f"must be one of {', '.join(TRAIN_STAGES)}, got {t.stage!r}")
    _require(t.schedule in ("wsd", "cosine", "constant"), "train.schedule",
             f"must be wsd, cosine or constant, got {t.schedule!r}")
    _require(t.steps > 0, "train.steps", "must be positive")
    reader = t.get("reader", "memory")
    _require(reader in ("memory", "rag"), "train.reader", f"must be memory or rag, got {reader!r}")
    _require(reader == "memory" or t.stage == "continual", "train.reader",
             f"'rag' trains the continual stage's text-RAG reader; train.stage is {t.stage!r}")
    _require(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    _require(0.0 <= t.decay_fraction <= 1.0, "train.decay_fraction", "must be in [0, 1]")
  if "data" in cfg:
    d = cfg.data
    _require(d.batch_size > 0, "data.batch_size", "must be positive")
    if "train" in cfg:
      _require(d.batch_size % cfg.train.grad_accum == 0, "data.batch_size",
               f"{d.batch_size} not divisible by train.grad_accum={cfg.train.grad_accum}")
    _require(d.corpus in ("knowledge_world", "files", "tfds", "hf"), "data.corpus",
             f"must be knowledge_world, files, tfds or hf, got {d.corpus!r}")
  return cfg


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `configs/NAME.py` (its `get_config()`), applies `a.b=v` overrides, validates."""
  if not os.path.exists(path):
    raise ConfigError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location(f"_m3jax_cfg_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  assert spec.loader is not None
  spec.loader.exec_module(module)
  cfg = module.get_config()
  for item in overrides:
    key, _, raw = item.partition("=")
    key = key.removeprefix("--config.").removeprefix("config.")
    apply_override(cfg, key, raw)
  return validate(cfg)


def apply_override(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """Sets `cfg.<key>` from its string form, parsed like absl's config flags."""
  parts = key.split(".")
  node = cfg
  for i, p in enumerate(parts[:-1]):
    if p not in node:
      raise ConfigError(f"config field `{'.'.join(parts[:i + 1])}`: unknown field")
    node = node[p]
  leaf = parts[-1]
  if leaf not in node:
    raise ConfigError(f"config field `{key}`: unknown field")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  if isinstance(value, list):
    value = tuple(value)  # sequence fields are tuples (absl config_flags can override those)
  old = node[leaf]
  if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config field `{key}`: {e}") from e


def save_config(cfg: ml_collections.ConfigDict, path: str) -> None:
  """Writes the resolved config as JSON (what a run actually used)."""
  atomic_io.write_bytes(path, cfg.to_json_best_effort(indent=2, sort_keys=True).encode())


def config_from_json(path: str) -> ml_collections.ConfigDict:
  """Reads a config written by `save_config` (e.g. beside a checkpoint)."""
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
