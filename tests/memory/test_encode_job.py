"""The offline encoding job: correctness, resume after SIGKILL, multi-process, pq, CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.core import artifacts
from m3jax.memory import bank_format
from m3jax.memory import bank_reader
from m3jax.memory import bank_storage
from m3jax.memory import codecs
from m3jax.memory import encode_job
from m3jax.memory import encoder as encoder_lib
from m3jax.model import costs
from m3jax.core.config import model_config
from m3jax.memory.source import ArrayReferenceStore
from m3jax.model.transformer import Transformer, init_params

N_REFS = 44  # shard size 8 -> 6 shards, the last one half padding

# A separate process running the job on the same inputs as the `setup` fixture.
DRIVER = r"""
import json, os, sys, time
mode, out = sys.argv[1], sys.argv[2]
if mode == "distributed":
  from m3jax.core import distributed
  distributed.initialize(timeout_s=120)
import jax
from m3jax.memory import bank_format
from m3jax.memory import encode_job
from m3jax.memory import encoder as encoder_lib
from m3jax.core.config import load_config, model_config
from m3jax.memory.source import ArrayReferenceStore
from m3jax.model.transformer import init_params
cfg = load_config(os.path.join(os.environ["REPO"], "configs", "tiny.py"))
mc = model_config(cfg)
params = init_params(mc, jax.random.key(0))
store = ArrayReferenceStore.random(int(os.environ["N_REFS"]), mc.reference_length,
                                   mc.vocab_size, seed=1, tokenizer_hash="tok-a")
settings = bank_format.bank_settings(cfg, shard_size=8, encode_batch_size=8)
encoder = encoder_lib.ReferenceEncoder(mc, params, 8)
sleep = float(os.environ.get("SLEEP_PER_SHARD", "0"))
result = encode_job.encode_bank(
    out, encoder=encoder, references=store, settings=settings,
    checkpoint=bank_format.checkpoint_info("/ckpt/a", 7, params),
    on_shard=lambda s, info: time.sleep(sleep), progress_every_s=1e9)
with open(os.path.join(os.environ["RESULT_DIR"], f"result-{jax.process_index()}.json"),
          "w") as f:
  json.dump(dict(encoded=result.shards_encoded, manifest_written=result.manifest_written,
                 complete=result.complete), f)
