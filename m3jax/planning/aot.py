"""Ahead-of-time compile of a stage's train step for a set of devices, and what it costs.

The step is the one training runs (`m3jax.training.loop`: same mesh from the config,
same shardings, same jitted `train_step` with its donated state), lowered on abstract
arguments (`ShapeDtypeStruct`s carrying shardings) and compiled by the devices'
compiler, so nothing is allocated. With TPU topology devices (`planning.topology`) that
is the real TPU compiler: its per-chip memory is what the slice would need, and a step
that does not fit fails to compile with the compiler's own "Used X of Y hbm" figures,
which are kept here as the verdict's evidence.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Sequence

import jax
import ml_collections

from m3jax.core import config as config_lib
from m3jax.core import hardware
from m3jax.core import xla_stats
from m3jax.model import attention_impls
from m3jax.model import costs
from m3jax.model import sharding as sharding_lib
from m3jax.training import loop
from m3jax.training import step as step_lib

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_OOM = re.compile(r"Used ([\d.]+)([KMGT]?)B? of ([\d.]+)([KMGT]?)B? hbm", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class OutOfMemory:
  """The compiler refused the step for lack of device memory."""
  used: int | None  # bytes the program needs per device, as the compiler states them
  limit: int | None  # bytes the compiler may use per device
  message: str  # the compiler's line that says so


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """One stage's train step compiled for a target, with per-chip memory and FLOPs."""
  config_name: str
  stage: str
  target: str  # e.g. "v5e:2x2" or "local cpu"
  device_kind: str
  n_chips: int
  mesh: dict[str, int]
  batch_size: int  # global sequences per step
  seq_len: int
  grad_accum: int
  per_chip_batch: float  # sequences per chip per micro-batch
  remat_policy: str
  dtype: str
  attention_impl: str  # the attention implementation compiled (model.attention_impl resolved)
  hbm_bytes: int | None  # memory per chip from the device table
  peak_flops: float | None  # dense bf16 FLOP/s per chip from the device table
  model_flops: float  # per chip per step, from the cost model (m3jax.model.costs)
  compiled_flops: float | None  # per chip per step, from the compiler's cost analysis
  memory: xla_stats.MemoryFigures | None  # None when the step did not compile
  out_of_memory: OutOfMemory | None
  compile_s: float

  @property
  def tokens_per_chip(self) -> float:
    return self.batch_size * self.seq_len / self.n_chips


def parse_out_of_memory(message: str) -> OutOfMemory | None:
  """The compiler's out-of-memory figures from its error text (None: not an OOM error)."""
  if "out of memory" not in message.lower() and "resource_exhausted" not in message.lower():
    return None
  line = next((l.strip() for l in message.splitlines() if "memory" in l.lower()),
              message.strip().splitlines()[0] if message.strip() else "")
  m = _OOM.search(message)
  if not m:
    return OutOfMemory(None, None, line)
  used = int(float(m[1]) * _UNITS[m[2].upper()])
  limit = int(float(m[3]) * _UNITS[m[4].upper()])
  return OutOfMemory(used, limit, line)


def stage_config(cfg: ml_collections.ConfigDict, stage: str | None = None,
                 seq_len: int | None = None) -> ml_collections.ConfigDict:
  """A validated copy of cfg for one stage (continual reads memory) and sequence length."""
  c = cfg.copy_and_resolve_references()
  if stage is not None:
    c.train.stage = stage
  if c.train.stage == "continual":
    c.train.use_memory = True
  if seq_len is not None:
    c.model.max_seq_len = int(seq_len)
  return config_lib.validate(c)


def compile_train_step(cfg: ml_collections.ConfigDict,
                       devices: Sequence[jax.Device] | None = None, *,
                       target: str | None = None) -> StepPlan:
  """Compiles cfg's train step (cfg.train.stage) over `devices` (default: the local ones).

  Raises ConfigError when the config's mesh or batch does not fit the devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  ctx = loop.build_context(cfg, devices)
  train_fn, _, _ = loop.compile_steps(ctx)
  state = loop.abstract_state_with_shardings(ctx)
  shapes = step_lib.batch_shapes(ctx.model_config, int(cfg.data.batch_size),
                                 use_memory=ctx.use_memory)
  batch = {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=ctx.batch_sharding)
           for k, s in shapes.items()}
  t0 = time.perf_counter()
  with sharding_lib.use_mesh(ctx.mesh, ctx.rules):
    lowered = train_fn.lower(state, batch)
  compiled, oom = None, None
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    oom = parse_out_of_memory(str(e))
    if oom is None:
      raise
  compile_s = time.perf_counter() - t0

  n = len(devices)
  grad_accum = int(cfg.train.grad_accum)
  mc = ctx.model_config
  tokens_per_chip = cfg.data.batch_size * mc.max_seq_len / n
  model_flops = tokens_per_chip * costs.train_flops_per_token(
      mc, use_memory=ctx.use_memory,
      grad_through_references=bool(cfg.train.grad_through_references))
  compiled_flops = xla_stats.compiled_flops(compiled) if compiled is not None else None
  if compiled_flops is not None and grad_accum > 1:
    # XLA counts a loop body once: the accumulation loop runs it grad_accum times (the
    # optimizer update outside the loop is then over-counted, a negligible share).
    compiled_flops *= grad_accum
  try:
    peak = hardware.peak_flops_per_device(float(cfg.train.peak_flops_per_device),
                                          device=devices[0])[0]
  except ValueError:
    peak = None
  return StepPlan(
      config_name=str(cfg.get("name", "")), stage=str(cfg.train.stage),
      target=target or f"local {devices[0].platform}", device_kind=devices[0].device_kind,
      n_chips=n, mesh=dict(ctx.mesh.shape), batch_size=int(cfg.data.batch_size),
      seq_len=mc.max_seq_len, grad_accum=grad_accum,
      per_chip_batch=cfg.data.batch_size / (loop.batch_shard_count(ctx.mesh, ctx.rules) *
                                            grad_accum),
      remat_policy=mc.remat_policy, dtype=mc.dtype,
      attention_impl=attention_impls.resolve(mc.attention_impl, dtype=mc.dtype),
      hbm_bytes=hardware.hbm_bytes_per_device(devices[0]), peak_flops=peak,
      model_flops=model_flops, compiled_flops=compiled_flops,
      memory=xla_stats.memory_figures(compiled) if compiled is not None else None,
      out_of_memory=oom, compile_s=compile_s)
