"""Opening a checkpoint for inference: model, tokenizer, references, index, memory bank.

`open_inference(...)` resolves the paths a run's working directory implies
(WORKSPACE.md): `<workdir>/<data.workdir_data>` (prepare-data: tokenizer and
references), `<data>/index` (build-index), `<workdir>/bank` (encode-memory), and
checks that each artifact belongs to this model and tokenizer. Only what the
requested memory modes need is opened: explicit memory needs the index and a
memory source (the bank; without one, references are encoded on the fly, which
is correct but slow), RAG needs the index and the references.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Sequence

import ml_collections

from data_pipeline import prepared
from data_pipeline import tokenizer as tok_lib
from m3jax.core import config as config_lib
from m3jax.core import errors
from m3jax.core import workspace
from m3jax.core.config import ModelConfig
from m3jax.memory import bank_edits
from m3jax.memory import bank_format
from m3jax.memory.bank_reader import MemoryBank
from m3jax.memory import source as ms_lib
from m3jax.model import params_io
from m3jax.model.transformer import Transformer
from m3jax.retrieval import retriever as retriever_lib
from m3jax.retrieval import schedule


class InferenceSetupError(errors.UserError, ValueError):
  """A path or artifact needed for inference is missing or mismatched (names the flag)."""


@dataclasses.dataclass
class Inference:
  cfg: ml_collections.ConfigDict
  config: ModelConfig
  params: Any
  step: int | None
  tokenizer: Any
  data_root: str
  references: Any = None
  retriever: Any = None  # m3jax.retrieval.retriever.Retriever
  memory_source: Any = None  # m3jax.memory.source.MemorySource
  paths: dict[str, str] = dataclasses.field(default_factory=dict)


def resolve_data_root(cfg: ml_collections.ConfigDict, workdir: str | None,
                      data_dir: str | None, checkpoint: str) -> str:
  """--data_dir, else <workdir or checkpoint dir>/<data.workdir_data> holding a manifest."""
  if data_dir:
    path = os.path.abspath(data_dir)
    if not os.path.isfile(os.path.join(path, workspace.DATA_MANIFEST)):
      raise InferenceSetupError(f"--data_dir={data_dir}: no manifest.json (run `m3jax "
                                "prepare-data` for that workdir first)")
    return path
  sub = cfg.data.workdir_data if "data" in cfg else "data"
  tried = []
  for base in [workdir, checkpoint, os.path.dirname(os.path.abspath(checkpoint)),
               os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))]:
    if not base:
      continue
    path = sub if os.path.isabs(sub) else os.path.join(os.path.abspath(base), sub)
    tried.append(path)
    if os.path.isfile(os.path.join(path, workspace.DATA_MANIFEST)):
      return path
  raise InferenceSetupError("no prepare-data directory found (tried "
                            + ", ".join(dict.fromkeys(tried))
                            + "); pass --data_dir or --workdir")


def open_inference(checkpoint: str, *, modes: Sequence[str], workdir: str | None = None,
                   data_dir: str | None = None, index_dir: str | None = None,
                   bank_dir: str | None = None, overlap_threshold: float | None = None,
                   dtype: str | None = None, embedder_params: str | None = None,
                   cache_memories: int | None = None, log=None) -> Inference:
  """Loads everything `modes` (subset of m3jax.inference.generate.MEMORY_MODES) need."""
  log = log or (lambda msg: print(msg, file=sys.stderr))
  if not checkpoint:
    raise InferenceSetupError("--checkpoint is required (a params dir, a training workdir, "
                              "its checkpoints dir or a step dir)")
  try:
    cfg, params, step = params_io.load_for_inference(checkpoint)
  except FileNotFoundError as e:
    raise InferenceSetupError(f"--checkpoint={checkpoint}: {e}") from e
  if dtype:
    cfg.model.dtype = dtype
  config = config_lib.model_config(cfg)
  data_root = resolve_data_root(cfg, workdir, data_dir, checkpoint)
  tokenizer = prepared.open_tokenizer(data_root)
  tok_lib.check_compatible(tokenizer, config)
  inf = Inference(cfg, config, params, step, tokenizer, data_root,
                  paths=dict(checkpoint=os.path.abspath(checkpoint), data=data_root))
  need_index = any(m in ("explicit", "rag") for m in modes)
  if not need_index:
    return inf
  inf.references = prepared.open_references(data_root)
  inf.references.check_tokenizer(tokenizer)
  index_dir = index_dir or workspace.index_dir_of_root(data_root)
  if not os.path.isdir(index_dir):
    raise InferenceSetupError(f"--index: {index_dir} does not exist (run `m3jax build-index`)")
  emb_params = params
  if embedder_params:
    emb_params = params_io.load_for_inference(embedder_params)[1]
  inf.retriever = retriever_lib.load_retriever(
      index_dir, k=config.memories_per_chunk, references=inf.references,
      tokenize=tokenizer.encode, overlap_threshold=overlap_threshold, model_config=config,
      params=emb_params, tokenizer_hash=tokenizer.hash)
  inf.paths["index"] = os.path.abspath(index_dir)
  if bank_dir is None and workdir and os.path.isdir(workspace.bank_dir(workdir)):
    bank_dir = workspace.bank_dir(workdir)
  meta = None
  if "explicit" in modes:
    inf.memory_source = _memory_source(inf, bank_dir, cache_memories, log)
    meta = getattr(inf.memory_source, "meta", None)
  elif bank_dir and os.path.isfile(os.path.join(bank_dir, bank_format.MANIFEST_FILE)):
    meta = bank_edits.read_meta(bank_dir)  # RAG reads the bank's edited knowledge base too
  if meta is not None and bank_edits.version(meta):
    try:
      inf.retriever, inf.references = bank_edits.apply_to_retriever(
          os.path.abspath(bank_dir), meta, inf.retriever, inf.references)
    except bank_format.BankError as e:
      raise InferenceSetupError(f"--bank={bank_dir}: {e}") from e
    inf.paths["bank_version"] = str(bank_edits.version(meta))
  return inf


def _memory_source(inf: Inference, bank_dir: str | None, cache_memories: int | None,
                   log) -> Any:
  if bank_dir:
    kwargs = {} if cache_memories is None else dict(cache_memories=cache_memories)
    try:
      bank = MemoryBank.from_config(bank_dir, inf.cfg, tokenizer_hash=inf.tokenizer.hash,
                                    params=inf.params, **kwargs)
    except bank_format.BankError as e:
      raise InferenceSetupError(f"--bank={bank_dir}: {e}") from e
    inf.paths["bank"] = os.path.abspath(bank_dir)
    return bank
  log("note: no memory bank (--bank); references are encoded on the fly at each retrieval "
      "(same memories, slower)")
  return ms_lib.EncodeOnTheFly(Transformer(inf.config), inf.params, inf.references,
                               round_to_bfloat16=True)


def memory_retrieval(inf: Inference, *, cache_queries: bool = False):
  """The explicit-memory retrieval object of an opened setup."""
  return schedule.MemoryRetrieval.for_model(inf.config, inf.retriever, inf.memory_source,
                                            inf.tokenizer.decode, cache_queries=cache_queries)
