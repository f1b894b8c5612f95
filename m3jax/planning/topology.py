"""TPU slices by name (`v5e:2x2`, `v5p:4x4x4`, `v4:2x2x1`) and their devices, without the chips.

A name is `GENERATION:AxBxC` with the chip grid of the slice (two axes for the
"lite" generations v5e and v6e, three for v4 and v5p), as Cloud TPU and
`jax.experimental.topologies` spell them. The devices come from libtpu's topology
description: abstract TPU devices that the TPU compiler can compile for on any
host, and that `m3jax.model.sharding.make_mesh` lays out like the real slice.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
from typing import Sequence

import jax
from jax.experimental import topologies

from m3jax.core import errors

# generation -> number of axes of its chip grid.
GENERATIONS: dict[str, int] = {"v4": 3, "v5e": 2, "v5p": 3, "v6e": 2}
# v4 and v5p chips have two TensorCores that JAX drives as one device ("megacore"); without
# this option libtpu's description would make one device per core.
_MEGACORE = ("v4", "v5p")

_NAME = re.compile(r"^(?P<gen>v\d+[a-z]*):(?P<dims>\d+(?:x\d+)*)$")


class TopologyError(errors.UserError, ValueError):
  """A topology name is malformed, or this machine cannot compile for it."""


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice: its generation and chip grid."""
  generation: str
  dims: tuple[int, ...]

  @property
  def name(self) -> str:
    return f"{self.generation}:{'x'.join(map(str, self.dims))}"

  @property
  def n_chips(self) -> int:
    return math.prod(self.dims)


def parse_topology(name: str) -> Topology:
  """`v5e:2x2` -> Topology('v5e', (2, 2)); a bad name raises one line saying what is accepted."""
  example = "e.g. v5e:2x2, v5e:16x16, v5p:2x2x1, v5p:4x4x4, v4:2x2x1, v6e:4x4"
  m = _NAME.match(name.strip().lower())
  if not m:
    raise TopologyError(f"--topology={name!r}: expected GENERATION:AxB[xC] ({example})")
  gen, dims = m["gen"], tuple(int(d) for d in m["dims"].split("x"))
  if gen not in GENERATIONS:
    raise TopologyError(f"--topology={name!r}: unknown TPU generation {gen!r}; known: "
                        f"{', '.join(GENERATIONS)}")
  if len(dims) != GENERATIONS[gen]:
    raise TopologyError(f"--topology={name!r}: a {gen} slice has {GENERATIONS[gen]} chip-grid "
                        f"axes, got {len(dims)} ({example})")
  if any(d < 1 for d in dims):
    raise TopologyError(f"--topology={name!r}: every axis needs at least one chip")
  return Topology(gen, dims)


def tpu_compiler_available() -> bool:
  """Whether libtpu (the TPU compiler; `pip install -e '.[tpu]'`) is installed."""
  return importlib.util.find_spec("libtpu") is not None


def accelerator_type(topology: Topology) -> str:
  """The slice's Cloud TPU accelerator type (v5e:2x2 -> v5litepod-4; v4 and v5p count cores)."""
  n = topology.n_chips
  return {"v4": f"v4-{2 * n}", "v5e": f"v5litepod-{n}", "v5p": f"v5p-{2 * n}",
          "v6e": f"v6e-{n}"}[topology.generation]


def topology_devices(topology: Topology) -> Sequence[jax.Device]:
  """The slice's abstract TPU devices (one per chip), for meshes and ahead-of-time compiles."""
  if not tpu_compiler_available():
    raise TopologyError("compiling for a TPU needs libtpu: pip install -e '.[tpu]' "
                        "(jax[tpu]; no TPU needed)")
  # Off a TPU VM libtpu cannot find these and prints start-up errors; a user's own values win.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(topology))
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  try:
    options = {"chip_config_name": "megacore"} if topology.generation in _MEGACORE else {}
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.name, **options)
  except Exception as e:  # libtpu's own message names what it did not accept
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise TopologyError(f"--topology={topology.name}: libtpu refused it: {first}") from None
  devices = list(desc.devices)
  if len(devices) != topology.n_chips:
    raise TopologyError(f"--topology={topology.name}: libtpu made {len(devices)} devices for "
                        f"{topology.n_chips} chips")
  return devices
