"""`m3jax compile`'s reasoning without a compiler: topology names, OOM text, verdicts, knobs."""

import dataclasses

import pytest

from m3jax.core.xla_stats import GIB, MemoryFigures
from m3jax.planning import aot, report
from m3jax.planning.topology import Topology, TopologyError, parse_topology


def _plan(**kw) -> aot.StepPlan:
  base = dict(config_name="c", stage="warmup", target="v5e:2x2", device_kind="TPU v5 lite",
              n_chips=4, mesh={"data": 1, "fsdp": 4, "tensor": 1}, batch_size=4, seq_len=2048,
              grad_accum=1, per_chip_batch=1.0, remat_policy="full", dtype="bfloat16",
              attention_impl="blockwise", hbm_bytes=16 * GIB, peak_flops=197e12, model_flops=1e14,
              compiled_flops=1.25e14,
              memory=MemoryFigures(temp=4 * GIB, arguments=2 * GIB, outputs=2 * GIB,
                                   aliased=2 * GIB),
              out_of_memory=None, compile_s=1.0)
  base.update(kw)
  return aot.StepPlan(**base)


@pytest.mark.parametrize("name,gen,dims,chips", [
    ("v5e:2x2", "v5e", (2, 2), 4), ("v5e:16x16", "v5e", (16, 16), 256),
    ("v5p:4x4x4", "v5p", (4, 4, 4), 64), ("v4:2x2x1", "v4", (2, 2, 1), 4),
    (" V6E:4x4 ", "v6e", (4, 4), 16)])
def test_topology_names_parse(name, gen, dims, chips):
  t = parse_topology(name)
  assert t == Topology(gen, dims) and t.n_chips == chips
  assert parse_topology(t.name) == t


@pytest.mark.parametrize("name,says", [
    ("v5e", "expected GENERATION:AxB"), ("v5e:2by2", "expected GENERATION:AxB"),
    ("v7x:2x2", "unknown TPU generation 'v7x'"), ("v5e:2x2x1", "has 2 chip-grid axes, got 3"),
    ("v5p:4x4", "has 3 chip-grid axes, got 2"), ("v5e:0x2", "at least one chip")])
def test_bad_topology_names_get_one_line(name, says):
  with pytest.raises(TopologyError) as e:
    parse_topology(name)
  assert says in str(e.value) and "\n" not in str(e.value)


def test_out_of_memory_text_is_read():
  text = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
          "space hbm. Used 20.53G of 15.75G hbm. Exceeded hbm capacity by 4.78G.\n\nTotal ...")
  oom = aot.parse_out_of_memory(text)
  assert oom.used == int(20.53 * GIB) and oom.limit == int(15.75 * GIB)
  assert oom.message.startswith("RESOURCE_EXHAUSTED") and "\n" not in oom.message
  assert aot.parse_out_of_memory("INVALID_ARGUMENT: shapes do not match") is None
  vague = aot.parse_out_of_memory("RESOURCE_EXHAUSTED: out of memory somewhere")
  assert vague.used is None and vague.limit is None


def test_memory_total_counts_donated_outputs_once():
  m = MemoryFigures(temp=5, arguments=7, outputs=6, aliased=6, code=1)
  assert m.total == 7 + 5 + 1
  assert m.as_dict()["total"] == 13


def test_fitting_step_reports_margin_ceiling_and_bound():
  plan = _plan()
  v = report.verdict(plan)
  assert v.fits and v.used == 6 * GIB and v.margin == 10 * GIB
  assert report.mfu_ceiling(plan) == pytest.approx(0.8)
  assert report.step_time_bound(plan) == pytest.approx(1.25e14 / 197e12)
  text = report.format_plan(plan)
  assert "verdict: FITS, 10.00 GiB (62%) free per chip" in text
  assert "MFU ceiling 80%" in text and "6.00 GiB of 16.00 GiB (38%)" in text


def test_roomy_step_suggests_less_recomputation_only():
  v = report.verdict(_plan())  # 62% free with remat full
  assert len(v.knobs) == 1 and "remat_policy=dots_with_no_batch_dims" in v.knobs[0]
  assert report.verdict(_plan(remat_policy="none")).knobs == ()


def test_oversized_temp_puts_remat_and_batch_first():
  plan = _plan(remat_policy="dots_saveable", per_chip_batch=4.0, batch_size=16,
               memory=MemoryFigures(temp=30 * GIB, arguments=2 * GIB, outputs=2 * GIB,
                                    aliased=2 * GIB))
  v = report.verdict(plan)
  assert v.fits is False and v.margin == -16 * GIB
  assert "dots_with_no_batch_dims or full" in v.knobs[0]
  assert "per-chip batch 4 -> 2: train.grad_accum=2" in v.knobs[1]
  assert "data.batch_size=8" in v.knobs[1]
  assert not any("fsdp" in k or "slice" in k for k in v.knobs)  # arguments are 2 of 32 GiB
  assert "DOES NOT FIT by 16.00 GiB (needs 32.00 GiB of 16.00 GiB)" in report.format_plan(plan)


def test_oversized_arguments_put_fsdp_first_with_an_estimate():
  plan = _plan(mesh={"data": 4, "fsdp": 1, "tensor": 1}, remat_policy="full",
               memory=MemoryFigures(temp=2 * GIB, arguments=20 * GIB, outputs=20 * GIB,
                                    aliased=20 * GIB))
  v = report.verdict(plan)
  assert not v.fits
  assert v.knobs[0].startswith("mesh.fsdp=4 mesh.data=1 (now fsdp 1)")
  assert "arguments 20.00 GiB -> about 5.00 GiB" in v.knobs[0]
  assert not any("remat_policy" in k for k in v.knobs)  # full is the strongest already
  state_bound = _plan(memory=MemoryFigures(temp=2 * GIB, arguments=20 * GIB, outputs=20 * GIB,
                                            aliased=20 * GIB))  # fsdp spans the 4 chips
  assert "a larger slice" in report.verdict(state_bound).knobs[0]


def test_compiler_refusal_is_the_verdict():
  oom = aot.OutOfMemory(used=20 * GIB, limit=15 * GIB, message="Ran out of memory in hbm")
  plan = _plan(memory=None, compiled_flops=None, out_of_memory=oom, remat_policy="none",
               attention_impl="reference")
  v = report.verdict(plan)
  assert v.fits is False and v.capacity == 15 * GIB and v.margin == -5 * GIB
  assert any("attention_impl=blockwise" in k for k in v.knobs)
  text = report.format_plan(plan)
  assert "ran out of memory: Ran out of memory in hbm" in text
  assert "DOES NOT FIT by 5.00 GiB" in text and "no compiled count" in text


def test_unknown_device_memory_gives_no_verdict():
  plan = _plan(hbm_bytes=None, device_kind="cpu")
  assert report.verdict(plan).fits is None
  assert "verdict: unknown (cpu has no memory size" in report.format_plan(plan)


def test_grad_accum_plan_says_how_flops_were_counted():
  plan = dataclasses.replace(_plan(), grad_accum=4, batch_size=16)
  assert "counted grad_accum times" in report.format_plan(plan)


def test_ceiling_over_one_says_why():
  assert "XLA counts a loop body once" in report.format_plan(_plan(compiled_flops=0.9e14))
  assert "loop body once" not in report.format_plan(_plan())