"""


@pytest.fixture(scope="module")
def setup(tiny_config, repo_root):
  mc = model_config(tiny_config)
  params = init_params(mc, jax.random.key(0))
  store = ArrayReferenceStore.random(N_REFS, mc.reference_length, mc.vocab_size, seed=1,
                                     tokenizer_hash="tok-a")
  settings = bank_format.bank_settings(tiny_config, shard_size=8, encode_batch_size=8)
  encoder = encoder_lib.ReferenceEncoder(mc, params, 8)
  return dict(cfg=tiny_config, mc=mc, params=params, store=store, settings=settings,
              encoder=encoder, repo=str(repo_root),
              checkpoint=bank_format.checkpoint_info("/ckpt/a", 7, params))


def _encode(setup, root, **kw):
  kw.setdefault("checkpoint", setup["checkpoint"])
  return encode_job.encode_bank(str(root), encoder=setup["encoder"], references=setup["store"],
                                settings=kw.pop("settings", setup["settings"]),
                                printer=kw.pop("printer", lambda _: None), **kw)


@pytest.fixture(scope="module")
def reference_bank(setup, tmp_path_factory):
  root = tmp_path_factory.mktemp("uninterrupted")
  _encode(setup, root)
  return str(root)


def _tree_bytes(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = fh.read()
  return out


def _env(setup, tmp_path, **extra):
  env = dict(os.environ, REPO=setup["repo"], N_REFS=str(N_REFS), RESULT_DIR=str(tmp_path),
             JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
             PYTHONPATH=setup["repo"])
  env.update(extra)
  return env


# ------------------------------------------------------------------ correctness


@pytest.mark.slow
def test_stored_memories_equal_the_models_encoding_in_bfloat16(setup, reference_bank):
  mc, params, store = setup["mc"], setup["params"], setup["store"]
  ids = np.arange(N_REFS)
  tokens, lengths = store.tokens_by_ids(ids)
  ref, pos = Transformer(mc).apply({"params": params}, tokens, lengths,
                                   method="encode_references")
  want = np.asarray(ref.astype(jnp.bfloat16).astype(jnp.float32))
  with bank_reader.MemoryBank.open(reference_bank, model_config=mc, tokenizer_hash="tok-a",
                                dtype=np.float32) as bank:
    got, mask = bank.lookup(ids)
    np.testing.assert_array_equal(bank.lookup_positions(ids), np.asarray(pos))
    # Padding rows of the last shard are empty records.
    tail = bank.read_records(np.array([N_REFS - 1]))
    assert tail.dtype.names == ("kv", "pos")
  np.testing.assert_array_equal(mask, np.asarray(pos) >= 0)
  # Other batch shapes round float32 differently in the last bit, which can move a
  # bfloat16 value by one step; everything else is identical.
  np.testing.assert_allclose(got, want, rtol=2**-7, atol=1e-6)
  assert np.mean(got == want) > 0.999


def test_manifest_records_what_made_the_bank(setup, reference_bank):
  m = json.load(open(os.path.join(reference_bank, bank_format.MANIFEST_FILE)))
  mc = setup["mc"]
  assert m["complete"] and m["model"]["fingerprint"] == mc.fingerprint()
  assert m["tokenizer_hash"] == "tok-a"
  assert m["checkpoint"]["step"] == 7 and m["checkpoint"]["path"] == "/ckpt/a"
  assert m["sparsification"]["memory_layers"] == list(mc.memory_layers)
  assert m["sparsification"]["reference_prefix_ids"] == list(mc.reference_prefix_ids)
  assert m["references"]["count"] == N_REFS
  assert m["layout"]["num_shards"] == 6 and len(m["shards"]) == 6
  assert m["storage"]["method"] == "none"
  assert m["totals"]["tokens"] == int(setup["store"].lengths.sum())
  for info in m["shards"]:
    path = os.path.join(reference_bank, info["file"])
    assert os.path.getsize(path) == info["bytes"]
    assert artifacts.sha256_file(path) == info["sha256"]
  # Storage accounting agrees with m3jax.model.costs.
  s = bank_storage.storage_summary(reference_bank, mc)
  assert s["kv_bytes_per_memory"] == costs.memory_bytes_per_reference(mc)
  assert s["record_bytes"] == s["kv_bytes_per_memory"] + 2 * 2 * 2 * 4  # int16 positions
  assert s["bank_bytes"] == sum(i["bytes"] for i in m["shards"])


def test_rerun_skips_verified_shards_and_reencodes_a_corrupt_one(setup, reference_bank,
                                                                 tmp_path):
  import shutil
  root = str(tmp_path / "bank")
  shutil.copytree(reference_bank, root)
  path = os.path.join(root, bank_format.shard_file(3))
  data = bytearray(open(path, "rb").read())
  data[200] ^= 1
  open(path, "wb").write(bytes(data))
  r = _encode(setup, root)
  assert r.shards_reencoded == [3] and r.shards_encoded == [3]
  assert sorted(r.shards_skipped) == [0, 1, 2, 4, 5]
  assert _tree_bytes(root) == _tree_bytes(reference_bank)


def test_resume_with_other_settings_is_refused(setup, reference_bank, tmp_path):
  import shutil
  root = str(tmp_path / "bank")
  shutil.copytree(reference_bank, root)
  other = bank_format.bank_settings(setup["cfg"], shard_size=16, encode_batch_size=8)
  with pytest.raises(bank_format.BankMismatchError, match="shard_size"):
    _encode(setup, root, settings=other)


# ------------------------------------------------------------------ resumability


@pytest.mark.slow
def test_job_killed_midway_and_rerun_gives_identical_bytes(setup, reference_bank, tmp_path):
  root = str(tmp_path / "killed")
  script = tmp_path / "driver.py"
  script.write_text(DRIVER)
  proc = subprocess.Popen([sys.executable, str(script), "single", root],
                          env=_env(setup, tmp_path, SLEEP_PER_SHARD="0.5"),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  shards = os.path.join(root, bank_format.SHARDS_DIR)
  deadline = time.monotonic() + 240
  try:
    while time.monotonic() < deadline:
      done = [f for f in os.listdir(shards) if f.endswith(".npy")] if os.path.isdir(
          shards) else []
      if len(done) >= 2 or proc.poll() is not None:
        break
      time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  assert not os.path.exists(os.path.join(root, bank_format.MANIFEST_FILE))
  n_done = len([f for f in os.listdir(shards) if f.endswith(".npy")])
  assert 2 <= n_done < 6
  # A torn write from the killed run: must not be taken for a shard.
  with open(os.path.join(root, bank_format.shard_file(5)) + ".tmp-host-1-2", "wb") as f:
    f.write(b"half a shard")
  r = _encode(setup, root)
  assert len(r.shards_skipped) == n_done and r.complete
  assert _tree_bytes(root) == _tree_bytes(reference_bank)


def test_max_shards_stops_early_and_a_rerun_finishes(setup, reference_bank, tmp_path):
  root = str(tmp_path / "sliced")
  r = _encode(setup, root, max_shards=4)
  assert r.shards_encoded == [0, 1, 2, 3] and not r.complete
  r = _encode(setup, root)
  assert r.shards_encoded == [4, 5] and r.complete
  assert _tree_bytes(root) == _tree_bytes(reference_bank)


# ------------------------------------------------------------------ several processes


def test_independent_processes_share_shards_and_the_last_writes_the_manifest(
    setup, reference_bank, tmp_path):
  root = str(tmp_path / "split")
  a = _encode(setup, root, process_index=1, process_count=2)
  assert a.shards_encoded == [1, 3, 5] and not a.complete
  b = _encode(setup, root, process_index=0, process_count=2)
  assert b.shards_encoded == [0, 2, 4] and b.manifest_written
  assert _tree_bytes(root) == _tree_bytes(reference_bank)


@pytest.mark.multiprocess
def test_two_jax_processes_encode_every_reference_exactly_once(setup, reference_bank,
                                                               tmp_path):
  sys.path.insert(0, setup["repo"])
  from launch.local import free_port
  root = str(tmp_path / "multi")
  script = tmp_path / "driver.py"
  script.write_text(DRIVER)
  port = free_port()
  procs = []
  for pid in range(2):
    env = _env(setup, tmp_path, M3JAX_COORDINATOR=f"127.0.0.1:{port}", M3JAX_NUM_PROCESSES="2",
               M3JAX_PROCESS_ID=str(pid),
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs.append(subprocess.Popen([sys.executable, str(script), "distributed", root], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  try:
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  results = [json.load(open(tmp_path / f"result-{i}.json")) for i in range(2)]
  assert results[0]["encoded"] == [0, 2, 4] and results[1]["encoded"] == [1, 3, 5]
  assert results[0]["manifest_written"] and not results[1]["manifest_written"]
  assert all(r["complete"] for r in results)
  mc = setup["mc"]
  ids = np.arange(N_REFS)
  with bank_reader.MemoryBank.open(root, model_config=mc, tokenizer_hash="tok-a",
                                verify="full", dtype=np.float32) as multi, \
      bank_reader.MemoryBank.open(reference_bank, model_config=mc, tokenizer_hash="tok-a",
                               dtype=np.float32) as single:
    # 2 devices per process instead of 8: same memories up to float rounding.
    np.testing.assert_allclose(multi.lookup(ids)[0], single.lookup(ids)[0], rtol=2**-7,
                               atol=1e-6)
    np.testing.assert_array_equal(multi.lookup_positions(ids), single.lookup_positions(ids))


# ------------------------------------------------------------------ quantized banks


def test_pq_bank_stores_codes_and_decodes_on_lookup(setup, reference_bank, tmp_path):
  settings = bank_format.bank_settings(setup["cfg"], shard_size=8, encode_batch_size=8,
                                    quantization="pq", pq_subvectors=(4, 2),
                                    pq_train_references=40, pq_iterations=4)
  root = str(tmp_path / "pq")
  r = _encode(setup, root, settings=settings)
  assert r.complete
  mc = setup["mc"]
  m = json.load(open(os.path.join(root, bank_format.MANIFEST_FILE)))
  assert m["storage"]["method"] == "pq" and m["storage"]["bytes_per_vector"] == 6
  assert m["storage"]["quantizer_sha256"] == artifacts.sha256_file(
      os.path.join(root, bank_format.QUANTIZER_FILE))
  ids = np.arange(N_REFS)
  with bank_reader.MemoryBank.open(root, model_config=mc, tokenizer_hash="tok-a",
                                dtype=np.float32) as pq_bank, \
      bank_reader.MemoryBank.open(reference_bank, model_config=mc, tokenizer_hash="tok-a",
                               dtype=np.float32) as bf16:
    assert pq_bank.read_records(ids[:1]).dtype.names == ("kv_codes", "pos")
    exact, mask = bf16.lookup(ids)
    approx, mask_q = pq_bank.lookup(ids)
    np.testing.assert_array_equal(mask, mask_q)
    np.testing.assert_allclose(approx, pq_bank.codec.round_trip(exact), rtol=1e-5, atol=1e-6)
    err = codecs.relative_mse(exact * mask[:, :, None, ..., None],
                                 approx * mask[:, :, None, ..., None])
    assert 0 < err < 0.5
  s = bank_storage.storage_summary(root, mc)
  assert s["kv_bytes_per_memory"] == costs.quantized_memory_bytes_per_reference(mc, 6)
  # Rerun: the saved quantizer is reused and every shard is skipped.
  r = _encode(setup, root, settings=settings)
  assert r.shards_encoded == [] and r.complete


def test_int8_bank_round_trip(setup, reference_bank, tmp_path):
  settings = bank_format.bank_settings(setup["cfg"], shard_size=8, encode_batch_size=8,
                                    quantization="int8")
  root = str(tmp_path / "int8")
  _encode(setup, root, settings=settings)
  mc = setup["mc"]
  ids = np.arange(N_REFS)
  with bank_reader.MemoryBank.open(root, model_config=mc, tokenizer_hash="tok-a",
                                quantization="int8", dtype=np.float32) as b8, \
      bank_reader.MemoryBank.open(reference_bank, model_config=mc, tokenizer_hash="tok-a",
                               dtype=np.float32) as bf16:
    assert codecs.relative_mse(bf16.lookup(ids)[0], b8.lookup(ids)[0]) < 1e-4
    assert b8.bytes_per_memory == 2 * 2 * 2 * 4 * (16 + 2) + 2 * 2 * 4 * 2


# ------------------------------------------------------------------ the command


def _write_reference_dataset(store, path):
  from data_pipeline import tfds_builders

  def shard():
    for i in range(len(store)):
      toks = store.tokens[i, :store.lengths[i]]
      yield i, dict(ref_id=i, doc_id=i, doc_key=i, piece=0, tokens=toks, text=f"ref {i}")

  return tfds_builders.write_dataset(
      tfds_builders.M3jaxReferences, path, features=tfds_builders.REFERENCE_FEATURES,
      shards={"train": [shard]}, metadata=dict(tokenizer_hash=store.tokenizer_hash,
                                               reference_length=store.reference_length,
                                               pad_id=0))


@pytest.mark.slow
def test_command_resumes_a_bank_and_refuses_a_mismatched_checkpoint(setup, reference_bank,
                                                                    tmp_path):
  from data_pipeline.references import ReferenceStore
  from m3jax.model import params_io
  refs = _write_reference_dataset(setup["store"], str(tmp_path / "refs"))
  store = ReferenceStore(refs)
  ckpt = str(tmp_path / "params")
  params_io.save_params(ckpt, setup["params"], setup["cfg"])
  out = str(tmp_path / "bank")
  # First part in this process, the rest through the command line.
  encode_job.encode_bank(out, encoder=setup["encoder"], references=store,
                         settings=setup["settings"], max_shards=2, printer=lambda _: None,
                         checkpoint=bank_format.checkpoint_info(ckpt, None, setup["params"]),
                         references_source=store.path)
  cmd = [sys.executable, "-m", "m3jax.commands.encode_memory",
         f"--config={setup['repo']}/configs/tiny.py", "--config.bank.shard_size=8",
         "--config.bank.encode_batch_size=8", f"--checkpoint={ckpt}", f"--references={refs}",
         f"--out={out}"]
  res = subprocess.run(cmd, env=_env(setup, tmp_path), capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "2 already done, 4 to encode" in res.stdout and "storage:" in res.stdout
  got, want = _tree_bytes(out), _tree_bytes(reference_bank)
  # Same shards as the in-memory store; only the recorded sources differ.
  assert {k: v for k, v in got.items() if k.startswith("shards/")} == \
      {k: v for k, v in want.items() if k.startswith("shards/")}
  manifest = json.loads(got["manifest.json"])
  assert manifest["checkpoint"]["path"] == ckpt and manifest["references"]["source"] == refs
  # A config whose model differs from the checkpoint's is refused, naming the field.
  res = subprocess.run(cmd + ["--config.model.memory_tokens_per_head=2",
                              f"--out={tmp_path / 'other'}"], env=_env(setup, tmp_path),
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 1 and "memory_tokens_per_head" in res.stderr
