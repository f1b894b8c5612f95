"""Ahead-of-time compiles of the real train step: local devices always, a TPU slice with libtpu."""

import pytest

from m3jax.planning import aot, report
from m3jax.planning import topology as topology_lib

HAS_LIBTPU = topology_lib.tpu_compiler_available()


def _small(cfg, **model):
  c = cfg.copy_and_resolve_references()
  c.model.n_layers = 1
  c.model.memory_layers = (0,)
  for k, v in model.items():
    c.model[k] = v
  return c


def test_local_compile_reports_the_step_the_loop_runs(tiny_config):
  # 8 fake CPU devices (conftest), tiny's mesh data=-1: one sequence per device.
  cfg = aot.stage_config(_small(tiny_config), "warmup", seq_len=32)
  plan = aot.compile_train_step(cfg)
  assert plan.target == "local cpu" and plan.n_chips == 8
  assert plan.mesh == {"data": 8, "fsdp": 1, "tensor": 1} and plan.per_chip_batch == 1
  assert plan.seq_len == 32 and plan.stage == "warmup" and plan.out_of_memory is None
  m = plan.memory
  assert m is not None and m.temp > 0 and m.arguments > 0
  # The state is donated: its bytes are written in place, not held twice.
  assert m.aliased > 0 and m.total < m.arguments + m.outputs + m.temp + m.code
  # The compiled count includes everything the cost model counts (and a little more).
  assert 1.0 <= plan.compiled_flops / plan.model_flops < 2.0


def test_without_libtpu_the_error_names_the_extra(monkeypatch):
  monkeypatch.setattr(topology_lib, "tpu_compiler_available", lambda: False)
  with pytest.raises(topology_lib.TopologyError, match=r"needs libtpu: pip install -e '\.\[tpu\]'"):
    topology_lib.topology_devices(topology_lib.parse_topology("v5e:2x2"))


@pytest.mark.tpu
@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU,
                    reason="needs libtpu, the TPU compiler: pip install -e '.[tpu]'")
def test_tpu_slice_compile_gives_per_chip_figures(tiny_config):
  topo = topology_lib.parse_topology("v5p:2x2x1")
  devices = topology_lib.topology_devices(topo)
  assert len(devices) == 4 and devices[0].device_kind == "TPU v5"
  cfg = _small(tiny_config)
  cfg.mesh.data, cfg.mesh.fsdp = 1, -1
  plan = aot.compile_train_step(aot.stage_config(cfg, "continual"), devices, target=topo.name)
  assert plan.mesh == {"data": 1, "fsdp": 4, "tensor": 1} and plan.per_chip_batch == 2
  assert plan.hbm_bytes == 95 * 2**30 and plan.peak_flops == 459e12
  v = report.verdict(plan)
  assert v.fits and 0 < plan.memory.total < 2**30
  # The TPU compiler's count is close to the cost model's (here a little under: it does not
  # count every elementwise op the cost model charges).
  assert 0.8 <= plan.compiled_flops / plan.model_flops < 2.0
  assert "verdict: FITS" in report.format_plan(plan)
