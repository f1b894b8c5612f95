"""`m3jax encode-memory`: encode every reference into the memory bank (warm start).

  m3jax encode-memory --config=configs/demo.py --checkpoint=runs/demo \\
      --references=runs/demo/data --out=runs/demo/bank \\
      [--config.bank.quantization=pq] [--max_shards=N] [--quantizer=FILE]

--checkpoint: a params dir, a training workdir, its checkpoints dir or a step dir.
--references: a prepare-data directory (<workdir>/data) or a references dataset dir.
Resumable: rerun the same command after an interruption; finished shards are
verified and skipped. Multi-host: start one process per host under
jax.distributed (--coordinator_address/--num_processes/--process_id or the
M3JAX_* variables, automatic on TPU/SLURM), or run independent jobs with
--process_index/--process_count. See WORKSPACE.md "Memory bank".
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from m3jax import cli
from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.core import distributed
from m3jax.memory import encode_job
from m3jax.model import params_io

CONFIG_FIELDS = ("bank.shard_size", "bank.encode_batch_size", "bank.quantization",
                 "bank.pq_subvectors", "bank.pq_train_references", "model.dtype")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Model: params dir, workdir or step dir.")
_REFERENCES = flags.DEFINE_string("references", None,
                                  "prepare-data directory or references dataset directory.")
_OUT = flags.DEFINE_string("out", None, "Bank directory (created; resumed if present).")
_QUANTIZER = flags.DEFINE_string("quantizer", None,
                                 "Use this trained PQ quantizer (.npz) instead of training one.")
_MAX_SHARDS = flags.DEFINE_integer("max_shards", None,
                                   "Encode at most this many shards in this run, then stop.")
_PROCESS_INDEX = flags.DEFINE_integer(
    "process_index", None, "Run as independent job p of --process_count (no jax.distributed).")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", None,
                                      "Number of independent jobs sharing the shards.")
_VERIFY_EXISTING = flags.DEFINE_bool("verify_existing", True,
                                     "sha256-check finished shards before skipping them.")
_PROGRESS_EVERY_S = flags.DEFINE_float("progress_every_s", 30.0, "Seconds between progress lines.")
distributed.define_distributed_flags()


def main(argv: list[str]) -> None:
  commands.check_args(argv)
  for name, flag in (("config", _CONFIG), ("checkpoint", _CHECKPOINT),
                     ("references", _REFERENCES), ("out", _OUT)):
    if not flag.value:
      raise app.UsageError(f"--{name} is required")
  if (_PROCESS_INDEX.value is None) != (_PROCESS_COUNT.value is None):
    raise app.UsageError("--process_index and --process_count go together")
  if _PROCESS_COUNT.value is None:
    distributed.initialize_from_flags()
  cfg = config_lib.validate(_CONFIG.value)
  ckpt_cfg, params, step = params_io.load_for_inference(_CHECKPOINT.value)
  result = encode_job.run(
      cfg, checkpoint=_CHECKPOINT.value, checkpoint_config=ckpt_cfg, params=params,
      step=step, references=_REFERENCES.value, out=_OUT.value,
      quantizer_path=_QUANTIZER.value, process_index=_PROCESS_INDEX.value,
      process_count=_PROCESS_COUNT.value, max_shards=_MAX_SHARDS.value,
      verify_existing=_VERIFY_EXISTING.value, progress_every_s=_PROGRESS_EVERY_S.value)
  if not result.complete and _MAX_SHARDS.value is not None:
    print("m3jax encode-memory: stopped after --max_shards; rerun to continue")


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
