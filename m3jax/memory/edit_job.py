"""`m3jax bank update` from paths: read the edit files, open the bank's own model, apply.

Inputs (m3jax.memory.bank_update applies them):

  --add=FILE      JSONL, one new document per line: {"text": "..."}; each is cut into
                  references as prepare-data cuts the knowledge base
  --replace=FILE  JSONL, {"ref_id": 12, "text": "..."}: the reference's new text (at
                  most model.reference_length tokens)
  --delete=IDS    comma-separated ref_ids, or @FILE with one id per line

The model, parameters, tokenizer, references and index default to those the bank
records (its checkpoint path; the prepare-data directory holding its references
dataset; that directory's index) and are checked against the bank as every reader
checks them: another model, parameters or tokenizer is refused, naming the field.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

from data_pipeline import prepared
from m3jax.core import workspace
from m3jax.core.config import model_config
from m3jax.memory import bank_edits
from m3jax.memory import bank_format
from m3jax.memory import bank_update
from m3jax.memory.bank_format import BankError
from m3jax.memory.encoder import ReferenceEncoder
from m3jax.model import params_io
from m3jax.retrieval import embedder_factory
from m3jax.retrieval import index as index_lib


def _jsonl(path: str, flag: str) -> list[dict[str, Any]]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--{flag}={path}: no such file")
  out = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError as e:
        raise BankError(f"--{flag}={path} line {n}: not JSON ({e})") from e
      if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise BankError(f"--{flag}={path} line {n}: expected an object with a string `text`")
      out.append(dict(row, _line=n))
  return out


def read_inputs(add: str | None = None, replace: str | None = None,
                delete: str | Sequence[int] | None = None
                ) -> tuple[dict[int, str], list[str], list[int]]:
  """(replace {ref_id: text}, add [text], delete [ref_id]) from the command's inputs."""
  adds = [r["text"] for r in _jsonl(add, "add")] if add else []
  repl: dict[int, str] = {}
  for r in _jsonl(replace, "replace") if replace else []:
    if not isinstance(r.get("ref_id"), int):
      raise BankError(f"--replace={replace} line {r['_line']}: expected an integer `ref_id`")
    if r["ref_id"] in repl:
      raise BankError(f"--replace={replace} line {r['_line']}: ref_id {r['ref_id']} again")
    repl[r["ref_id"]] = r["text"]
  ids: list[int] = []
  if isinstance(delete, str) and delete:
    words = (open(delete[1:], encoding="utf-8").read().split() if delete.startswith("@")
             else delete.replace(",", " ").split())
    try:
      ids = [int(w) for w in words]
    except ValueError as e:
      raise BankError(f"--delete: ref_ids must be integers ({e})") from e
  elif delete:
    ids = [int(i) for i in delete]
  return repl, adds, ids


def data_root_of(meta: dict[str, Any], where: str) -> str:
  """The prepare-data directory holding the references dataset the bank was encoded from."""
  path = meta["references"].get("source", "")
  probe = os.path.abspath(path) if path else ""
  while probe and probe != os.path.dirname(probe):
    if os.path.isfile(os.path.join(probe, prepared.MANIFEST)):
      return probe
    probe = os.path.dirname(probe)
  raise BankError(f"{where}: no prepare-data directory above the bank's references "
                  f"{path!r}; pass --data_dir")


def run(bank: str, *, add: str | None = None, replace: str | None = None,
        delete: str | Sequence[int] | None = None, checkpoint: str | None = None,
        data_dir: str | None = None, index_dir: str | None = None,
        keep_previous: bool = True, on_step: Callable[[str], None] | None = None,
        printer: Callable[[str], None] = print) -> bank_update.UpdateResult:
  """Opens what the bank was made from (checked against it) and applies one edit."""
  root = os.path.abspath(bank)
  meta = bank_edits.read_meta(root)
  where = os.path.join(root, bank_format.MANIFEST_FILE)
  repl, adds, ids = read_inputs(add, replace, delete)
  checkpoint = checkpoint or meta["checkpoint"].get("path")
  if not checkpoint:
    raise BankError(f"{where} records no checkpoint path; pass --checkpoint")
  cfg, params, _ = params_io.load_for_inference(checkpoint)
  config = model_config(cfg)
  bank_format.check_compatible(meta, where, model_config=config, tokenizer_hash=None,
                               params=params)
  root_data = os.path.abspath(data_dir) if data_dir else data_root_of(meta, where)
  tokenizer = prepared.open_tokenizer(root_data)
  references = prepared.open_references(root_data)
  index_path = index_dir or workspace.index_dir_of_root(root_data)
  embedder = embedder_factory.load_embedder(
      os.path.join(index_path, index_lib.EMBEDDER_STATE), model_config=config, params=params,
      encode=tokenizer.encode, tokenizer_hash=tokenizer.hash)
  index = index_lib.load_index(index_path, embedder=embedder)
  encoder = ReferenceEncoder(config, params, int(meta["layout"]["encode_batch_size"]))
  return bank_update.update_bank(root, encoder=encoder, tokenizer=tokenizer,
                                 references=references, index=index, embedder=embedder,
                                 replace=repl, add=adds, delete=ids,
                                 keep_previous=keep_previous, on_step=on_step, printer=printer)
