"""The verdict on a compiled step (fits or not, by how much, which knobs help) and its report.

Pure functions of a `StepPlan`, so the reasoning is tested without a compiler.

- Memory per chip: arguments + outputs - donated + temporaries + code, the compiler's
  figures (`m3jax.core.xla_stats`), against the chip's memory from the device table. A
  step the TPU compiler refused carries the compiler's own "used X of Y" instead.
- MFU ceiling: the cost model's FLOPs of a step over the compiler's FLOPs of the same
  step. A chip that ran every compiled FLOP at its peak would reach exactly this MFU;
  what the compiler adds (rematerialisation, attention over padding) lowers it.
- Step-time lower bound: compiled FLOPs per chip over the chip's peak FLOP/s.
"""

from __future__ import annotations

import dataclasses

from m3jax.core.xla_stats import gib
from m3jax.planning.aot import StepPlan

# Least to most recomputation: each policy keeps fewer activations for the backward pass.
REMAT_ORDER = ("none", "dots_saveable", "dots_with_no_batch_dims", "full")

# Below this share of free memory a fitting step is flagged as tight (fragmentation,
# runtime buffers and the data pipeline live there too).
TIGHT_HEADROOM = 0.05
# Above this share of free memory a fitting step can afford less recomputation.
ROOMY_HEADROOM = 0.40
# Below this share of a chip's memory, arguments (parameters, optimizer state, batch) are
# not worth sharding further.
ARGUMENTS_WORTH_SHARDING = 0.25


@dataclasses.dataclass(frozen=True)
class Verdict:
  """fits is None when neither the compiler nor a memory figure could say."""
  fits: bool | None
  used: int | None  # bytes per chip
  capacity: int | None  # bytes per chip
  knobs: tuple[str, ...]  # settings that would help, most effective first

  @property
  def margin(self) -> int | None:
    """Free bytes per chip (negative: the excess)."""
    if self.used is None or self.capacity is None:
      return None
    return self.capacity - self.used


def _stronger_remat(policy: str) -> tuple[str, ...]:
  if policy not in REMAT_ORDER:
    return ()
  return REMAT_ORDER[REMAT_ORDER.index(policy) + 1:]


def shrink_knobs(plan: StepPlan) -> tuple[str, ...]:
  """Settings that lower per-chip memory, the part they shrink named, most effective first."""
  knobs = []
  mem = plan.memory
  temp_heavy = mem is None or mem.temp >= mem.arguments
  stronger = _stronger_remat(plan.remat_policy)
  remat = (f"model.remat_policy={' or '.join(stronger)} (now {plan.remat_policy}): keeps fewer "
           "activations for the backward pass; temp shrinks, compute grows") if stronger else None
  if plan.per_chip_batch > 1:
    b = plan.per_chip_batch
    half = f"{b / 2:g}"
    batch = (f"per-chip batch {b:g} -> {half}: train.grad_accum={plan.grad_accum * 2} (same "
             f"global batch) or data.batch_size={plan.batch_size // 2}; activation temp "
             "about halves")
  else:
    batch = None
  shard_ways = plan.mesh.get("fsdp", 1) * plan.mesh.get("tensor", 1)
  if mem is not None and mem.arguments < ARGUMENTS_WORTH_SHARDING * mem.total:
    fsdp = None  # the state is a small part: sharding it further would not help
  elif shard_ways < plan.n_chips:
    full_fsdp = plan.n_chips // plan.mesh.get("tensor", 1)
    estimate = (f" (arguments {gib(mem.arguments)} -> about "
                f"{gib(mem.arguments * shard_ways / plan.n_chips)})" if mem else "")
    fsdp = (f"mesh.fsdp={full_fsdp} mesh.data=1 (now fsdp {plan.mesh.get('fsdp', 1)}): shards "
            f"parameters and optimizer state over all {plan.n_chips} chips{estimate}")
  else:
    fsdp = (f"a larger slice: parameters and optimizer state are already sharded over all "
            f"{plan.n_chips} chips")
  attention = ("model.attention_impl=blockwise: attention temp grows linearly with the "
               "sequence length" if plan.attention_impl == "reference" else None)
  order = ([remat, batch, attention, fsdp] if temp_heavy else [fsdp, remat, batch, attention])
  knobs = [k for k in order if k]
  knobs.append(f"a shorter sequence (--seq_len, now {plan.seq_len})")
  return tuple(knobs)


