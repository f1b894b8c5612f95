"""`m3jax CMD --help`: purpose, example, own flags, main config fields; --helpfull the rest."""

from __future__ import annotations

import types

import pytest

from m3jax import cli
from support import REPO

TINY = str(REPO / "configs" / "tiny.py")


def help_text(capsys, *argv: str) -> str:
  assert cli.main(["m3jax", *argv]) == 0
  out, err = capsys.readouterr()
  assert err == ""
  return out


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_train_help_lists_purpose_example_flags_then_config_fields(capsys, flag):
  out = help_text(capsys, "train", flag)
  assert out.startswith("`m3jax train`: warmup or continual training")
  assert "\n  m3jax train --config=configs/demo.py --workdir=runs/demo\n" in out
  flags_at, fields_at = out.index("\nflags:\n"), out.index("config fields it reads most")
  assert flags_at < fields_at
  assert "--workdir: Run directory" in out[flags_at:fields_at]
  assert "--coordinator_address" in out[flags_at:fields_at]  # the multi-host flags it takes
  for line in ("train.steps = 1000", "train.lr = 0.0003", "data.batch_size = 8  # global"):
    assert f"\n  {line}" in out[fields_at:]
  assert "--verbosity" not in out and "--pdb" not in out  # absl's own flags: --helpfull


def test_help_shows_the_given_configs_values(capsys):
  out = help_text(capsys, "train", f"--config={TINY}", "--config.train.lr=0.01", "--help")
  assert "train.steps = 20" in out and "train.lr = 0.01" in out and f"values from {TINY}" in out


def test_helpfull_keeps_every_flag(capsys):
  out = help_text(capsys, "train", "--helpfull")
  assert "train.steps = 1000" in out and "--verbosity" in out and "--pdb" in out


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_command_has_help_with_an_example(capsys, name):
  out = help_text(capsys, *name.split(), "--help")
  assert out.startswith(f"`m3jax {name}`"), out[:200]
  assert f"\n  m3jax {name} " in out, f"the docstring of {cli.COMMANDS[name][0]} needs an example"
  assert "\nflags:\n" in out


def test_help_falls_back_to_the_table_without_docstring_or_fields():
  bare = types.ModuleType("m3jax.commands.costs_bare")
  out = cli.command_help(bare, "costs")
  assert out.startswith("m3jax costs: parameter, storage and FLOP accounting")
  assert "config fields" not in out


def test_top_level_help_lists_commands(capsys):
  out = help_text(capsys, "--help")
  for name in cli.COMMANDS:
    assert f"\n  {name} " in out
