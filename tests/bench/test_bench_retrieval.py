"""`m3jax bench retrieval`: its data, its figures and its command output (no timing checks)."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from m3jax.bench import retrieval as bench_retrieval
from m3jax.retrieval.index import IndexSettings

SMALL = bench_retrieval.BenchSettings(n=3000, dim=16, queries=100, clusters=20, repeats=1)


def test_clustered_vectors_are_unit_deterministic_and_new_queries():
  x, q = bench_retrieval.clustered_vectors(500, 50, 8, clusters=5, spread=0.35, seed=3)
  assert x.shape == (500, 8) and q.shape == (50, 8) and x.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
  x2, q2 = bench_retrieval.clustered_vectors(500, 50, 8, clusters=5, spread=0.35, seed=3)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(q, q2)
  assert not (q[:, None, :] == x[None]).all(-1).any()  # no query is an indexed vector
  # Clustered: a query's best match is far closer than an average vector.
  s = q @ x.T
  assert s.max(1).mean() > 0.8 > s.mean() + 0.5
  with pytest.raises(ValueError, match="spread"):
    bench_retrieval.clustered_vectors(10, 1, 4, clusters=2, spread=0, seed=0)


def test_run_reports_recall_and_throughput_of_the_tuned_index():
  lines = []
  r = bench_retrieval.run(dataclasses.replace(SMALL, faiss=False),
                          IndexSettings(brute_force_below=1000), printer=lines.append)
  (ours,) = r["systems"]
  assert ours["settings"]["mode"] == "tree_ah"
  assert ours["settings"]["tuning"]["met"]
  assert ours["recall"] >= 0.9
  assert ours["qps_batched"] > 0 and ours["qps_single"] > 0 and ours["build_seconds"] > 0
  assert r["faiss_skipped"] == "turned off (--nofaiss)"
  assert any(l.startswith("m3jax ") and "tree_ah" in l for l in lines)
  assert "FAISS skipped: turned off (--nofaiss)" in lines


def test_faiss_runs_beside_at_the_recall_m3jax_reached():
  pytest.importorskip("faiss", reason="the optional `faiss` extra is not installed")
  r = bench_retrieval.run(SMALL, IndexSettings(brute_force_below=1000), printer=None)
  ours, theirs = r["systems"]
  assert theirs["name"].startswith("FAISS IVF")
  # The reported FAISS setting is the fastest swept one reaching m3jax's recall.
  if theirs["reached"]:
    assert theirs["recall"] >= ours["recall"]
    reaching = [p for p in theirs["sweep"] if p["recall"] >= ours["recall"]]
    best = max(reaching, key=lambda p: p["qps_batched"])
    assert (theirs["settings"]["nprobe"], theirs["settings"]["k_factor"]) == (
        best["nprobe"], best["k_factor"])
  assert r["m3jax_over_faiss_batched"] == pytest.approx(
      ours["qps_batched"] / theirs["qps_batched"])


def test_command_prints_the_table_and_writes_json(repo_root, tmp_path):
  out = tmp_path / "r.json"
  # Below build-index's brute-force threshold: exact search, recall 1.
  p = subprocess.run([sys.executable, "-m", "m3jax.cli", "bench", "retrieval", "--n=2000",
                      "--dim=16", "--queries=50", "--clusters=10", "--repeats=1", "--nofaiss",
                      f"--json={out}"], cwd=repo_root, capture_output=True, text=True,
                     timeout=300)
  assert p.returncode == 0, p.stderr
  assert "recall@5" in p.stdout and "FAISS skipped: turned off (--nofaiss)" in p.stdout
  result = json.loads(out.read_text())
  assert result["systems"][0]["settings"]["mode"] == "brute_force"
  assert result["systems"][0]["recall"] == 1.0
  bad = subprocess.run([sys.executable, "-m", "m3jax.cli", "bench", "retrieval", "--n=0"],
                       cwd=repo_root, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1
  assert bad.stderr.strip().splitlines()[-1].startswith("m3jax bench retrieval: error:")
