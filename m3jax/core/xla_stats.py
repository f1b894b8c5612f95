"""What the XLA compiler reports about a compiled program: per-device memory and FLOPs.

`jax.jit(f).lower(*args).compile()` returns a `Compiled` whose `memory_analysis()`
gives the bytes one device holds while the program runs (its arguments, outputs,
temporaries, and the argument bytes donated to outputs) and whose `cost_analysis()`
counts the FLOPs of the per-device (SPMD-partitioned) program, recomputation
included. Both are read here once, for `m3jax compile` and `m3jax bench train`.

The figures are the compiler's own for its backend: the TPU and GPU compilers plan
accelerator memory; XLA:CPU's temp figure is no guide to an accelerator's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class MemoryFigures:
  """Bytes per device of one compiled program."""
  temp: int
  arguments: int
  outputs: int
  aliased: int  # argument bytes reused for outputs (donated buffers)
  code: int = 0

  @property
  def total(self) -> int:
    """Peak bytes a device holds: inputs, outputs not written in place, temporaries."""
    return self.arguments + self.outputs - self.aliased + self.temp + self.code

  def as_dict(self) -> dict[str, int]:
    return {**dataclasses.asdict(self), "total": self.total}


def memory_figures(compiled: Any) -> MemoryFigures | None:
  """Per-device memory of a `jax.stages.Compiled`, or None where the backend has none."""
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if m is None:
    return None
  return MemoryFigures(temp=int(m.temp_size_in_bytes), arguments=int(m.argument_size_in_bytes),
                       outputs=int(m.output_size_in_bytes), aliased=int(m.alias_size_in_bytes),
                       code=int(m.generated_code_size_in_bytes))


def compiled_flops(compiled: Any) -> float | None:
  """FLOPs of one run of the per-device program (None where the backend has no count)."""
  try:
    cost = compiled.cost_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  flops = float(cost["flops"])
  return flops if flops > 0 else None


def gib(n_bytes: float) -> str:
  """Bytes as GiB with two decimals, e.g. '4.95 GiB'."""
  return f"{n_bytes / GIB:.2f} GiB"
