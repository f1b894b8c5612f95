"""`m3jax demo-edit`: a live knowledge edit on a finished demo workdir, with its evidence.

  m3jax demo-edit --workdir=/tmp/demo_edit [--attribute=birth_city]

Gives 100 unseen people of the knowledge world a new birth city (or --attribute) with
`m3jax bank update` and reports how the answers follow (m3jax/demo/edit.py). The bank
of the workdir is edited in place: run it on a copy of the demo workdir
(`cp -r demo_workdir /tmp/demo_edit`).

Also runnable as `python -m m3jax.commands.demo_edit`.
"""

from __future__ import annotations

import sys

from absl import flags

from m3jax import cli
from m3jax import commands
from m3jax.demo import edit as edit_demo

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished demo workdir (a copy).")
_PEOPLE = flags.DEFINE_integer("people", 100, "Unseen people whose attribute changes.")
_ATTRIBUTE = flags.DEFINE_string("attribute", "birth_city",
                                 "The attribute changed: birth_city, university, field, hobby "
                                 "or instrument.")
_EVAL_LIMIT = flags.DEFINE_integer("eval_limit", 480,
                                   "Other held-out questions (equal share per group; 0 = all).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Generation batch size.")


def main(argv: list[str]) -> None:
  commands.check_args(argv, workdir=_WORKDIR)
  edit_demo.run_edit_demo(_WORKDIR.value, people=_PEOPLE.value,
                          attribute=_ATTRIBUTE.value, eval_limit=_EVAL_LIMIT.value,
                          batch_size=_BATCH.value)


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
