"""Peak FLOP/s and memory per device, for MFU and for planning runs.

Accelerators come from a table of vendor dense bf16 peaks (no sparsity). A CPU
has no meaningful datasheet number, so its peak is *measured* once per process
with a large float32 matmul; MFU on CPU then reads "share of the best matmul
throughput this machine showed", which is what a CPU run can honestly report.
`train.peak_flops_per_device` (> 0) overrides both.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from m3jax.core.errors import InputError

# device_kind substring (lower case) -> dense bf16 FLOP/s per device (chip / GPU).
PEAK_BF16_FLOPS = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("l4", 121e12),
    ("tpu v6", 918e12),
    ("tpu v5p", 459e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
    ("tpu v3", 123e12),
)


# device_kind substring (lower case) -> memory per device (chip / GPU) in bytes, as the
# vendors state it (TPU: Google Cloud TPU docs per chip; GPU: NVIDIA datasheets).
HBM_BYTES = (
    ("h200", 141 * 10**9),
    ("h100", 80 * 2**30),
    ("tpu v6 lite", 32 * 2**30),
    ("tpu v5 lite", 16 * 2**30),
    ("tpu v5e", 16 * 2**30),
    ("tpu v5", 95 * 2**30),
    ("tpu v4", 32 * 2**30),
)


_SQUARE = jax.jit(lambda x: x @ x)


def matmul_flops_now(n: int = 1024, repeats: int = 3) -> float:
  """Best float32 n x n matmul FLOP/s of the default device over `repeats` tries, now.

  Uncached: on a machine shared with other jobs the throughput it offers moves, and
  a benchmark can probe it beside each timed step (m3jax.bench.train).
  """
  a = jnp.ones((n, n), jnp.float32)
  _SQUARE(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    _SQUARE(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
  """Best float32 matmul FLOP/s of the default device (used for CPUs), once per process."""
  return matmul_flops_now(n, repeats)


def peak_flops_per_device(override: float = 0.0, device: jax.Device | None = None
                          ) -> tuple[float, str]:
  """(peak FLOP/s, where it came from) for `device` (default: the first)."""
  if override and override > 0:
    return float(override), "train.peak_flops_per_device"
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  for name, flops in PEAK_BF16_FLOPS:
    if name in kind:
      return flops, f"table ({device.device_kind}, dense bf16)"
  if device.platform == "cpu":
    return measured_matmul_flops(), "measured f32 matmul on this CPU"
  raise InputError(f"no peak FLOP/s known for device kind {device.device_kind!r}; set "
                   "config field `train.peak_flops_per_device`")


def hbm_bytes_per_device(device: jax.Device) -> int | None:
  """Accelerator memory of one device from the table, or None when unknown (e.g. a CPU)."""
  kind = device.device_kind.lower()
  return next((n for name, n in HBM_BYTES if name in kind), None)
