"""`m3jax bench train` reports each stage's compiled memory beside its speed."""

import pytest

from m3jax.bench import train as bench_train


@pytest.mark.slow
def test_bench_train_reports_compiled_memory(tiny_config):
  cfg = tiny_config.copy_and_resolve_references()
  cfg.model.n_layers = 1
  cfg.model.memory_layers = (0,)
  r = bench_train.run(cfg, steps=1)
  for stage in ("warmup", "continual"):
    mem = r[stage]["memory_per_device"]
    assert mem["temp"] > 0 and mem["arguments"] > 0 and mem["outputs"] > 0
    assert mem["total"] == (mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temp"] +
                            mem["code"])
  # Reference encoding needs activations of its own: continual holds more than warmup.
  assert r["continual"]["memory_per_device"]["temp"] > r["warmup"]["memory_per_device"]["temp"]
  assert "temp GiB" in bench_train.format_result(r)
