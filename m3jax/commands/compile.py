"""`m3jax compile`: per-chip memory and FLOPs of a train step on a TPU slice, compiled
ahead of time on this machine (needs the `tpu` extra, no TPU).

  m3jax compile --config=configs/memory3_2p4b.py --topology=v5e:2x2 [--stage=continual]

`--topology=local` compiles for this machine's own devices instead (a GPU host's GPUs).
"""

from __future__ import annotations

import dataclasses
import json
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from m3jax import cli
from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.planning import aot
from m3jax.planning import report
from m3jax.planning import topology as topology_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU slice GENERATION:AxB[xC] (v5e:2x2, v5e:16x16, v5p:4x4x4, v4:2x2x1, "
    "v6e:4x4), or `local` for this machine's devices.")
_STAGE = flags.DEFINE_enum("stage", None, ["warmup", "continual"],
                           "Training stage to compile (default: the config's train.stage).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", None, "Sequence length (default: model.max_seq_len).")
_JSON = flags.DEFINE_string("json", None, "Also write the figures and verdict to this JSON file.")


def main(argv: list[str]) -> None:
  commands.check_args(argv, _CONFIG)
  if not _TOPOLOGY.value:
    raise app.UsageError("--topology is required, e.g. --topology=v5e:2x2 (or local)")
  cfg = aot.stage_config(config_lib.validate(_CONFIG.value), _STAGE.value, _SEQ_LEN.value)
  if _TOPOLOGY.value == "local":
    devices, target = None, None
  else:
    topo = topology_lib.parse_topology(_TOPOLOGY.value)
    devices, target = topology_lib.topology_devices(topo), topo.name
    if cfg.model.attention_impl == "auto":
      # "auto" resolves against this host's backend, not the target's.
      cfg.model.attention_impl = "blockwise"
      print("attention: model.attention_impl=auto resolves on this host's backend, not the "
            "TPU's; compiling blockwise (linear memory in T; name another with "
            "--config.model.attention_impl)", file=sys.stderr)
  plan = aot.compile_train_step(cfg, devices, target=target)
  print(report.format_plan(plan))
  if _JSON.value:
    v = report.verdict(plan)
    out = {**dataclasses.asdict(plan), "memory": plan.memory.as_dict() if plan.memory else None,
           "verdict": dataclasses.asdict(v), "mfu_ceiling": report.mfu_ceiling(plan),
           "step_time_bound_s": report.step_time_bound(plan)}
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
