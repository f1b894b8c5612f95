"""Every command's user errors: exit code 1 and exactly one line `m3jax CMD: error: ...`.

The commands run in-process through `m3jax.cli.main` (as the `m3jax` script does), so
the whole table costs the imports once; two subprocess tests check the real entry points.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from m3jax import cli
from m3jax.core import errors
from support import REPO, TINY_WORLD

TINY = str(REPO / "configs" / "tiny.py")
WORLD = [f"--config.{o}" for o in TINY_WORLD]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
  code = cli.main(["m3jax", *argv])
  out, err = capsys.readouterr()
  return code, out, err


def assert_one_line_error(result, command: str, *needles: str) -> str:
  code, _, err = result
  lines = err.strip().splitlines()
  assert code == 1, err
  assert len(lines) == 1, err
  assert lines[0].startswith(f"m3jax {command}: error: "), lines[0]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


# ------------------------------------------------------------------ config and flags


def test_unknown_config_field_names_it_and_suggests(capsys):
  line = assert_one_line_error(
      run_cli(capsys, "costs", f"--config={TINY}", "--config.model.n_layerz=3"), "costs",
      "--config.model.n_layerz", "`n_layers`")
  assert "Traceback" not in line


def test_unknown_config_section(capsys):
  assert_one_line_error(run_cli(capsys, "train", f"--config={TINY}", "--workdir=/tmp/x",
                                "--config.trainz.steps=3"), "train", "trainz", "`train`")


def test_bad_config_value_and_unknown_flag(capsys):
  assert_one_line_error(run_cli(capsys, "costs", f"--config={TINY}", "--config.train.steps=abc"),
                        "costs", "train.steps", "abc")
  assert_one_line_error(run_cli(capsys, "costs", f"--config={TINY}", "--bogus=1"), "costs",
                        "bogus")


def test_heads_not_divisible_by_kv_heads(capsys):
  for argv in (("costs", f"--config={TINY}"), ("train", f"--config={TINY}", "--workdir=/tmp/x"),
               ("prepare-data", f"--config={TINY}", "--workdir=/tmp/x")):
    assert_one_line_error(run_cli(capsys, *argv, "--config.model.n_heads=3"), argv[0],
                          "model.n_heads", "n_kv_heads=2")


def test_relative_config_outside_the_repository(capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert_one_line_error(run_cli(capsys, "costs", "--config=configs/tiny.py"), "costs",
                        "configs/tiny.py", "repository root")


def test_missing_required_flags(capsys):
  assert_one_line_error(run_cli(capsys, "costs"), "costs", "--config")
  assert_one_line_error(run_cli(capsys, "train", f"--config={TINY}"), "train", "--workdir")
  assert_one_line_error(run_cli(capsys, "encode-memory", f"--config={TINY}"), "encode-memory",
                        "--checkpoint")
  assert_one_line_error(run_cli(capsys, "generate", "--prompt=x"), "generate", "--checkpoint")
  assert_one_line_error(run_cli(capsys, "eval"), "eval", "--workdir")
  assert_one_line_error(run_cli(capsys, "tokenizer"), "tokenizer", "--input")
  assert_one_line_error(run_cli(capsys, "convert", "--out=/tmp/x"), "convert", "--from_hf")


@pytest.mark.parametrize("command", ["bench encode", "bench decode", "bench train", "demo",
                                     "build-index", "mine-neighbors"])
def test_config_errors_in_every_config_command(capsys, command):
  argv = command.split() + [f"--config={TINY}", "--workdir=/tmp/x", "--config.model.n_layerz=1"]
  if command.startswith("bench"):
    argv.remove("--workdir=/tmp/x")
  assert_one_line_error(run_cli(capsys, *argv), command, "n_layerz", "`n_layers`")


# ------------------------------------------------------------------ missing inputs


def test_missing_inputs_name_the_path(capsys, tmp_path):
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  cases = [
      (("train", f"--config={TINY}", f"--workdir={empty}"), "train", "prepare-data"),
      (("build-index", f"--config={TINY}", f"--workdir={empty}"), "build-index", empty),
      (("mine-neighbors", f"--config={TINY}", f"--workdir={empty}"), "mine-neighbors", empty),
      (("encode-memory", f"--config={TINY}", f"--checkpoint={empty}/ck",
        f"--references={empty}/data", f"--out={empty}/bank"), "encode-memory", f"{empty}/ck"),
      (("generate", f"--checkpoint={empty}/ck", "--prompt=x"), "generate", f"{empty}/ck"),
      (("eval", f"--workdir={empty}/ck"), "eval", f"{empty}/ck"),
      (("convert", f"--from_hf={empty}/hf", f"--out={empty}/o"), "convert", f"{empty}/hf"),
      (("tokenizer", f"--input={empty}/absent.txt", "--vocab_size=300", f"--out={empty}/t"),
       "tokenizer", "absent.txt"),
      (("prepare-data", f"--config={TINY}", f"--workdir={empty}", "--config.data.corpus=files",
        f"--config.data.files=('{empty}/absent.txt',)"), "prepare-data", "absent.txt"),
      (("generate", f"--checkpoint={empty}", f"--prompts_file={empty}/p.txt"), "generate",
       "p.txt"),
  ]
  for argv, command, needle in cases:
    assert_one_line_error(run_cli(capsys, *argv), command, needle)
  assert not os.path.exists(f"{empty}/config.json")  # a failed start does not pin the model


# ------------------------------------------------------------------ training workdirs


def test_train_refuses_a_missing_init_from(capsys, tiny_prepared, tmp_path):
  _, prepared = tiny_prepared
  assert_one_line_error(
      run_cli(capsys, "train", f"--config={TINY}", *WORLD, f"--workdir={tmp_path}/w",
              f"--config.data.workdir_data={prepared}/data",
              f"--config.train.init_from={tmp_path}/absent"),
      "train", "train.init_from", f"{tmp_path}/absent")
  assert not os.path.exists(f"{tmp_path}/w/config.json")


def test_train_refuses_an_unwritable_workdir(capsys, tiny_prepared, tmp_path):
  _, prepared = tiny_prepared
  blocker = tmp_path / "file"
  blocker.write_text("x")
  assert_one_line_error(
      run_cli(capsys, "train", f"--config={TINY}", *WORLD, f"--workdir={blocker}/w",
              f"--config.data.workdir_data={prepared}/data"), "train", "--workdir", "writable")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_train_refuses_a_read_only_workdir(capsys, tiny_prepared, tmp_path):
  _, prepared = tiny_prepared
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  try:
    assert_one_line_error(
        run_cli(capsys, "train", f"--config={TINY}", *WORLD, f"--workdir={ro}",
                f"--config.data.workdir_data={prepared}/data"), "train", str(ro), "writable")
  finally:
    ro.chmod(0o755)


def test_changed_model_is_refused_only_when_checkpoints_exist(tiny_config, tmp_path):
  from m3jax.core import config as config_lib
  from m3jax.training import loop
  workdir = str(tmp_path)
  config_lib.save_config(tiny_config, os.path.join(workdir, "config.json"))
  changed = tiny_config.copy_and_resolve_references()
  changed.model.n_layers = 3
  changed.model.d_model = 96
  loop.check_run_config(changed, workdir, has_checkpoint=False)  # a failed first start
  with pytest.raises(errors.UserError) as e:
    loop.check_run_config(changed, workdir, has_checkpoint=True)
  assert "model.n_layers: 4 -> 3" in str(e.value) and "model.d_model:" in str(e.value)
  loop.check_run_config(tiny_config, workdir, has_checkpoint=True)


# ------------------------------------------------------------------ interrupts and bugs


def _fail_in(monkeypatch, exc: BaseException) -> None:
  """Makes `m3jax costs` raise `exc` from inside the library call."""
  from m3jax.model import cost_report

  def boom(*args, **kwargs):
    raise exc
  monkeypatch.setattr(cost_report, "cost_report", boom)


def test_ctrl_c_exits_130_with_one_line(capsys, monkeypatch):
  _fail_in(monkeypatch, KeyboardInterrupt())
  code, _, err = run_cli(capsys, "costs", f"--config={TINY}")
  assert code == 130 and len(err.strip().splitlines()) == 1 and "interrupted" in err


def test_a_bug_keeps_its_traceback(capsys, monkeypatch):
  _fail_in(monkeypatch, ZeroDivisionError("a bug"))
  with pytest.raises(ZeroDivisionError):
    cli.main(["m3jax", "costs", f"--config={TINY}"])
  _fail_in(monkeypatch, ValueError("an untagged ValueError is a bug too"))
  with pytest.raises(ValueError):
    cli.main(["m3jax", "costs", f"--config={TINY}"])


def test_traceback_on_request(capsys, monkeypatch):
  _fail_in(monkeypatch, FileNotFoundError("x.json not found"))
  code, _, err = run_cli(capsys, "costs", f"--config={TINY}")
  assert code == 1 and err.strip() == "m3jax costs: error: x.json not found"
  code, _, err = run_cli(capsys, "costs", f"--config={TINY}", "--verbosity=1")
  assert code == 1 and "Traceback" in err and err.strip().endswith("x.json not found")
  monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
  code, _, err = run_cli(capsys, "costs", f"--config={TINY}")
  assert code == 1 and "Traceback" in err


def test_os_errors_read_as_one_line():
  e = PermissionError(13, "Permission denied", "/data/run")
  assert errors.user_message(e) == "/data/run: permission denied; check its permissions or " \
      "choose another path"
  assert errors.user_message(OSError(30, "Read-only file system", "/mnt/ro")).startswith(
      "/mnt/ro: read-only file system")
  assert errors.user_message(RuntimeError("bug")) is None
  assert errors.user_message(errors.InputError("two\nlines")) == "two lines"


# ------------------------------------------------------------------ real entry points


def test_module_entry_point_shares_the_boundary(tmp_path):
  res = subprocess.run([sys.executable, "-m", "m3jax.commands.costs", "--config=configs/tiny.py",
                        "--config.model.n_layerz=3"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert res.returncode == 1
  assert res.stderr.strip().splitlines() == [
      "m3jax costs: error: --config=configs/tiny.py: no such config file (relative to "
      f"{tmp_path}: run from the repository root or give an absolute path)"]


def test_console_script_help(tmp_path):
  res = subprocess.run([sys.executable, "-m", "m3jax.cli", "train", "-h"], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)),
                       cwd=REPO)
  assert res.returncode == 0 and "train.steps" in res.stdout, res.stderr[-2000:]