def verdict(plan: StepPlan) -> Verdict:
  """Whether the step fits a chip, by how much, and what would help."""
  if plan.out_of_memory is not None:
    oom = plan.out_of_memory
    return Verdict(False, oom.used, oom.limit or plan.hbm_bytes, shrink_knobs(plan))
  if plan.memory is None:
    return Verdict(None, None, plan.hbm_bytes, ())
  used, cap = plan.memory.total, plan.hbm_bytes
  if cap is None:
    return Verdict(None, used, None, ())
  if used > cap:
    return Verdict(False, used, cap, shrink_knobs(plan))
  knobs = []
  free = (cap - used) / cap
  if free < TIGHT_HEADROOM:
    knobs = list(shrink_knobs(plan))
  elif free > ROOMY_HEADROOM and plan.remat_policy != "none":
    lighter = REMAT_ORDER[:REMAT_ORDER.index(plan.remat_policy)] if (
        plan.remat_policy in REMAT_ORDER) else ()
    if lighter:
      knobs.append(f"room to spare: model.remat_policy={lighter[-1]} recomputes less (higher "
                   f"MFU ceiling), or a larger per-chip batch; compile again to check")
  return Verdict(True, used, cap, tuple(knobs))


def mfu_ceiling(plan: StepPlan) -> float | None:
  """Model FLOPs over compiled FLOPs: the MFU of a chip running every compiled FLOP at peak."""
  if not plan.compiled_flops:
    return None
  return plan.model_flops / plan.compiled_flops


def step_time_bound(plan: StepPlan) -> float | None:
  """Seconds per step if each chip ran its compiled FLOPs at peak."""
  if not plan.compiled_flops or not plan.peak_flops:
    return None
  return plan.compiled_flops / plan.peak_flops


def format_plan(plan: StepPlan) -> str:
  """The report `m3jax compile` prints."""
  v = verdict(plan)
  mesh = " ".join(f"{k}={n}" for k, n in plan.mesh.items())
  attn = f", attention {plan.attention_impl}" if plan.attention_impl else ""
  lines = [
      f"{plan.config_name or 'config'}: {plan.stage} step on {plan.target} "
      f"({plan.n_chips} x {plan.device_kind}), mesh {mesh}",
      f"  batch {plan.batch_size} x {plan.seq_len} tokens ({plan.per_chip_batch:g} sequence(s) "
      f"per chip per micro-batch, grad_accum {plan.grad_accum}), remat {plan.remat_policy}, "
      f"compute {plan.dtype}{attn}; compiled in {plan.compile_s:.0f} s",
  ]
  cap = f" of {gib(v.capacity)}" if v.capacity else ""
  if plan.memory is not None:
    m = plan.memory
    lines += ["per-chip memory (compiler):",
              f"  temp       {gib(m.temp):>11}",
              f"  arguments  {gib(m.arguments):>11}",
              f"  outputs    {gib(m.outputs):>11}  ({gib(m.aliased)} of them in donated "
              "arguments)",
              f"  total      {gib(m.total):>11}{cap}" +
              (f" ({m.total / v.capacity:.0%})" if v.capacity else "")]
  elif plan.out_of_memory is not None:
    oom = plan.out_of_memory
    lines += ["per-chip memory: the compiler ran out of memory: " + oom.message]
  ceiling, bound = mfu_ceiling(plan), step_time_bound(plan)
  if plan.compiled_flops:
    lines.append(f"FLOPs per chip per step: {plan.compiled_flops:.3e} compiled, "
                 f"{plan.model_flops:.3e} model -> MFU ceiling {ceiling:.0%}" +
                 (" (accumulation loop counted grad_accum times)" if plan.grad_accum > 1 else "") +
                 (" (over 100%: XLA counts a loop body once, e.g. blockwise attention's, so the "
                  "compiled count is short)" if ceiling > 1 else ""))
  else:
    lines.append(f"FLOPs per chip per step: {plan.model_flops:.3e} model (no compiled count)")
  if bound:
    lines.append(f"step time >= {bound:.3g} s at {plan.peak_flops:.3g} FLOP/s per chip "
                 f"(<= {plan.tokens_per_chip / bound:,.0f} tokens/s per chip)")
  if v.fits is None:
    lines.append(f"verdict: unknown ({plan.device_kind} has no memory size in the device table)"
                 if plan.memory is not None else
                 "verdict: unknown (the compiler reported no memory figures)")
  elif v.fits:
    lines.append(f"verdict: FITS, {gib(v.margin)} ({v.margin / v.capacity:.0%}) free per chip")
  else:
    over = f" by {gib(-v.margin)}" if v.margin is not None else ""
    need = f" (needs {gib(v.used)}{cap})" if v.used is not None else ""
    lines.append(f"verdict: DOES NOT FIT{over}{need}")
  if v.knobs:
    lines.append("knobs that would help:" if not v.fits or (v.margin or 0) <
                 TIGHT_HEADROOM * (v.capacity or 1) else "knobs:")
    lines += [f"  - {k}" for k in v.knobs]
  return "\n".join(lines)
