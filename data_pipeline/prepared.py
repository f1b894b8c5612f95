"""Opening what `m3jax prepare-data` wrote: a prepared data root's manifest and datasets.

The manifest (`manifest.json`, format `FORMAT`) names the tokenizer and every dataset's
version directory; the readers here check the tokenizer against the hash recorded there,
so a data root never pairs with another tokenizer.
"""

from __future__ import annotations

import json
import os
from typing import Any

from data_pipeline import knowledge_world as kw_lib
from data_pipeline import references as references_lib
from data_pipeline import tfds_builders
from data_pipeline import tokenizer as tok_lib
from m3jax.core import artifacts
from m3jax.core import workspace
from m3jax.core.errors import InputError

MANIFEST = workspace.DATA_MANIFEST
FORMAT = "m3jax-data/1"


def load_manifest(root: str) -> dict[str, Any]:
  """`<root>/manifest.json`, checked to be of this format."""
  path = os.path.join(root, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: run `m3jax prepare-data` for this workdir first")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
  return manifest


def dataset_path(root: str, name: str) -> str:
  """Absolute version directory of dataset `name` (references, packed, documents, qa)."""
  manifest = load_manifest(root)
  if name not in manifest["datasets"]:
    raise InputError(f"{root}/{MANIFEST} lists no dataset {name!r}; has "
                     f"{sorted(manifest['datasets'])}")
  return artifacts.confined_path(root, manifest["datasets"][name].get("path"),
                                 f"{root}/{MANIFEST} datasets.{name}.path")


def open_tokenizer(root: str) -> tok_lib.Tokenizer:
  """The data root's tokenizer, checked against the hash its manifest recorded."""
  manifest = load_manifest(root)
  tok = tok_lib.Tokenizer.load(artifacts.confined_path(
      root, manifest["tokenizer"].get("path"), f"{root}/{MANIFEST} tokenizer.path"))
  tok_lib.check_tokenizer_hash(manifest["tokenizer"]["hash"], tok, f"{root}/{MANIFEST}")
  return tok


def open_references(root: str) -> references_lib.ReferenceStore:
  """The ReferenceStore of a prepared data directory, checked against its tokenizer."""
  store = references_lib.ReferenceStore(dataset_path(root, "references"))
  store.check_tokenizer(open_tokenizer(root))
  return store


def read_questions(root: str, split: str = "eval") -> list[kw_lib.Question]:
  """Knowledge-world questions ("eval": held out; "train": those in the training text)."""
  source = tfds_builders.open_split(dataset_path(root, "qa"), split)
  out = []
  for lo in range(0, len(source), 1024):
    for r in source.__getitems__(list(range(lo, min(lo + 1024, len(source))))):
      text = {k: r[k].decode("utf-8") for k in ("entity_name", "group", "attribute", "question",
                                                "answer")}
      out.append(kw_lib.Question(
          entity_id=int(r["entity_id"]), distractors=tuple(x.decode("utf-8")
                                                           for x in r["distractors"]), **text))
  return out
