"""Live knowledge edits (`m3jax bank update`): what changes, what does not, atomicity, resume."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from data_pipeline import prepared
from m3jax.core import workspace
from m3jax.memory import bank_edits
from m3jax.memory import bank_format
from m3jax.memory import edit_job
from m3jax.memory import encode_job
from m3jax.memory import encoder as encoder_lib
from m3jax.memory.bank_reader import MemoryBank
from m3jax.model import params_io
from m3jax.model.transformer import init_params
from m3jax.retrieval import retriever as retriever_lib

# The module fixture prepares, indexes and encodes a tiny knowledge base (~60 s on 2 cores).
pytestmark = pytest.mark.slow

NEW_TEXT = "Zorblat Quux was born in Underhill."
ADDED = "Quirina Vossberg studied underwater basket weaving at the Academy of Brell."


@pytest.fixture(scope="module")
def kb(tiny_knowledge_base, tmp_path_factory):
  """The shared tiny knowledge base (tests/conftest.py) and this module's edit files."""
  edits = tmp_path_factory.mktemp("edits")
  (edits / "replace.jsonl").write_text(json.dumps(dict(ref_id=5, text=NEW_TEXT)) + "\n")
  (edits / "add.jsonl").write_text(json.dumps(dict(text=ADDED)) + "\n")
  return dict(tiny_knowledge_base, replace=str(edits / "replace.jsonl"),
              add=str(edits / "add.jsonl"))


def _copy_bank(kb, tmp_path):
  dst = tmp_path / "bank"
  shutil.copytree(kb["work"] / "bank", dst)
  return str(dst)


def _apply(kb, bank, **kw):
  return edit_job.run(bank, add=kb["add"], replace=kb["replace"], delete="7,70",
                      printer=lambda _: None, **kw)


def _open(kb, bank):
  tok = prepared.open_tokenizer(kb["root"])
  return MemoryBank.open(bank, model_config=kb["mc"], tokenizer_hash=tok.hash,
                         params=kb["params"], dtype=np.float32)


def _views(kb, bank_dir, meta):
  """(retriever, references) of the bank's version, as m3jax.inference.session builds them."""
  tok = prepared.open_tokenizer(kb["root"])
  refs = prepared.open_references(kb["root"])
  retriever = retriever_lib.load_retriever(
      workspace.index_dir_of_root(kb["root"]), k=3, references=refs, tokenize=tok.encode,
      overlap_threshold=None)
  return bank_edits.apply_to_retriever(bank_dir, meta, retriever, refs)


@pytest.fixture(scope="module")
def edited(kb, tmp_path_factory):
  bank = _copy_bank(kb, tmp_path_factory.mktemp("edited"))
  with _open(kb, bank) as before_bank:
    n = before_bank.num_references
    before = before_bank.lookup(np.arange(n))
  result = _apply(kb, bank)
  return dict(bank=bank, n=n, before=before, result=result)


def test_edit_changes_exactly_the_edited_memories(kb, edited):
  n = edited["n"]
  assert edited["result"].version == 1
  assert edited["result"].replaced == [5] and edited["result"].deleted == [7, 70]
  added = edited["result"].added
  assert added == [n, n + 1]  # the added document is cut into two references
  with _open(kb, edited["bank"]) as bank:
    assert bank.num_references == n + 2
    mem, mask = bank.lookup(np.arange(n + 2))
    meta = bank.meta
  old_mem, old_mask = edited["before"]
  same = np.setdiff1d(np.arange(n), [5, 7, 70])
  np.testing.assert_array_equal(mem[same], old_mem[same])
  np.testing.assert_array_equal(mask[same], old_mask[same])
  assert not mask[[7, 70]].any() and not mem[[7, 70]].any()  # deleted: nothing to read
  # Replaced and added memories are the model's encoding of the new texts.
  _, refs = _views(kb, edited["bank"], meta)
  enc = encoder_lib.ReferenceEncoder(kb["mc"], kb["params"], 16)
  want, pos = encoder_lib.encode_ids(enc, refs, np.asarray([5, n, n + 1]))
  np.testing.assert_array_equal(mem[[5, n, n + 1]], want)
  np.testing.assert_array_equal(mask[[5, n, n + 1]], pos >= 0)
  assert not np.array_equal(mem[5], old_mem[5])
  texts = refs.texts_by_ids([5, n, n + 1, 7])
  assert texts[0] == NEW_TEXT and texts[3] == ""
  assert (texts[1] + texts[2]).replace(" ", "") == ADDED.replace(" ", "")
  assert meta["version"] == 1 and meta["edits"][0]["replaced"] == [5]
  assert meta["layout"]["num_shards"] == bank_format.num_shards(n + 2, 64)


def test_edited_index_finds_new_texts_and_never_deleted_ones(kb, edited):
  meta = bank_edits.read_meta(edited["bank"])
  retriever, refs = _views(kb, edited["bank"], meta)
  got = retriever.retrieve([NEW_TEXT, ADDED])
  assert got.ids[0, 0] == 5 and got.ids[1, 0] in (edited["n"], edited["n"] + 1)
  # The deleted references' own texts no longer retrieve them.
  base = prepared.open_references(kb["root"])
  got = retriever.retrieve(base.texts_by_ids([7, 70]))
  assert not np.isin(got.ids, [7, 70]).any()
  # The leakage filter reads the edited text: a query that copies it drops ref 5.
  filtered = retriever.with_threshold(2 / 3).retrieve([NEW_TEXT], [NEW_TEXT])
  assert 5 not in filtered.ids[0] and filtered.dropped[0] >= 1


