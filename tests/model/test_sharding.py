"""Mesh construction, parameter shardings, and sharded == single-device results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from m3jax.model import kv_cache as decoding
from m3jax.model import sharding
from m3jax.core.config import ConfigError, load_config, model_config
from m3jax.model.transformer import Transformer


def _cfg(repo_root, data, fsdp, tensor):
  return load_config(str(repo_root / "configs" / "tiny.py"),
                     [f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}"])


def test_make_mesh_fills_one_axis_and_names_bad_fields(repo_root):
  assert jax.device_count() == 8
  assert dict(sharding.make_mesh(_cfg(repo_root, -1, 1, 1)).shape) == dict(data=8, fsdp=1,
                                                                            tensor=1)
  assert dict(sharding.make_mesh(_cfg(repo_root, 2, -1, 2)).shape) == dict(data=2, fsdp=2,
                                                                            tensor=2)
  with pytest.raises(ConfigError, match=r"`mesh\.data`: mesh\.data=3.*does not divide the 8"):
    sharding.make_mesh(_cfg(repo_root, 3, -1, 1))
  with pytest.raises(ConfigError, match=r"mesh\.tensor.*4 devices, but 8"):
    sharding.make_mesh(_cfg(repo_root, 2, 2, 1))
  cfg = _cfg(repo_root, 1, 1, 1)
  cfg.logical_axis_rules = (("embed", "model"),)
  with pytest.raises(ConfigError, match=r"logical_axis_rules\[0\].*'model'"):
    sharding.axis_rules(cfg)


@pytest.fixture(scope="module")
def sharded(repo_root):
  cfg = _cfg(repo_root, 2, 2, 2)
  mc = model_config(cfg)
  mesh, rules = sharding.make_mesh(cfg), sharding.axis_rules(cfg)
  params = sharding.init_params(mc, jax.random.key(0), mesh, rules)
  return mc, mesh, rules, params


@pytest.mark.slow
def test_large_params_are_sharded_on_the_mesh(sharded):
  mc, mesh, rules, params = sharded
  assert params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert params["layers_0"]["attn"]["q"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
  assert params["layers_0"]["attn"]["o"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
  assert params["layers_0"]["mlp"]["down"]["kernel"].sharding.spec == P("tensor", "fsdp")
  assert params["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
  report = sharding.check_sharded(params)
  assert 0 < report.unsharded_fraction < 0.02  # only the norm scales
  assert all("scale" in path for path, _ in report.unsharded)
  # the abstract route (for jit out_shardings) agrees with the materialized one
  specs = jax.tree_util.tree_map(lambda s: s.spec, sharding.param_shardings(mc, mesh, rules))
  assert specs == jax.tree_util.tree_map(lambda a: a.sharding.spec, params)


def test_fully_replicated_params_fail_the_check(sharded):
  _, mesh, _, params = sharded
  replicated = jax.device_put(params, NamedSharding(mesh, P()))
  assert sharding.sharding_report(replicated).unsharded_fraction == 1.0
  with pytest.raises(ValueError, match="unsharded across 8 devices"):
    sharding.check_sharded(replicated)
  single = jax.device_put(params, jax.devices()[0])
  assert sharding.check_sharded(single).unsharded_fraction == 1.0  # reported, not an error


@pytest.mark.slow
def test_sharded_forward_with_references_matches_single_device(sharded):
  mc, mesh, rules, params = sharded
  rng = np.random.default_rng(0)
  b, c = 4, 2
  tokens = rng.integers(5, mc.vocab_size, (b, c * mc.chunk_length)).astype(np.int32)
  refs = rng.integers(5, mc.vocab_size, (b, c, mc.reference_length)).astype(np.int32)
  lengths = np.array([[24, 3], [0, 10], [5, 5], [24, 0]], np.int32)
  model = Transformer(mc)

  def forward(p, t, r, n):
    mem, mask = model.apply({"params": p}, r, n, method="memories_from_references")
    return model.apply({"params": p}, t, memories=mem, memory_mask=mask)

  want = jax.jit(forward)(jax.device_get(params), tokens, refs, lengths)
  batch = sharding.logical_sharding(mesh, rules, ("batch", "length"))
  ref_batch = sharding.logical_sharding(mesh, rules, ("batch", None, "length"))
  with sharding.use_mesh(mesh, rules):
    got = jax.jit(forward, in_shardings=(sharding.param_shardings(mc, mesh, rules), batch,
                                         ref_batch, batch))(params, tokens, refs, lengths)
  assert got.sharding.spec == P(("data", "fsdp"), None, "tensor")  # logits constraint applied
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_cache_shardings_follow_the_rules(sharded):
  mc, mesh, rules, _ = sharded
  cache = decoding.init_cache(mc, 4, 16, with_prefix=True)
  shard = decoding.cache_shardings(cache, mesh, rules)
  assert all(s.spec == P(("data", "fsdp"), "tensor", None, None) for s in shard.k)
  assert shard.length.spec == P(("data", "fsdp"))
  placed = jax.device_put(cache, shard)
  assert placed.prefix_length == cache.prefix_length


def test_mesh_that_does_not_divide_a_parameter_is_one_clear_error(tiny_config):
  """fsdp 8 cannot split d_model 36: a ConfigError naming the array and the axis, before
  jax's IndivisibleError deep inside a jit."""
  from m3jax.core.config import ConfigError
  from m3jax.training import loop
  c = tiny_config.copy_and_resolve_references()
  c.mesh.data, c.mesh.fsdp = 1, 8
  c.model.update(d_model=36, head_dim=18, n_heads=2, n_kv_heads=2)
  c.data.batch_size = 8
  with pytest.raises(ConfigError, match=r"mesh.fsdp=8 splits dimension 1 of parameter "
                     r"\['embed'\]\['embedding'\] \(\d+, 36\) into 8 parts"):
    loop.build_context(c)
