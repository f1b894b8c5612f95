"""The `m3jax costs` report: every figure of `m3jax.model.costs` for one config, and its table.

The formulas live in `m3jax.model.costs`; this module only gathers them into a
`CostReport` and formats it (binary byte units, paper-style scientific notation),
see docs/model.md (paper §1, §3.3, Appendix A).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from m3jax.core.config import ModelConfig
from m3jax.model.costs import (
    PAPER_REFERENCES,
    QUANTIZED_BYTES_PER_VECTOR,
    ParamCounts,
    Sparsity,
    advantage_interval,
    decode_flops_per_token,
    dense_kv_bytes_per_reference,
    explicit_read_flops,
    explicit_write_flops,
    forward_flops_per_token,
    implicit_write_flops,
    memory_bytes_per_reference,
    param_counts,
    quantized_memory_bytes_per_reference,
    rag_read_flops,
    remark8,
    sparsity,
    total_costs,
    train_flop_terms,
)

# Usage counts n at which the report tabulates the lifetime cost of one reference.
DEFAULT_USES = (0.1, 1, 10, 100, 1000, 10000, 100000)


@dataclasses.dataclass(frozen=True)
class CostReport:
  """Everything `m3jax costs` prints, computed from one config."""

  name: str
  params: ParamCounts
  dense_kv_bytes: int
  memory_bytes: int
  quantized_memory_bytes: int
  sparsity: Sparsity
  references: float
  bank_dense_bytes: float
  bank_sparse_bytes: float
  bank_quantized_bytes: float
  implicit_write: float
  explicit_write: float
  explicit_read: float
  rag_read: float
  interval: tuple[float, float]
  remark8_reads: float
  remark8_total: float
  remark8_fraction: float
  train_warmup: dict[str, float]
  train_continual: dict[str, float]
  train_continual_no_grad: dict[str, float]
  forward_per_token: float
  decode_per_token: float
  decode_per_token_memory: float
  decode_context: int
  uses: tuple[tuple[float, float, float, float], ...]  # (n, implicit, explicit, rag)

  @property
  def continual_warmup_ratio(self) -> float:
    return sum(self.train_continual.values()) / sum(self.train_warmup.values())


def cost_report(m: ModelConfig, *, name: str = "", references: float = PAPER_REFERENCES,
                uses: Sequence[float] = DEFAULT_USES,
                bytes_per_vector: int = QUANTIZED_BYTES_PER_VECTOR) -> CostReport:
  """Computes every figure of the report for model config `m`."""
  dense = dense_kv_bytes_per_reference(m)
  sparse = memory_bytes_per_reference(m)
  quant = quantized_memory_bytes_per_reference(m, bytes_per_vector)
  reads, total, frac = remark8(m)
  ctx = m.max_seq_len
  return CostReport(
      name=name,
      params=param_counts(m),
      dense_kv_bytes=dense,
      memory_bytes=sparse,
      quantized_memory_bytes=quant,
      sparsity=sparsity(m, bytes_per_vector),
      references=float(references),
      bank_dense_bytes=references * dense,
      bank_sparse_bytes=references * sparse,
      bank_quantized_bytes=references * quant,
      implicit_write=implicit_write_flops(m),
      explicit_write=explicit_write_flops(m),
      explicit_read=explicit_read_flops(m),
      rag_read=rag_read_flops(m),
      interval=advantage_interval(m),
      remark8_reads=reads,
      remark8_total=total,
      remark8_fraction=frac,
      train_warmup=train_flop_terms(m, use_memory=False),
      train_continual=train_flop_terms(m, use_memory=True),
      train_continual_no_grad=train_flop_terms(m, use_memory=True,
                                               grad_through_references=False),
      forward_per_token=forward_flops_per_token(m),
      decode_per_token=decode_flops_per_token(m, context_length=ctx),
      decode_per_token_memory=decode_flops_per_token(m, context_length=ctx, use_memory=True),
      decode_context=ctx,
      uses=tuple((float(n), *total_costs(m, n)) for n in uses),
  )


def format_bytes(n: float) -> str:
  """Binary units (the paper's TB/PB are TiB/PiB)."""
  for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
    if abs(n) < 1024 or unit == "EiB":
      return f"{n:,.0f} B" if unit == "B" else f"{n:.3g} {unit}"
    n /= 1024
  raise AssertionError


def _sci(x: float) -> str:
  """1.12e8 rather than 1.12e+08."""
  if x == 0 or 1e-3 <= abs(x) < 1e6:
    return f"{x:,.6g}"
  mant, exp = f"{x:.4e}".split("e")
  return f"{float(mant):g}e{int(exp)}"


def _sci3(x: float) -> str:
  mant, exp = f"{x:.3e}".split("e")
  return f"{float(mant):g}e{int(exp)}"


def format_count(n: float) -> str:
  for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
    if abs(n) >= div:
      return f"{n / div:.4g}{unit}"
  return f"{n:.4g}"


def format_report(r: CostReport) -> str:
  """A readable table of the report."""
  rows: list[tuple[str, str]] = []

  def section(title: str) -> None:
    rows.append((f"== {title}", ""))

  def row(label: str, value: str) -> None:
    rows.append((label, value))

  p = r.params
  section("parameters")
  row("matmul params per block (P)", f"{p.per_layer_matmul:,}")
  row("block matmul params (L·P)", f"{p.block_matmul:,}  ({format_count(p.block_matmul)})")
  row("non-embedding params (incl. norms)",
      f"{p.non_embedding:,}  ({format_count(p.non_embedding)})")
  row("embedding + LM head params", f"{p.embedding:,}  ({format_count(p.embedding)})")
  row("total params", f"{p.total:,}  ({format_count(p.total)})")

  s = r.sparsity
  section("storage per reference")
  row("dense KV (all heads, bf16)", f"{r.dense_kv_bytes:,} B  ({format_bytes(r.dense_kv_bytes)})")
  row("sparse memory (bf16)", f"{r.memory_bytes:,} B  ({format_bytes(r.memory_bytes)})")
  row("sparse memory, quantized",
      f"{r.quantized_memory_bytes:,} B  ({format_bytes(r.quantized_memory_bytes)})")
  row("sparsity layers × heads × tokens",
      f"{s.layers:.3g} × {s.heads:.3g} × {s.tokens:.3g} = {s.total:.4g}×")
  row("with quantization", f"{s.total:.4g} × {s.quantization:.3g} = {s.total_quantized:.4g}×")

  section(f"memory bank of {_sci(r.references)} references (binary units; the paper's "
          "TB/PB are TiB/PiB)")
  row("dense", format_bytes(r.bank_dense_bytes))
  row("sparse", format_bytes(r.bank_sparse_bytes))
  row("sparse, quantized", format_bytes(r.bank_quantized_bytes))

  section("knowledge write/read cost per reference (Appendix A)")
  row("implicit (parameters) write", f"{_sci(r.implicit_write)} FLOPs  (read ≥ 0)")
  row("explicit memory write", f"{_sci(r.explicit_write)} FLOPs")
  row("explicit memory read, per use", f"{_sci(r.explicit_read)} FLOPs")
  row("RAG read, per use (lower bound)", f"{_sci(r.rag_read)} FLOPs  (write 0)")
  lo, hi = r.interval
  row("explicit memory cheapest for uses in", f"({lo:.4g}, {hi:,.0f})")
  row("Remark 8: memory reads / 256-token sample",
      f"{_sci(r.remark8_reads)} / {_sci(r.remark8_total)} = {100 * r.remark8_fraction:.3f}%")

  section("total cost vs uses n (TFLOPs)")
  row("n: implicit / explicit / RAG", "")
  for n, imp, exp, rag in r.uses:
    row(f"  n = {_sci(n)}", f"{imp / 1e12:.4g} / {exp / 1e12:.4g} / {rag / 1e12:.4g}")

  section("training FLOPs per context token")
  row("term: warmup / continual / continual, no grad through refs", "")
  for k in r.train_continual:
    row(f"  {k}", " / ".join(_sci3(t[k]) if k in t else "-" for t in (
        r.train_warmup, r.train_continual, r.train_continual_no_grad)))
  totals = [sum(t.values()) for t in (r.train_warmup, r.train_continual,
                                      r.train_continual_no_grad)]
  row("  total", " / ".join(_sci3(t) for t in totals))
  row("continual / warmup", f"{totals[1] / totals[0]:.3f}  "
      f"(no grad through refs: {totals[2] / totals[0]:.3f})")

  section("inference FLOPs per token")
  row(f"forward, {r.decode_context}-token sequence", _sci3(r.forward_per_token))
  row(f"decode at context {r.decode_context}", f"{_sci3(r.decode_per_token)}  "
      f"(with memory {_sci3(r.decode_per_token_memory)})")

  width = max(len(label) for label, _ in rows if not label.startswith("== ")) + 2
  title = f"m3jax costs: {r.name}" if r.name else "m3jax costs"
  lines = [title]
  for label, value in rows:
    if label.startswith("== "):
      lines.append("")
      lines.append(label[3:])
    else:
      lines.append(f"  {label:<{width}}{value}")
  return "\n".join(lines)
