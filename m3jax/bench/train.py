"""`m3jax bench train`: throughput, MFU and compiled memory of the warmup and the continual step.

Both steps run on the same config, mesh and batch in one process (random
parameters, random tokens and references: speed does not depend on values), so
their ratio is the cost of explicit memory in training. MFU is the median over
the timed steps of each step's model FLOP/s over the peak; on a CPU the peak is
a float32 matmul probed right after each step (m3jax.core.hardware), so that
load from other jobs on a shared machine slows both sides of the ratio alike. The paper reports a
continual step costing a bit more than 2x a warmup step (paper §5.3; docs/model.md
"Training stages").
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from m3jax.model import costs
from m3jax.core import config as config_lib
from m3jax.core import hardware
from m3jax.core import xla_stats
from m3jax.core.xla_stats import GIB
from m3jax.training import loop as train_lib
from m3jax.training import step as step_lib
from m3jax.model import sharding as sharding_lib


def synthetic_batch(cfg: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
  """A full batch of random tokens, with one full-length reference per chunk."""
  m = cfg.model
  rng = np.random.default_rng(seed)
  shapes = step_lib.batch_shapes(config_lib.model_config(cfg), cfg.data.batch_size,
                                 use_memory=True)
  batch = {k: rng.integers(5, m.vocab_size, shapes[k].shape, dtype=np.int32)
           for k in ("tokens", "targets", "ref_tokens")}
  batch["loss_mask"] = np.ones(shapes["loss_mask"].shape, np.float32)
  batch["ref_lengths"] = np.full(shapes["ref_lengths"].shape, m.reference_length, np.int32)
  return batch


def _time_steps(step, state, batch, steps: int, probe=None
                ) -> tuple[list[float], list[float], Any]:
  """Step times, and the probe's figure right after each step (peak FLOP/s) if given."""
  state, m = step(state, batch)  # compile + warm up
  jax.block_until_ready(m)
  times, peaks = [], []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t0)
    if probe is not None:
      peaks.append(probe())
  return times, peaks, state


def run(cfg: ml_collections.ConfigDict, *, steps: int = 5) -> dict[str, Any]:
  """Times `steps` steps of each stage; returns figures per stage and their ratio."""
  peak, peak_src = hardware.peak_flops_per_device(float(cfg.train.peak_flops_per_device))
  # A measured (CPU) peak is probed again after every timed step: other jobs on the
  # machine slow the step and the matmul alike, and MFU is the share of what the
  # machine offered at that moment. Table peaks (accelerators) stay fixed.
  probe = peak_src.startswith("measured")
  n_dev = jax.device_count()
  tokens = cfg.data.batch_size * cfg.model.max_seq_len
  host_batch = synthetic_batch(cfg)
  out: dict[str, Any] = {"device": jax.devices()[0].device_kind, "devices": n_dev,
                         "peak_flops_per_device": peak, "peak_source": peak_src,
                         "tokens_per_step": tokens}
  for stage in ("warmup", "continual"):
    c = cfg.copy_and_resolve_references()
    c.train.stage = stage
    c.train.use_memory = stage == "continual"
    ctx = train_lib.build_context(c)
    state = train_lib.init_state(ctx, jax.random.key(0))
    train_fn, _, _ = train_lib.compile_steps(ctx)
    keys = ["tokens", "targets", "loss_mask"] + (["ref_tokens", "ref_lengths"]
                                                 if ctx.use_memory else [])
    batch = {k: jax.device_put(jnp.asarray(host_batch[k]), ctx.batch_sharding) for k in keys}
    with sharding_lib.use_mesh(ctx.mesh, ctx.rules):
      compiled = train_fn.lower(state, batch).compile()
      times, peaks, state = _time_steps(compiled, state, batch, steps,
                                        probe=hardware.matmul_flops_now if probe else None)
    dt = statistics.median(times)
    memory = xla_stats.memory_figures(compiled)
    flops = costs.train_flops_per_token(ctx.model_config, use_memory=ctx.use_memory,
                                        grad_through_references=bool(c.train.grad_through_references))
    # Per step: achieved FLOP/s over the peak (probed right after it on a shared CPU).
    mfus = [tokens / t * flops / (p * n_dev)
            for t, p in zip(times, peaks if probe else [peak] * len(times))]
    out[stage] = {"step_time_s": dt, "tokens_per_s": tokens / dt,
                  "model_flops_per_token": flops, "mfu": statistics.median(mfus),
                  "mfu_per_step": mfus,
                  "memory_per_device": memory.as_dict() if memory else None}
    if probe:
      out[stage]["probed_peak_median"] = statistics.median(peaks)
    del state
  out["continual_over_warmup_step_time"] = (out["continual"]["step_time_s"] /
                                            out["warmup"]["step_time_s"])
  out["flops_ratio"] = (out["continual"]["model_flops_per_token"] /
                        out["warmup"]["model_flops_per_token"])
  return out


def format_result(r: dict[str, Any]) -> str:
  lines = [f"device: {r['device']} x{r['devices']}  peak {r['peak_flops_per_device']:.3g} "
           f"FLOP/s/device ({r['peak_source']})  tokens/step {r['tokens_per_step']}",
           f"{'stage':<10} {'step s':>9} {'tokens/s':>10} {'MFU':>7} {'FLOPs/token':>12} "
           f"{'temp GiB':>9} {'args GiB':>9} {'out GiB':>8}"]
  for stage in ("warmup", "continual"):
    s = r[stage]
    mem = s.get("memory_per_device")
    figures = (f" {mem['temp'] / GIB:>9.3f} {mem['arguments'] / GIB:>9.3f} "
               f"{mem['outputs'] / GIB:>8.3f}" if mem else f" {'n/a':>9} {'n/a':>9} {'n/a':>8}")
    lines.append(f"{stage:<10} {s['step_time_s']:>9.4f} {s['tokens_per_s']:>10.0f} "
                 f"{s['mfu']:>7.1%} {s['model_flops_per_token']:>12.3e}{figures}")
  for stage in ("warmup", "continual"):
    s = r[stage]
    if "probed_peak_median" in s:
      lines.append(f"{stage}: MFU = median of per-step MFU, the peak probed after each step "
                   f"(median {s['probed_peak_median']:.3g} FLOP/s)")
  lines.append("memory: per device, from the compiler's analysis of the step (XLA:CPU's temp "
               "is no guide to an accelerator's; `m3jax compile` plans a TPU)"
               if r["device"] == "cpu" else "memory: per device, from the compiler's analysis "
               "of the step")
  lines.append(f"continual / warmup step time: {r['continual_over_warmup_step_time']:.2f}x "
               f"(model FLOPs ratio {r['flops_ratio']:.2f}x; paper: a bit more than 2x)")
  return "\n".join(lines)
