"""The memory bank: opening checks, lookups, LRU cache, prefetch, checksums, cold start."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.memory import bank_format
from m3jax.memory import bank_reader
from m3jax.memory import cold_start
from m3jax.memory import encode_job
from m3jax.memory import encoder as encoder_lib
from m3jax.core.config import model_config
from m3jax.memory.source import ArrayReferenceStore, EncodeOnTheFly, LRUCache
from m3jax.model.transformer import Transformer, init_params

N_REFS = 40  # 3 shards of 16 (the last one partly padding), batches of 8


@pytest.fixture(scope="module")
def setup(tiny_config):
  mc = model_config(tiny_config)
  params = init_params(mc, jax.random.key(0))
  store = ArrayReferenceStore.random(N_REFS, mc.reference_length, mc.vocab_size, seed=1,
                                     tokenizer_hash="tok-a")
  settings = bank_format.bank_settings(tiny_config, shard_size=16, encode_batch_size=8,
                                    cache_memories=8)
  encoder = encoder_lib.ReferenceEncoder(mc, params, settings.encode_batch_size)
  return dict(mc=mc, params=params, store=store, settings=settings, encoder=encoder,
              checkpoint=bank_format.checkpoint_info("/ckpt/a", 7, params))


@pytest.fixture(scope="module")
def warm_dir(setup, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("warm"))
  encode_job.encode_bank(root, encoder=setup["encoder"], references=setup["store"],
                         settings=setup["settings"], checkpoint=setup["checkpoint"],
                         printer=lambda _: None)
  return root


def _open(setup, root, **kw):
  kw.setdefault("tokenizer_hash", "tok-a")
  return bank_reader.MemoryBank.open(root, model_config=setup["mc"], **kw)


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return str(dst)


def _tree_bytes(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = fh.read()
  return out


# ------------------------------------------------------------------ lookups


def test_lookup_returns_stored_memories_masks_and_zeros_for_missing_ids(setup, warm_dir):
  with _open(setup, warm_dir, dtype=np.float32) as bank:
    ids = np.array([5, -1, 39, 5])
    mem, mask = bank.lookup(ids)
    assert mem.shape == (4,) + setup["mc"].memory_shape and mask.shape == (4, 2, 2, 4)
    assert not mask[1].any() and not mem[1].any()
    np.testing.assert_array_equal(mem[0], mem[3])
    pos = bank.lookup_positions(ids)
    np.testing.assert_array_equal(mask, pos >= 0)
    # Kept positions lie in the reference span [P, P + length).
    p = setup["mc"].prefix_length
    _, lengths = setup["store"].tokens_by_ids(np.array([5]))
    kept = pos[0][pos[0] >= 0]
    assert kept.min() >= p and kept.max() < p + lengths[0]


def test_default_dtype_is_bfloat16(setup, warm_dir):
  with _open(setup, warm_dir) as bank:
    mem, _ = bank.lookup(np.array([0]))
    assert mem.dtype == jnp.bfloat16


def test_lru_cache_statistics_on_a_known_pattern():
  cache = LRUCache(2)
  for key in [0, 1, 0, 2, 1, 0]:
    if cache.get(key) is None:
      cache.put(key, key)
  s = cache.stats()
  # 0 miss, 1 miss, 0 hit, 2 miss (evicts 1), 1 miss (evicts 0), 0 miss (evicts 2)
  assert (s["hits"], s["misses"], s["evictions"], s["size"]) == (1, 5, 3, 2)
  assert s["hit_rate"] == pytest.approx(1 / 6)


def test_bank_cache_counts_distinct_ids_per_lookup_and_can_be_turned_off(setup, warm_dir):
  with _open(setup, warm_dir, cache_memories=2) as bank:
    for ids in ([0], [1], [0], [2], [1], [0], [3, 3, -1]):
      bank.lookup(np.array(ids))
    s = bank.stats()
    assert (s["cache_hits"], s["cache_misses"], s["cache_evictions"]) == (1, 6, 4)
    assert s["records_read"] == 6
  with _open(setup, warm_dir, cache_memories=0) as bank:
    a, _ = bank.lookup(np.array([4, 4]))
    b, _ = bank.lookup(np.array([4]))
    s = bank.stats()
    assert (s["cache_hits"], s["cache_misses"], s["cache_size"]) == (0, 2, 0)
    np.testing.assert_array_equal(a[0], b[0])


def test_prefetch_loads_ids_ahead_so_lookups_hit(setup, warm_dir):
  with _open(setup, warm_dir, prefetch=True) as bank:
    bank.prefetch(np.array([3, 20, -1]))
    bank.wait_prefetch()
    mem, _ = bank.lookup(np.array([3, 20]))
    s = bank.stats()
    assert s["prefetched"] == 2 and s["cache_hits"] == 2 and s["cache_misses"] == 0
  with _open(setup, warm_dir, prefetch=False) as plain:
    np.testing.assert_array_equal(plain.lookup(np.array([3, 20]))[0], mem)


def test_out_of_range_ids_are_refused(setup, warm_dir):
  with _open(setup, warm_dir) as bank:
    with pytest.raises(IndexError, match="40"):
      bank.lookup(np.array([40]))


# ------------------------------------------------------------------ checks on open


def test_corrupt_shard_is_detected_and_named(setup, warm_dir, tmp_path):
  root = _copy(warm_dir, tmp_path / "bank")
  path = os.path.join(root, bank_format.shard_file(1))
  data = bytearray(open(path, "rb").read())
  data[-5] ^= 0xFF  # flip a byte inside the last record
  open(path, "wb").write(bytes(data))
  with _open(setup, root) as bank:  # verify="touch": sizes fine, sha256 on first read
    bank.lookup(np.array([0]))  # shard 0 is intact
    with pytest.raises(bank_format.CorruptShardError, match="shard-000001.npy"):
      bank.lookup(np.array([17]))
  with pytest.raises(bank_format.CorruptShardError, match="shard-000001.npy"):
    _open(setup, root, verify="full")


def test_truncated_shard_is_detected_on_open(setup, warm_dir, tmp_path):
  root = _copy(warm_dir, tmp_path / "bank")
  path = os.path.join(root, bank_format.shard_file(2))
  os.truncate(path, os.path.getsize(path) - 10)
  with pytest.raises(bank_format.CorruptShardError, match="shard-000002.npy.*bytes"):
    _open(setup, root, verify="size")


def test_shard_files_outside_the_bank_are_refused(setup, warm_dir, tmp_path):
  """A manifest naming `..`, an absolute path or a symlink out is refused, even when the
  file there has the right size and sha256."""
  from m3jax.core import artifacts
  root = _copy(warm_dir, tmp_path / "bank")
  outside = str(tmp_path / "elsewhere.npy")
  os.replace(os.path.join(root, bank_format.shard_file(1)), outside)
  os.symlink(outside, os.path.join(root, bank_format.shard_file(1)))
  mpath = os.path.join(root, bank_format.MANIFEST_FILE)
  manifest = bank_format.read_json(mpath)
  for rel, shown in [("../elsewhere.npy", r"\.\./elsewhere.npy"), (outside, outside),
                     (bank_format.shard_file(1), "symlink")]:
    manifest["shards"][1]["file"] = rel
    artifacts.write_json(mpath, manifest)
    with pytest.raises(artifacts.UnsafePathError, match=f"shard file.*{shown}"):
      _open(setup, root, verify="size")
    with _open(setup, root, verify="none") as bank:
      bank.lookup(np.array([0]))
      with pytest.raises(artifacts.UnsafePathError, match=shown):
        bank.lookup(np.array([17]))


def test_bank_of_another_model_config_is_refused(setup, warm_dir):
  other = dataclasses.replace(setup["mc"], memory_tokens_per_head=2)
  with pytest.raises(bank_format.BankMismatchError, match="memory_tokens_per_head"):
    bank_reader.MemoryBank.open(warm_dir, model_config=other, tokenizer_hash="tok-a")
  other = dataclasses.replace(setup["mc"], reference_prefix_ids=(2, 5))
  with pytest.raises(bank_format.BankMismatchError, match="reference_prefix_ids"):
    bank_reader.MemoryBank.open(warm_dir, model_config=other, tokenizer_hash="tok-a")
  # The compute dtype does not change what a memory is.
  ok = dataclasses.replace(setup["mc"], dtype="bfloat16")
  bank_reader.MemoryBank.open(warm_dir, model_config=ok, tokenizer_hash="tok-a").close()


def test_bank_of_another_tokenizer_checkpoint_or_params_is_refused(setup, warm_dir):
  with pytest.raises(bank_format.BankMismatchError, match="tokenizer hash"):
    _open(setup, warm_dir, tokenizer_hash="tok-b")
  with pytest.raises(bank_format.BankMismatchError, match="step 7"):
    _open(setup, warm_dir, checkpoint_step=8)
  other = init_params(setup["mc"], jax.random.key(1))
  with pytest.raises(bank_format.BankMismatchError, match="other parameters"):
    _open(setup, warm_dir, params=other)
  with pytest.raises(bank_format.BankMismatchError, match="quantization"):
    _open(setup, warm_dir, quantization="pq")
  _open(setup, warm_dir, params=setup["params"], checkpoint_step=7).close()


def test_incomplete_bank_is_refused_with_progress(setup, tmp_path):
  root = str(tmp_path / "partial")
  encode_job.encode_bank(root, encoder=setup["encoder"], references=setup["store"],
                         settings=setup["settings"], max_shards=1, printer=lambda _: None)
  with pytest.raises(bank_format.IncompleteBankError, match="1 of 3 shards"):
    _open(setup, root)


# ------------------------------------------------------------------ cold start / on the fly


def test_cold_start_stores_exactly_what_warm_start_would_have(setup, warm_dir, tmp_path):
  root = str(tmp_path / "cold")
  cold = cold_start.ColdStartBank.create(root, encoder=setup["encoder"],
                                       references=setup["store"], settings=setup["settings"],
                                       checkpoint=setup["checkpoint"])
  with _open(setup, warm_dir) as warm:
    ids = np.array([17, 3, -1, 17])
    got, got_mask = cold.lookup(ids)
    want, want_mask = warm.lookup(ids)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(got_mask, want_mask)
    assert cold.stats()["encoded_batches"] == 2  # the batches holding 17 and 3
    cold.lookup(np.array([3]))  # reused: no new encoding
    assert cold.stats()["encoded_batches"] == 2
    assert not cold.complete
  cold.encode_all()
  assert cold.complete
  cold.close()
  assert _tree_bytes(root) == _tree_bytes(warm_dir)


@pytest.mark.slow
def test_encode_on_the_fly_matches_the_model(setup):
  mc, params, store = setup["mc"], setup["params"], setup["store"]
  src = EncodeOnTheFly(Transformer(mc), params, store)
  ids = np.array([2, -1, 9, 2])
  mem, mask = src.lookup(ids)
  tokens, lengths = store.tokens_by_ids(np.array([2, 9]))
  ref, pos = Transformer(mc).apply({"params": params}, tokens, lengths,
                                   method="encode_references")
  np.testing.assert_allclose(np.asarray(mem)[[0, 2]], np.asarray(ref), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(mask)[[0, 2]], np.asarray(pos) >= 0)
  assert not np.asarray(mask)[1].any() and not np.asarray(mem)[1].any()
  assert src.stats()["encoded"] == 2
