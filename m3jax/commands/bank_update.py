"""`m3jax bank update`: add, replace and delete references in a finished memory bank.

  m3jax bank update --bank=runs/demo/bank [--add=new.jsonl] [--replace=changed.jsonl]
      [--delete=12,40 | --delete=@ids.txt] [--checkpoint=C] [--data_dir=D] [--index=I]
      [--nokeep_previous]

Only the edited references are encoded (with the bank's model and codec) and only the
shards holding them are rewritten; the index and the references used by RAG and the
leakage filter follow through the bank's overlay. The switch to the new version is one
rename of manifest.json: readers see the old knowledge base or the new one. Killed
mid-way, rerun the same command to finish. See WORKSPACE.md "Live knowledge edits".
Also runnable as `python -m m3jax.commands.bank_update`.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from m3jax import cli
from m3jax import commands
from m3jax.memory import edit_job

_BANK = flags.DEFINE_string("bank", None, "The memory bank to edit (encode-memory's --out).")
_ADD = flags.DEFINE_string("add", None, 'JSONL of new documents: {"text": ...} per line.')
_REPLACE = flags.DEFINE_string("replace", None,
                               'JSONL of new texts: {"ref_id": N, "text": ...} per line.')
_DELETE = flags.DEFINE_string("delete", None, "ref_ids to delete: 1,2,3 or @FILE.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Model (default: the checkpoint the bank records).")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "prepare-data directory (default: the bank's references').")
_INDEX = flags.DEFINE_string("index", None, "Index directory (default: <data_dir>/index).")
_KEEP_PREVIOUS = flags.DEFINE_bool("keep_previous", True,
                                   "Keep the previous version's files for readers using it.")


def main(argv: list[str]) -> None:
  commands.check_args(argv)
  if not _BANK.value:
    raise app.UsageError("--bank is required")
  if not (_ADD.value or _REPLACE.value or _DELETE.value):
    raise app.UsageError("give at least one of --add, --replace, --delete")
  edit_job.run(_BANK.value, add=_ADD.value, replace=_REPLACE.value, delete=_DELETE.value,
               checkpoint=_CHECKPOINT.value, data_dir=_DATA_DIR.value,
               index_dir=_INDEX.value, keep_previous=_KEEP_PREVIOUS.value)


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
