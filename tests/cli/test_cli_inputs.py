"""Corpus and artifact inputs at the command line: exit code 1 and one line naming the
file or field (a too-small corpus, bad records, a manifest path leaving its directory)."""

from __future__ import annotations

import json
import os

from data_pipeline import prepared
from m3jax.core import artifacts
from support import TINY_WORLD
from test_cli_errors import TINY, assert_one_line_error, run_cli


def _prepare(tmp_path, name, *extra):
  return ("prepare-data", f"--config={TINY}", f"--workdir={tmp_path / name}",
          "--config.data.corpus=files", *extra)


def test_prepare_data_corpus_errors_are_one_line(capsys, tmp_path):
  one = tmp_path / "one.txt"
  one.write_text("a single document\nof two lines\n")
  assert_one_line_error(run_cli(capsys, *_prepare(tmp_path, "w1", f"--config.data.files=('{one}',)")),
                        "prepare-data", "one.txt", "too small to split",
                        "--config.data.eval_fraction=0")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"text": "ok"}\n{"text": \n')
  assert_one_line_error(run_cli(capsys, *_prepare(tmp_path, "w2", f"--config.data.files=('{bad}',)")),
                        "prepare-data", "bad.jsonl", "line 2", "invalid JSON")
  assert_one_line_error(
      run_cli(capsys, *_prepare(tmp_path, "w3", f"--config.data.files=('{bad}',)",
                                "--config.data.bad_records=drop")),
      "prepare-data", "data.bad_records", "skip")


def test_a_data_manifest_path_leaving_its_directory_is_one_line(capsys, tmp_path):
  root = tmp_path / "w" / "data"
  root.mkdir(parents=True)
  artifacts.write_json(str(root / "manifest.json"), dict(
      format=prepared.FORMAT, tokenizer=dict(path="../../../etc/passwd", hash="0" * 64),
      datasets=dict(references=dict(path="/etc"), packed=dict(path="/etc"))))
  world = [f"--config.{o}" for o in TINY_WORLD]
  line = assert_one_line_error(
      run_cli(capsys, "build-index", f"--config={TINY}", f"--workdir={tmp_path / 'w'}", *world),
      "build-index", "manifest.json")
  assert "'/etc'" in line or "'../../../etc/passwd'" in line
