"""The `m3jax costs` report and command print the paper's figures (docs/model.md "Cost model")."""

import subprocess
import sys

import pytest

from m3jax.core import config as config_lib
from m3jax.model import cost_report
from m3jax.model import costs


@pytest.fixture(scope="module")
def paper(repo_root):
  cfg = config_lib.load_config(str(repo_root / "configs" / "memory3_2p4b.py"), [])
  return config_lib.model_config(cfg)


def test_paper_bank_sizes_in_binary_units(paper):
  r = cost_report.cost_report(paper)
  assert r.references == 1.12e8
  assert round(r.bank_dense_bytes / 2**50, 2) == 7.17
  assert round(r.bank_sparse_bytes / 2**40, 1) == 45.9
  assert round(r.bank_quantized_bytes / 2**40, 2) == 4.02
  # 14.3e9 tokens / 128 is the same bank to within 0.3%.
  exact = costs.PAPER_KB_TOKENS / 128
  assert abs(exact / r.references - 1) < 3e-3


def test_format_report_lists_paper_figures(paper):
  text = cost_report.format_report(cost_report.cost_report(paper, name="memory3_2p4b"))
  for figure in ("2,433,024,000", "72,089,600 B", "450,560 B", "39,424 B", "7.17 PiB",
                 "45.9 TiB", "4.02 TiB", "2.2385e12", "3.0818e11", "1.4418e8", "6.2422e11",
                 "(0.4938, 13,388)", "0.228%", "1.2642e12"):
    assert figure in text, figure


def _run_cli(repo_root, *args):
  return subprocess.run([sys.executable, "-m", "m3jax.commands.costs", *args],
                        cwd=repo_root, capture_output=True, text=True, timeout=120)


def test_costs_command(repo_root):
  out = _run_cli(repo_root, "--config=configs/memory3_2p4b.py", "--references=111718750",
                 "--uses=2,3000")
  assert out.returncode == 0, out.stderr
  assert "72,089,600 B" in out.stdout
  assert "7.15 PiB" in out.stdout  # 14.3e9 / 128 references
  assert "n = 3,000" in out.stdout


def test_costs_command_rejects_bad_uses(repo_root):
  out = _run_cli(repo_root, "--config=configs/tiny.py", "--uses=ten")
  assert out.returncode != 0
  assert "--uses" in out.stderr
