"""Command modules of the `m3jax` CLI: each parses its flags and calls the library."""

from __future__ import annotations

from typing import Any, Sequence


def check_args(argv: Sequence[str], config: Any = None, workdir: Any = None) -> None:
  """The checks every command shares: no stray arguments, --config / --workdir given.

  `config` and `workdir` are the command's flag holders (pass those it requires).
  """
  from absl import app
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {list(argv[1:])}")
  if config is not None and config.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  if workdir is not None and not workdir.value:
    raise app.UsageError("--workdir is required")
