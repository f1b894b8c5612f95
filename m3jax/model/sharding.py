"""Device mesh, logical-axis rules and parameter shardings (docs/model.md "Sharding").

One mesh with axes (data, fsdp, tensor) sized from `cfg.mesh` (-1 = the rest of
the devices). Parameters carry logical axis names (`nn.with_logical_partitioning`
in m3jax.model.transformer); the single rules table `cfg.logical_axis_rules` maps them to mesh
axes. Shardings of any boxed abstract tree (params, a train state made with
`jax.eval_shape`) come from `nn.get_partition_spec` + `nn.logical_to_mesh_sharding`.
Activation constraints inside the model are active only under `use_mesh(mesh, rules)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m3jax.core.config import ConfigError, ModelConfig
from m3jax.core.errors import InputError
from m3jax.model.transformer import Transformer

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]


def mesh_shape(cfg, n_devices: int) -> tuple[int, int, int]:
  """Resolves cfg.mesh (data, fsdp, tensor; one may be -1) against a device count."""
  sizes = {}
  for ax in MESH_AXES:
    v = cfg.mesh[ax]
    if not isinstance(v, int) or isinstance(v, bool) or not (v == -1 or v > 0):
      raise ConfigError(f"config field `mesh.{ax}`: must be -1 (fill) or a positive integer, "
                        f"got {v!r}")
    sizes[ax] = v
  fill = [ax for ax in MESH_AXES if sizes[ax] == -1]
  if len(fill) > 1:
    raise ConfigError(f"config field `mesh.{fill[1]}`: at most one mesh axis may be -1, got "
                      f"{', '.join('mesh.' + a for a in fill)}")
  fixed = [ax for ax in MESH_AXES if sizes[ax] != -1]
  product = math.prod(sizes[ax] for ax in fixed)
  desc = " x ".join(f"mesh.{ax}={sizes[ax]}" for ax in fixed)
  culprit = next((ax for ax in fixed if n_devices % sizes[ax]), fixed[-1] if fixed else "data")
  if fill:
    if n_devices % product:
      raise ConfigError(f"config field `mesh.{culprit}`: {desc} = "
                        f"{product} does not divide the {n_devices} devices "
                        f"(mesh.{fill[0]}=-1 fills the rest)")
    sizes[fill[0]] = n_devices // product
  elif product != n_devices:
    raise ConfigError(f"config field `mesh.{culprit}`: {desc} = {product} devices, but "
                      f"{n_devices} are available (set one axis to -1 to fill)")
  return tuple(sizes[ax] for ax in MESH_AXES)


def make_mesh(cfg, devices: Sequence[jax.Device] | None = None, *,
              shape: Sequence[int] | None = None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh over `devices` (default: all).

  Sizes from cfg.mesh, or `shape` (data, fsdp, tensor) when given (cfg is then unused).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices)) if shape is None else tuple(int(n) for n in shape)
  if math.prod(shape) != len(devices):
    raise InputError(f"mesh shape {shape} needs {math.prod(shape)} devices, got {len(devices)}")
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def axis_rules(cfg) -> Rules:
  """cfg.logical_axis_rules as a tuple of (logical name, mesh axes or None), validated."""
  rules = []
  for i, rule in enumerate(cfg.logical_axis_rules):
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"config field `logical_axis_rules[{i}]`: expected (logical_name, "
                        f"mesh_axes), got {rule!r}")
    name, target = rule
    if isinstance(target, list):
      target = tuple(target)
    for ax in (target if isinstance(target, tuple) else (target,)):
      if ax is not None and ax not in MESH_AXES:
        raise ConfigError(f"config field `logical_axis_rules[{i}]` ({name!r}): unknown mesh "
                          f"axis {ax!r}; mesh axes are {MESH_AXES}")
    rules.append((name, target))
  return tuple(rules)


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[None]:
  """Activates the mesh and the logical rules (turns on the model's activation constraints).

  Trace/jit model functions inside this context.
  """
  with jax.sharding.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_sharding(mesh: jax.sharding.Mesh, rules: Rules,
                     axes: Sequence[str | None]) -> jax.sharding.NamedSharding:
  """NamedSharding for one array with logical axes, e.g. ("batch", "length") for tokens."""
  return jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(axes), rules))


def logical_shardings(boxed_tree: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree whose leaves are (abstract) nn.Partitioned boxes.

  Unboxed leaves are replicated. Works on `jax.eval_shape` outputs, so nothing is
  allocated; the result matches the UNBOXED tree (`nn.unbox(boxed_tree)`).
  """
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, rules)


