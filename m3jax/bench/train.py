"""`m3jax bench train`: throughput and MFU of the warmup and the continual step.

Both steps run on the same config, mesh and batch in one process (random
parameters, random tokens and references: speed does not depend on values), so
their ratio is the cost of explicit memory in training. The paper reports a
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
from m3jax.core import hardware
from m3jax.training import loop as train_lib
from m3jax.model import sharding as sharding_lib


def synthetic_batch(cfg: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
  """A full batch of random tokens, with one full-length reference per chunk."""
  m = cfg.model
  rng = np.random.default_rng(seed)
  b, t = cfg.data.batch_size, m.max_seq_len
  c, r = t // m.chunk_length, m.reference_length
  return {
      "tokens": rng.integers(5, m.vocab_size, (b, t), dtype=np.int32),
      "targets": rng.integers(5, m.vocab_size, (b, t), dtype=np.int32),
      "loss_mask": np.ones((b, t), np.float32),
      "ref_tokens": rng.integers(5, m.vocab_size, (b, c, r), dtype=np.int32),
      "ref_lengths": np.full((b, c), r, np.int32),
  }


def _time_steps(step, state, batch, steps: int) -> tuple[list[float], Any]:
  state, m = step(state, batch)  # compile + warm up
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t0)
  return times, state


def run(cfg: ml_collections.ConfigDict, *, steps: int = 5) -> dict[str, Any]:
  """Times `steps` steps of each stage; returns figures per stage and their ratio."""
  peak, peak_src = hardware.peak_flops_per_device(float(cfg.train.peak_flops_per_device))
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
      times, state = _time_steps(train_fn, state, batch, steps)
    dt = statistics.median(times)
    flops = costs.train_flops_per_token(ctx.model_config, use_memory=ctx.use_memory,
                                        grad_through_references=bool(c.train.grad_through_references))
    out[stage] = {"step_time_s": dt, "tokens_per_s": tokens / dt,
                  "model_flops_per_token": flops,
                  "mfu": tokens / dt * flops / (peak * n_dev)}
    del state
  out["continual_over_warmup_step_time"] = (out["continual"]["step_time_s"] /
                                            out["warmup"]["step_time_s"])
  out["flops_ratio"] = (out["continual"]["model_flops_per_token"] /
                        out["warmup"]["model_flops_per_token"])
  return out


def format_result(r: dict[str, Any]) -> str:
  lines = [f"device: {r['device']} x{r['devices']}  peak {r['peak_flops_per_device']:.3g} "
           f"FLOP/s/device ({r['peak_source']})  tokens/step {r['tokens_per_step']}",
           f"{'stage':<10} {'step s':>9} {'tokens/s':>10} {'MFU':>7} {'FLOPs/token':>12}"]
  for stage in ("warmup", "continual"):
    s = r[stage]
    lines.append(f"{stage:<10} {s['step_time_s']:>9.4f} {s['tokens_per_s']:>10.0f} "
                 f"{s['mfu']:>7.1%} {s['model_flops_per_token']:>12.3e}")
  lines.append(f"continual / warmup step time: {r['continual_over_warmup_step_time']:.2f}x "
               f"(model FLOPs ratio {r['flops_ratio']:.2f}x; paper: a bit more than 2x)")
  return "\n".join(lines)
