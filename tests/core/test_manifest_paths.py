"""Every path a manifest names stays inside the manifest's directory.

`artifacts.confined_path` is the one check; the tests below drive it through the reader of
each manifest kind (data manifest, documents stage record, index manifest, Hugging Face
shard index, bank quantizer), with an edited manifest naming `..`, an absolute path or a
symlink out. The bank's shard `file` is tested with a real bank in tests/memory/test_bank.py.
"""

import json
import os

import pytest

from m3jax.core import artifacts
from m3jax.core.artifacts import UnsafePathError


def _setup(tmp_path):
  """(artifact dir, escapes): each escape is (path a manifest names, text the error shows)."""
  root = tmp_path / "art"
  root.mkdir()
  secret = tmp_path / "secret.model"
  secret.write_text("not yours")
  os.symlink(tmp_path, root / "link")
  return str(root), [("../secret.model", "../secret.model"),
                     (str(secret), str(secret)),
                     ("sub/../../secret.model", "sub/../../secret.model"),
                     ("link/secret.model", "symlink")]


def test_confined_path_accepts_paths_inside_and_refuses_every_escape(tmp_path):
  root, escapes = _setup(tmp_path)
  os.makedirs(os.path.join(root, "a"))
  os.symlink(os.path.join(root, "a"), os.path.join(root, "inner"))  # a link that stays in
  for rel in ("a/b.npy", "./a/b.npy", "inner/b.npy", "not-there-yet.json"):
    assert artifacts.confined_path(root, rel, "m") == os.path.join(root, rel)
  for rel, shown in escapes + [("a/..", "..")]:
    with pytest.raises(UnsafePathError, match=f"the manifest field: .*{shown}"):
      artifacts.confined_path(root, rel, "the manifest field")
  for bad in ("", None, 3, ["a"]):
    with pytest.raises(UnsafePathError, match="not a file name"):
      artifacts.confined_path(root, bad, "m")


def test_data_manifest_dataset_and_tokenizer_paths_are_confined(tmp_path):
  from data_pipeline import prepared
  root, escapes = _setup(tmp_path)
  for rel, shown in escapes:
    manifest = dict(format=prepared.FORMAT, datasets=dict(packed=dict(path=rel)),
                    tokenizer=dict(path=rel, hash="0" * 64))
    artifacts.write_json(os.path.join(root, "manifest.json"), manifest)
    with pytest.raises(UnsafePathError, match=f"datasets.packed.path.*{shown}"):
      prepared.dataset_path(root, "packed")
    with pytest.raises(UnsafePathError, match=f"tokenizer.path.*{shown}"):
      prepared.open_tokenizer(root)


def test_documents_stage_record_path_is_confined(tmp_path):
  from data_pipeline import documents
  root, escapes = _setup(tmp_path)
  sources = dict(train=dict(kind="files"))
  for rel, shown in escapes:
    docs = dict(info=dict(documents=dict(path=os.path.join("..", rel))))
    with pytest.raises(UnsafePathError, match="info.documents.path"):
      documents.doc_spec(root, sources, docs, "train")
  ok = documents.doc_spec(root, sources, dict(info=dict(documents=dict(path="m/1.0.0"))), "train")
  assert ok["path"] == os.path.join(root, "documents", "m/1.0.0")


def test_index_manifest_files_are_confined(tmp_path):
  from m3jax.retrieval import index as ix
  root, escapes = _setup(tmp_path)
  for rel, shown in escapes:
    manifest = dict(format=ix.FORMAT, version=ix.VERSION, count=1, dim=2,
                    embedder_fingerprint="f", settings={},
                    files={rel: dict(bytes=9, sha256="0" * 64)})
    artifacts.write_json(os.path.join(root, ix.MANIFEST), manifest)
    with pytest.raises(UnsafePathError, match=f"manifest.json files.*{shown}"):
      ix.load_index(root)


def test_hugging_face_shard_index_is_confined(tmp_path):
  from m3jax.model import hf_weights
  root, escapes = _setup(tmp_path)
  for rel, shown in escapes:
    index = dict(metadata={}, weight_map={"model.embed_tokens.weight": rel})
    artifacts.write_json(os.path.join(root, hf_weights.HF_INDEX), index)
    with pytest.raises(UnsafePathError, match=f"weight_map.*{shown}"):
      hf_weights.read_hf_tensors(root)


def test_bank_quantizer_file_is_confined(tmp_path, tiny_config):
  from m3jax.core.config import model_config
  from m3jax.memory import bank_format
  root, escapes = _setup(tmp_path)
  for rel, shown in escapes:
    meta = dict(storage=dict(method="pq", quantizer_file=rel,
                             quantizer_sha256=artifacts.sha256_file(tmp_path / "secret.model")))
    with pytest.raises(UnsafePathError, match=f"quantizer_file.*{shown}"):
      bank_format.load_codec(root, meta, model_config(tiny_config))
