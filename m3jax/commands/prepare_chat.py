"""`m3jax prepare-chat`: chat (SFT) and preference (DPO) datasets for post-training.

  m3jax prepare-chat --config=configs/demo.py --workdir=runs/demo \
      --config.data.chat_files='("chats.jsonl",)' \
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

from absl import app
from absl import flags
from ml_collections import config_flags

from m3jax import commands
from m3jax.core import config as config_lib
from m3jax.core import stages
from m3jax.retrieval import index as index_lib
from m3jax.training import chat_data

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding data/ (prepare-data).")


def main(argv: list[str]) -> None:
  commands.check_args(argv, _CONFIG, _WORKDIR)
  cfg = config_lib.validate(_CONFIG.value)
  try:
    out = chat_data.prepare_chat(cfg, _WORKDIR.value, use_memory=bool(cfg.train.chat_memory))
  except (config_lib.ConfigError, index_lib.IndexDirError, stages.StageChangedError,
          FileNotFoundError, ValueError) as e:
    print(f"m3jax prepare-chat: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(json.dumps({k: v["info"] for k, v in out.items()}, indent=2))


if __name__ == "__main__":
  app.run(main)
