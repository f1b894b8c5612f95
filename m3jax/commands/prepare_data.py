"""`m3jax prepare-data`: tokenizer, references and packed training sequences.

  m3jax prepare-data --config=configs/demo.py --workdir=runs/demo

Writes `<workdir>/data/` (see `data_pipeline.prepare` and WORKSPACE.md): the
tokenizer, the TFDS datasets (array_record) and `manifest.json`. Re-running reuses
finished stages and refuses inputs or settings that differ from what is there.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from data_pipeline import prepare
from m3jax import cli
from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.core import workspace

CONFIG_FIELDS = ("data.corpus", "data.files", "data.kb_files", "data.tfds_name",
                 "data.vocab_size", "data.workdir_data", "data.eval_fraction",
                 "data.bad_records", "model.max_seq_len", "model.reference_length")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; data goes to <workdir>/data.")


def main(argv: list[str]) -> None:
  commands.check_args(argv, _CONFIG, _WORKDIR)
  cfg = config_lib.validate(_CONFIG.value)
  manifest = prepare.prepare_data(cfg, _WORKDIR.value)
  root = workspace.data_root(cfg, _WORKDIR.value)
  summary = dict(data=root, tokenizer=manifest["tokenizer"]["hash"][:12],
                 references=manifest["datasets"]["references"]["num_references"],
                 sequences={k: v["sequences"]
                            for k, v in manifest["datasets"]["packed"]["splits"].items()},
                 seconds=manifest["seconds_this_run"])
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