@pytest.mark.parametrize("fail_after", ["references", "index"])
def test_failure_between_steps_keeps_the_old_version_and_rerun_finishes(kb, edited, tmp_path,
                                                                        fail_after):
  bank = _copy_bank(kb, tmp_path)

  def boom(step):
    if step == fail_after:
      raise KeyboardInterrupt(step)

  with pytest.raises(KeyboardInterrupt):
    _apply(kb, bank, on_step=boom)
  with _open(kb, bank) as b:  # a reader sees the old bank, whole
    assert "version" not in b.meta and b.num_references == edited["n"]
    np.testing.assert_array_equal(b.lookup(np.arange(edited["n"]))[0], edited["before"][0])
  result = _apply(kb, bank)
  assert result.version == 1
  got, want = bank_edits.read_meta(bank), bank_edits.read_meta(edited["bank"])
  assert got["shards"] == want["shards"]  # same files, same sha256
  assert got["overlay"]["references_sha256"] == want["overlay"]["references_sha256"]
  # The same command once more recognises the finished edit instead of applying it twice.
  again = _apply(kb, bank)
  assert again.version == 1 and bank_edits.read_meta(bank)["version"] == 1


def test_second_edit_builds_on_the_first_and_cleans_up(kb, edited, tmp_path):
  bank = str(tmp_path / "bank")
  shutil.copytree(edited["bank"], bank)
  r = edit_job.run(bank, delete=[5], printer=lambda _: None, keep_previous=False)
  assert r.version == 2
  meta = bank_edits.read_meta(bank)
  retriever, refs = _views(kb, bank, meta)
  assert refs.texts_by_ids([5])[0] == ""
  assert "Vossberg" in refs.texts_by_ids([edited["n"]])[0]  # v1's addition survives
  assert 5 not in retriever.retrieve([NEW_TEXT]).ids[0]
  assert sorted(os.listdir(os.path.join(bank, "edits"))) == ["v000002"]
  names = {i["file"] for i in meta["shards"]}
  on_disk = {f"shards/{f}" for f in os.listdir(os.path.join(bank, "shards"))
             if f.endswith(".npy")}
  assert on_disk == names


def test_refuses_another_models_parameters_and_reencoding(kb, edited, tmp_path):
  other = tmp_path / "other"
  params_io.save_params(str(other), init_params(kb["mc"], jax.random.key(1)), kb["cfg"])
  bank = _copy_bank(kb, tmp_path)
  with pytest.raises(bank_format.BankMismatchError, match="other parameters"):
    edit_job.run(bank, delete=[3], checkpoint=str(other), printer=lambda _: None)
  with pytest.raises(bank_format.BankError, match="ref_id 99999 does not exist"):
    edit_job.run(bank, delete=[99999], printer=lambda _: None)
  with pytest.raises(bank_format.BankError, match="bank update"):
    encode_job.run(kb["cfg"], checkpoint=str(kb["work"] / "params"), checkpoint_config=kb["cfg"],
                   params=kb["params"], step=None, references=kb["root"], out=edited["bank"],
                   printer=lambda _: None)


@pytest.mark.slow
def test_cli_edit_killed_mid_way_is_finished_by_a_rerun(kb, edited, tmp_path, repo_root):
  """SIGKILL (os._exit) right after the shards are written, then the same command again."""
  bank = _copy_bank(kb, tmp_path)
  args = ["--bank", bank, "--add", kb["add"], "--replace", kb["replace"], "--delete", "7,70"]
  env = dict(os.environ, PYTHONPATH=str(repo_root), JAX_PLATFORMS="cpu")
  killer = ("import os, sys\nfrom m3jax.memory import bank_update as b\n"
            "orig = b.update_bank\n"
            "def upd(*a, **k):\n"
            "  k['on_step'] = lambda s: os.kill(os.getpid(), 9) if s == 'shards' else None\n"
            "  return orig(*a, **k)\n"
            "b.update_bank = upd\n"
            "from m3jax import cli\n"
            "sys.exit(cli.main(['m3jax', 'bank', 'update'] + sys.argv[1:]))\n")
  p = subprocess.run([sys.executable, "-c", killer] + args, env=env, capture_output=True)
  assert p.returncode == -9
  assert "version" not in bank_edits.read_meta(bank)
  p = subprocess.run([sys.executable, "-m", "m3jax.cli", "bank", "update"] + args, env=env,
                     capture_output=True, text=True)
  assert p.returncode == 0, p.stderr
  assert bank_edits.read_meta(bank)["shards"] == bank_edits.read_meta(edited["bank"])["shards"]
  p = subprocess.run([sys.executable, "-m", "m3jax.cli", "bank", "update", "--bank", bank,
                      "--delete", "x"], env=env, capture_output=True, text=True)
  assert p.returncode == 1 and p.stderr.strip().startswith("m3jax bank update: error:")
  assert len(p.stderr.strip().splitlines()) == 1