def check_divisible(abstract_tree: Any, shardings: Any, what: str = "parameter") -> None:
  """Refuses a mesh that does not divide a sharded dimension, naming the array, its
  dimension and the mesh axes (jax would fail later with an IndivisibleError)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_tree))
  specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  for (path, leaf), sh in zip(flat, specs):
    spec = getattr(sh, "spec", ())
    for dim, axes in enumerate(spec):
      if axes is None or dim >= len(leaf.shape):
        continue
      names = axes if isinstance(axes, tuple) else (axes,)
      ways = math.prod(sh.mesh.shape[a] for a in names)
      if leaf.shape[dim] % ways:
        name = jax.tree_util.keystr(path)
        sizes = " x ".join(f"mesh.{a}={sh.mesh.shape[a]}" for a in names)
        raise ConfigError(
            f"config field `mesh`: {sizes} splits dimension {dim} of {what} {name} "
            f"{tuple(leaf.shape)} into {ways} parts, which does not divide {leaf.shape[dim]}; "
            f"choose sizes that divide it (e.g. move a factor to mesh.data)")


def abstract_params(config: ModelConfig) -> Any:
  """Boxed abstract parameter tree (ShapeDtypeStructs in nn.Partitioned), no allocation."""
  tokens = jax.ShapeDtypeStruct((1, config.chunk_length), jnp.int32)
  return jax.eval_shape(lambda r, t: Transformer(config).init(r, t)["params"],
                        jax.random.key(0), tokens)


def param_shardings(config: ModelConfig, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
  """NamedShardings matching the (unboxed) parameter tree of `Transformer(config)`."""
  return logical_shardings(abstract_params(config), mesh, rules)


def init_params(config: ModelConfig, rng: jax.Array, mesh: jax.sharding.Mesh,
                rules: Rules) -> Any:
  """Fresh parameters created directly in their shardings (jit with out_shardings)."""
  shardings = param_shardings(config, mesh, rules)
  tokens = jnp.zeros((1, config.chunk_length), jnp.int32)

  def init(r):
    return nn.unbox(Transformer(config).init(r, tokens)["params"])

  with use_mesh(mesh, rules):
    return jax.jit(init, out_shardings=shardings)(rng)


def shard_params(params: Any, shardings: Any) -> Any:
  """Places an existing (host or device) tree in the given shardings."""
  return jax.device_put(params, shardings)


@dataclasses.dataclass(frozen=True)
class ShardingReport:
  """How much of a tree is fully replicated (unsharded) across its devices."""
  total_bytes: int
  unsharded_bytes: int
  unsharded: tuple[tuple[str, int], ...]  # (path, bytes), largest first

  @property
  def unsharded_fraction(self) -> float:
    return self.unsharded_bytes / self.total_bytes if self.total_bytes else 0.0


def sharding_report(tree: Any, shardings: Any | None = None) -> ShardingReport:
  """Bytes of `tree` whose sharding is fully replicated.

  tree: arrays or ShapeDtypeStructs; shardings: a matching tree of Shardings
  (default: each leaf's own `.sharding`).
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  if shardings is None:
    shards = [getattr(x, "sharding", None) for _, x in leaves]
  else:
    shards = jax.tree_util.tree_leaves(shardings)
    if len(shards) != len(leaves):
      raise ValueError(f"shardings tree has {len(shards)} leaves, params {len(leaves)}")
  total, unsharded = 0, []
  for (path, x), s in zip(leaves, shards):
    nbytes = int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    total += nbytes
    if s is None or s.is_fully_replicated:
      unsharded.append((jax.tree_util.keystr(path), nbytes))
  unsharded.sort(key=lambda e: -e[1])
  return ShardingReport(total, sum(b for _, b in unsharded), tuple(unsharded))


def check_sharded(tree: Any, shardings: Any | None = None, *,
                  max_unsharded_fraction: float = 0.25) -> ShardingReport:
  """Raises when more than `max_unsharded_fraction` of the bytes are fully replicated.

  Skipped (report only) on a single device, where nothing can be sharded.
  """
  report = sharding_report(tree, shardings)
  shards = (jax.tree_util.tree_leaves(shardings) if shardings is not None else
            [getattr(x, "sharding", None) for x in jax.tree_util.tree_leaves(tree)])
  n_devices = max((len(s.device_set) for s in shards if s is not None), default=1)
  if n_devices > 1 and report.unsharded_fraction > max_unsharded_fraction:
    top = ", ".join(f"{p} ({b / 2**20:.1f} MiB)" for p, b in report.unsharded[:5])
    raise ValueError(f"{report.unsharded_fraction:.0%} of parameter bytes are unsharded "
                     f"across {n_devices} devices (limit {max_unsharded_fraction:.0%}); "
                     f"largest: {top}. Check logical_axis_rules and the mesh sizes.")
  return report
