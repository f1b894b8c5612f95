"""The reference encoder: references -> their sparse memories, on this process's devices.

The one place references become memories (docs/model.md, paper §3.3):
  `encode_references`   the model call (shared by every encoder below)
  `ReferenceEncoder`    jitted, device-parallel, fixed batch size: what the encode job
                        (m3jax.memory.encode_job), the cold-start bank
                        (m3jax.memory.cold_start), PQ training and coverage use
  `batch_records`       one fixed encode batch -> bank records (padding rows empty)
  `encode_ids`          any ids, in padded batches -> host arrays
`m3jax.memory.source.EncodeOnTheFly` calls `encode_references` with its own
power-of-two buckets.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m3jax.core.config import ConfigError, ModelConfig
from m3jax.memory import bank_format
from m3jax.memory import codecs
from m3jax.model import sharding as sharding_lib
from m3jax.model.transformer import Transformer

# Used when no config rules are given: batch over (data, fsdp), the rest replicated
# except heads over `tensor` (a no-op for tensor = 1).
DEFAULT_RULES = (("batch", ("data", "fsdp")), ("heads", "tensor"), ("kv_heads", "tensor"),
                 ("mlp", "tensor"), ("vocab", "tensor"))


def encode_references(model: Any, params: Any, tokens: Any, lengths: Any, *,
                      round_to_bfloat16: bool = True) -> tuple[jax.Array, jax.Array]:
  """(memories [B, L_mem, 2, H_mem, k, d_h], kept positions [B, L_mem, H_mem, k]).

  Traceable (call inside jit). `round_to_bfloat16` gives what a bank stores.
  """
  mem, pos = model.apply({"params": params}, tokens, lengths, method="encode_references")
  if round_to_bfloat16:
    mem = mem.astype(jnp.bfloat16)
  return mem, pos


def encoder_mesh(cfg: Any = None, devices: Sequence[jax.Device] | None = None
                 ) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over this process's devices: tensor from cfg.mesh, data = rest.

  Encoding is data-parallel per host, so the mesh never spans hosts;
  cfg.mesh.tensor > 1 splits each replica of a large model over that many devices.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  tensor = 1
  if cfg is not None and "mesh" in cfg and cfg.mesh.get("tensor", 1) not in (-1, None):
    tensor = int(cfg.mesh.tensor)
  if len(devices) % tensor:
    raise ConfigError(f"config field `mesh.tensor`: {tensor} does not divide the "
                      f"{len(devices)} local devices of this process")
  return sharding_lib.make_mesh(None, devices, shape=(len(devices) // tensor, 1, tensor))


class ReferenceEncoder:
  """Jitted, device-parallel `encode_references` on fixed-size batches.

  Call with tokens [B, R] int32 and lengths [B]; returns (memories [B, L_mem, 2,
  H_mem, k, d_h] bfloat16, positions [B, L_mem, H_mem, k] int32) as device arrays
  (dispatch is asynchronous, so the next batch can be prepared meanwhile).
  """

  def __init__(self, config: ModelConfig, params: Any, batch_size: int, *,
               mesh: jax.sharding.Mesh | None = None, rules: Any = None):
    if config.n_memory_layers == 0:
      raise ConfigError("config field `model.memory_layers`: empty, nothing to encode")
    self.config = config
    self.batch_size = int(batch_size)
    self.mesh = encoder_mesh() if mesh is None else mesh
    self.rules = tuple(DEFAULT_RULES if rules is None else rules)
    batch_axes = nn.logical_to_mesh_axes(("batch",), self.rules)[0]
    names = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    self.data_parallel = int(np.prod([self.mesh.shape[a] for a in names], dtype=np.int64))
    if self.batch_size % self.data_parallel:
      raise ConfigError(f"config field `bank.encode_batch_size`: {self.batch_size} is not a "
                        f"multiple of the {self.data_parallel} data-parallel devices")
    with sharding_lib.use_mesh(self.mesh, self.rules):
      p_shard = sharding_lib.param_shardings(config, self.mesh, self.rules)
      self.params = jax.device_put(params, p_shard)
    sh = lambda *axes: sharding_lib.logical_sharding(self.mesh, self.rules, axes)
    self._tok_sharding = sh("batch", "length")
    self._len_sharding = sh("batch")
    model = Transformer(config)
    self._fn = jax.jit(lambda p, t, l: encode_references(model, p, t, l),
                       in_shardings=(p_shard, self._tok_sharding, self._len_sharding),
                       out_shardings=(sh("batch", None, None, None, None, None),
                                      sh("batch", None, None, None)))

  def __call__(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[jax.Array, jax.Array]:
    tokens = np.asarray(tokens, np.int32)
    lengths = np.asarray(lengths, np.int32)
    if tokens.shape[0] != self.batch_size:
      raise ValueError(f"ReferenceEncoder: batch of {tokens.shape[0]} references, built for "
                       f"{self.batch_size} (pad with length-0 rows)")
    with sharding_lib.use_mesh(self.mesh, self.rules):
      return self._fn(self.params, jax.device_put(tokens, self._tok_sharding),
                      jax.device_put(lengths, self._len_sharding))


# ------------------------------------------------------------------ batches -> records


def batch_inputs(references: Any, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [B, R], lengths [B]) of a batch of ids; id -1 rows get length 0."""
  tokens, lengths = references.tokens_by_ids(ids)
  return tokens, np.where(ids >= 0, lengths, 0)


def batch_records(codec: codecs.MemoryCodec, config: ModelConfig, ids: np.ndarray,
                  outputs: tuple[Any, Any]) -> np.ndarray:
  """Bank records [B] of one encoded batch; rows of id -1 become empty records."""
  records = bank_format.make_records(codec, config, *outputs)
  pad = ids < 0
  if pad.any():
    records[pad] = bank_format.empty_records(codec, config, int(pad.sum()))
  return records


def encode_batch_records(encoder: ReferenceEncoder, references: Any,
                         codec: codecs.MemoryCodec, ids: np.ndarray
                         ) -> tuple[np.ndarray, int]:
  """Records [B] of one fixed batch (ids -1 = padding); returns (records, real tokens)."""
  if (ids < 0).all():
    return bank_format.empty_records(codec, encoder.config, len(ids)), 0
  tokens, lengths = batch_inputs(references, ids)
  records = batch_records(codec, encoder.config, ids, encoder(tokens, lengths))
  return records, int(lengths.sum())


def encode_ids(encoder: ReferenceEncoder, references: Any, ids: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
  """(memories [n, ...] float32 of bfloat16 values, kept positions [n, L_mem, H_mem, k])
  of references `ids`, encoded in padded batches."""
  b = encoder.batch_size
  mems, poss = [], []
  for lo in range(0, len(ids), b):
    chunk = np.full(b, -1, np.int64)
    part = ids[lo:lo + b]
    chunk[:len(part)] = part
    mem, pos = jax.device_get(encoder(*batch_inputs(references, chunk)))
    mems.append(np.asarray(mem, np.float32)[:len(part)])
    poss.append(np.asarray(pos)[:len(part)])
  return np.concatenate(mems), np.concatenate(poss)


def sample_memories(encoder: ReferenceEncoder, references: Any, ids: np.ndarray
                    ) -> np.ndarray:
  """bfloat16-rounded memories [n, ...] (float32) of `ids`, encoded in padded batches."""
  return encode_ids(encoder, references, ids)[0]
