"""The training loop: exact resume after SIGKILL, multi-host equivalence, metrics."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from m3jax.core import metrics as metrics_lib
from support import REPO, TINY_WORLD

STEPS = 8
FLAGS = [f"--config.{o}" for o in TINY_WORLD] + [
    f"--config.train.steps={STEPS}", "--config.train.log_every=1",
    "--config.train.checkpoint_every=3", "--config.train.eval_every=0"]


def _workdir(tiny_prepared, tmp_path, name):
  _, src = tiny_prepared
  dst = tmp_path / name
  shutil.copytree(src / "data", dst / "data")
  return dst


def _env(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _train_cmd(workdir, *extra):
  return [sys.executable, "-m", "m3jax.commands.train", "--config", str(REPO / "configs/tiny.py"),
          f"--workdir={workdir}", *FLAGS, *extra]


def _losses(workdir):
  rows = metrics_lib.read_jsonl(str(workdir / "metrics.jsonl"), last_per_step=True)
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def reference_run(tiny_prepared, tmp_path_factory):
  """An uninterrupted run on 8 devices (one process)."""
  wd = _workdir(tiny_prepared, tmp_path_factory.mktemp("ref"), "run")
  subprocess.run(_train_cmd(wd), env=_env(8), check=True, cwd=REPO, timeout=600,
                 capture_output=True)
  return wd


@pytest.mark.slow
def test_metrics_and_checkpoints_written(reference_run):
  losses = _losses(reference_run)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert losses[STEPS] < losses[1]
  tb = metrics_lib.read_tensorboard_scalars(str(reference_run / "tensorboard"))
  for name in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu"):
    assert name in tb, name
  assert sorted(int(d) for d in os.listdir(reference_run / "checkpoints")
                if d.isdigit()) == [3, 6, 8]


@pytest.mark.slow
def test_sigkill_and_restart_continue_bitwise(tiny_prepared, tmp_path, reference_run):
  wd = _workdir(tiny_prepared, tmp_path, "killed")
  proc = subprocess.Popen(_train_cmd(wd), env=_env(8), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (wd / "checkpoints" / "3").is_dir():
    assert proc.poll() is None and time.time() < deadline, "run ended before step 3 was saved"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (wd / "checkpoints" / str(STEPS)).exists()
  subprocess.run(_train_cmd(wd), env=_env(8), check=True, cwd=REPO, timeout=600,
                 capture_output=True)
  ref, got = _losses(reference_run), _losses(wd)
  assert sorted(got) == sorted(ref)
  for step in ref:  # bitwise: same float64 from the same float32
    assert got[step] == ref[step], (step, got[step], ref[step])


@pytest.mark.multiprocess
def test_two_processes_match_one(tiny_prepared, tmp_path, reference_run):
  wd = _workdir(tiny_prepared, tmp_path, "multihost")
  cmd = [sys.executable, "-m", "launch.local", "--num_processes=2", "--devices_per_process=4",
         "--timeout_s=600", "--"] + _train_cmd(wd)
  out = subprocess.run(cmd, cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=700)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  ref, got = _losses(reference_run), _losses(wd)
  assert sorted(got) == sorted(ref)
  np.testing.assert_allclose([got[s] for s in sorted(got)], [ref[s] for s in sorted(ref)],
                             rtol=2e-5)


@pytest.mark.slow
def test_continual_stage_from_warmup_reads_memory(tiny_prepared, tmp_path, reference_run):
  from m3jax.retrieval import neighbors as neighbors_lib
  from m3jax.retrieval import reference_index
  from m3jax.training import loop as train_lib
  cfg, _ = tiny_prepared
  wd = _workdir(tiny_prepared, tmp_path, "continual")
  reference_index.build_reference_index(cfg, str(wd))
  for split in ("train", "validation"):
    neighbors_lib.mine_workdir(cfg, str(wd), split=split, progress_every_s=None)
  c = cfg.copy_and_resolve_references()
  c.train.update(stage="continual", init_from=str(reference_run), steps=3, log_every=1,
                 eval_every=3, checkpoint_every=3)
  out = train_lib.train(c, str(wd))
  assert 0.0 < out["train/memory_chunk_share"] <= 1.0
  assert 0.0 < out["train/memory_attention_mass"] < 1.0
  assert "eval/memory/loss" in out and "eval/no_memory/loss" in out
  # Continual starts from the warmup run's final parameters, not from a fresh init.
  from m3jax.model import params_io
  ctx = train_lib.build_context(c)
  loaded = train_lib._load_init_params(c, ctx)
  _, warm, step = params_io.load_for_inference(str(reference_run))
  assert step == STEPS
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(warm)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_continual_without_neighbor_table_is_refused(tiny_prepared, tmp_path, reference_run):
  from m3jax.training import loop as train_lib
  cfg, _ = tiny_prepared
  wd = _workdir(tiny_prepared, tmp_path, "no_neighbors")
  c = cfg.copy_and_resolve_references()
  c.train.update(stage="continual", init_from=str(reference_run), steps=2)
  with pytest.raises(FileNotFoundError, match="train.stage='continual' trains with memory: "
                     r"run `m3jax build-index`, then `m3jax mine-neighbors`") as e:
    train_lib.train(c, str(wd))
  assert "use_memory" not in str(e.value)


def test_missing_neighbors_advice_fits_what_was_set(tiny_config, tmp_path):
  from m3jax.training import loop as train_lib
  root = str(tmp_path / "data")
  c = tiny_config.copy_and_resolve_references()
  c.train.stage = "continual"
  msg = train_lib.missing_neighbors_message(c, root)
  assert msg.startswith(f"{root}/neighbors/train: no neighbor table, but train.stage="
                        "'continual' trains with memory: run `m3jax build-index`, then "
                        "`m3jax mine-neighbors` with the same --config and --workdir first")
  assert "use_memory" not in msg
  os.makedirs(os.path.join(root, "index"))
  c.train.update(stage="warmup", use_memory=True)
  msg = train_lib.missing_neighbors_message(c, root)
  assert "build-index" not in msg and msg.endswith(
      "train.use_memory=True in train.stage='warmup' trains with memory: run `m3jax "
      "mine-neighbors` with the same --config and --workdir first; or drop "
      "train.use_memory=True to train without memory")
