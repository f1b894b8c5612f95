"""`m3jax prepare-chat`: chat (SFT) and preference (DPO) datasets for post-training.

  m3jax prepare-chat --config=configs/demo.py --workdir=runs/demo \\
      --config.data.chat_files='("chats.jsonl",)' \\
      --config.data.preference_files='("pairs.jsonl",)'

Renders the files with the chat template and the tokenizer of `<workdir>/data`
(trained with `data.chat_tokens=True`), packs them into `model.max_seq_len`
sequences and, unless `train.chat_memory=False`, retrieves each chunk's reference
from the prompt text with the index of `m3jax build-index`
(m3jax.training.chat_data). Writes `<workdir>/data/chat` and
`<workdir>/data/preferences`; a re-run with the same inputs reuses them.
"""

from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_flags

from m3jax import cli
from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.training import chat_data

CONFIG_FIELDS = ("data.chat_files", "data.preference_files", "data.chat_max_rounds",
                 "train.chat_memory", "data.train_overlap_threshold")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding data/ (prepare-data).")


def main(argv: list[str]) -> None:
  commands.check_args(argv, _CONFIG, _WORKDIR)
  cfg = config_lib.validate(_CONFIG.value)
  out = chat_data.prepare_chat(cfg, _WORKDIR.value, use_memory=bool(cfg.train.chat_memory))
  print(json.dumps({k: v["info"] for k, v in out.items()}, indent=2))


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
