"""Post-training data: chat and preference datasets with each chunk's retrieved reference.

`m3jax prepare-chat` renders `data.chat_files` (SFT) and `data.preference_files`
(DPO) with the chat template (data_pipeline.chat) and the data root's tokenizer,
packs them into `model.max_seq_len` sequences and, when the data root has a
reference index, retrieves one reference per chunk as continual training does:

* the query of chunk c is the conversation so far that is not being trained on:
  the user and system text in chunks 0..c (its last `2 * chunk_length` tokens).
  Assistant text (the tokens scored) never enters a query;
* a candidate that copies the sequence is dropped (eq. 6 overlap above
  `data.train_overlap_threshold`, the mining rule), and the best survivor kept.

A preference pair's chosen and rejected sequences share one prompt, so they get
the same references (retrieved from the prompt and filtered against it): the two
replies are compared under the same memories.

Both datasets are prepare-data stages (`<data>/chat`, `<data>/preferences`): built
atomically, reused while their settings match, refused when they changed.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import chat
from data_pipeline import packing
from data_pipeline import prepare
from data_pipeline import prepared
from data_pipeline import tfds_builders
from m3jax.core import artifacts
from m3jax.core import workspace
from m3jax.core.config import ConfigError
from m3jax.retrieval import index as index_lib
from m3jax.retrieval import reference_index
from m3jax.retrieval import search as search_lib
from m3jax.retrieval.neighbor_table import MiningSettings

CHAT_STAGE, PREFERENCE_STAGE = "chat", "preferences"
SPLITS = ("train", "validation")


def _seq(T: int, dtype: Any) -> Any:
  return tfds.features.Tensor(shape=(T,), dtype=dtype)


def chat_features(T: int, C: int) -> dict[str, Any]:
  return dict(tokens=_seq(T, np.int32), targets=_seq(T, np.int32),
              loss_mask=_seq(T, np.float32), neighbors=_seq(C, np.int32))


def preference_features(T: int, C: int) -> dict[str, Any]:
  out = {f"{side}_{k}": v for side in ("chosen", "rejected")
         for k, v in chat_features(T, C).items() if k != "neighbors"}
  out["neighbors"] = _seq(C, np.int32)
  return out


class ChunkRetriever:
  """One reference id per chunk from the prompt text so far (or -1 everywhere)."""

  def __init__(self, tokenizer: Any, template: chat.ChatTemplate, settings: MiningSettings,
               index: Any = None, embedder: Any = None, references: Any = None):
    self.tok, self.template, self.settings = tokenizer, template, settings
    self.index, self.embedder, self.references = index, embedder, references
    self.special = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, template.end_id,
                    *template.role_ids.values()}

  def queries(self, tokens: np.ndarray, reply: np.ndarray) -> list[str]:
    """Chunk c's query text: the non-reply, non-marker tokens of chunks 0..c (tail)."""
    L = self.settings.chunk_length
    keep = ~reply & ~np.isin(tokens, list(self.special))
    out = []
    for c in range(len(tokens) // L):
      ids = tokens[:(c + 1) * L][keep[:(c + 1) * L]][-2 * L:]
      out.append(self.tok.decode(ids) if len(ids) else "")
    return out

  def neighbors(self, tokens: np.ndarray, reply: np.ndarray, filter_tokens: np.ndarray
                ) -> np.ndarray:
    C = len(tokens) // self.settings.chunk_length
    if self.index is None:
      return np.full((C,), -1, np.int32)
    qs = self.queries(tokens, reply)
    live = [c for c, q in enumerate(qs) if q.strip()]
    out = np.full((C,), -1, np.int32)
    if not live:
      return out
    t = filter_tokens[filter_tokens != self.settings.pad_id]

    def ref_tokens(ids):
      toks, lens = self.references.tokens_by_ids(np.asarray(ids))
      return [toks[i, :lens[i]] for i in range(len(ids))]

    ids, _, _ = search_lib.retrieve(
        self.embedder, self.index, [qs[c] for c in live], k=1,
        fetch=self.settings.candidates,
        reject=lambda cands: search_lib.overlapping(t, cands, ref_tokens,
                                                    self.settings.overlap_threshold))
    out[live] = ids[:, 0].astype(np.int32)
    return out


def _reply_flags(rec: dict[str, np.ndarray], prefix: str = "") -> np.ndarray:
  """bool [T]: token i is reply text (its own target position i-1 is trained)."""
  m = rec[f"{prefix}loss_mask"] > 0
  return np.concatenate([[False], m[:-1]])


def _split_of(n: int, cfg: Any) -> np.ndarray:
  d = cfg.data
  return packing.heldout_mask(0, n, int(d.eval_seed), float(d.eval_fraction))


def chunk_retriever(cfg: Any, root: str, tok: Any, template: chat.ChatTemplate,
                    use_memory: bool) -> tuple[ChunkRetriever, dict[str, Any]]:
  settings = MiningSettings.from_config(cfg)
  if not use_memory:
    return ChunkRetriever(tok, template, settings), {"memory": False}
  path = workspace.index_dir_of_root(root)
  if not os.path.isdir(path):
    raise index_lib.IndexDirError(
        f"index {path} not found: post-training with memory retrieves each chunk's reference; "
        "run `m3jax build-index` first, or set train.chat_memory=False")
  index, embedder = reference_index.load_reference_index(path, tokenizer=tok)
  info = {"memory": True, "index_manifest_sha256":
          artifacts.sha256_file(os.path.join(path, index_lib.MANIFEST)),
          "candidates": settings.candidates, "overlap_threshold": settings.overlap_threshold}
  return ChunkRetriever(tok, template, settings, index, embedder,
                        prepared.open_references(root)), info


def _file_info(paths: list[str]) -> list[dict[str, Any]]:
  """What identifies the inputs: each file's sha256; a dataset directory's files and sizes."""
  out = []
  for p in paths:
    if os.path.isdir(p):
      files = sorted((os.path.relpath(os.path.join(r, n), p), os.path.getsize(os.path.join(r, n)))
                     for r, _, names in os.walk(p) for n in names)
      out.append(dict(path=os.path.abspath(p), files=files))
    else:
      out.append(dict(path=os.path.abspath(p), sha256=artifacts.sha256_file(p)))
  return out


def _chat_records(cfg: Any, template: chat.ChatTemplate, retriever: ChunkRetriever
                  ) -> tuple[dict[str, list[dict[str, np.ndarray]]], dict[str, Any]]:
  chats, stats = chat.read_chats(list(cfg.data.chat_files),
                                 max_rounds=int(cfg.data.chat_max_rounds))
  held = _split_of(len(chats), cfg)
  T, pad = int(cfg.model.max_seq_len), int(cfg.model.pad_id)
  out: dict[str, list[dict[str, np.ndarray]]] = {}
  for split, pick in (("train", ~held), ("validation", held)):
    samples = (template.render(c) for c, h in zip(chats, pick) if h)
    recs = list(chat.pack(samples, T, pad))
    for r in recs:
      r["neighbors"] = retriever.neighbors(r["tokens"], _reply_flags(r), r["tokens"])
    out[split] = recs
  return out, dict(stats.to_dict(), sequences={k: len(v) for k, v in out.items()})


def preference_records(cfg: Any, template: chat.ChatTemplate, retriever: ChunkRetriever,
                       pairs: list[chat.PreferencePair]) -> list[dict[str, np.ndarray]]:
  """Rendered pairs with the references both replies read (retrieved from the prompt)."""
  T, pad = int(cfg.model.max_seq_len), int(cfg.model.pad_id)
  recs = list(chat.pair_records(template, pairs, T, pad))
  for r in recs:
    reply = _reply_flags(r, "chosen_")
    prompt = np.where(reply, pad, r["chosen_tokens"])
    r["neighbors"] = retriever.neighbors(r["chosen_tokens"], reply, prompt)
  return recs


def _preference_records(cfg: Any, template: chat.ChatTemplate, retriever: ChunkRetriever
                        ) -> tuple[dict[str, list[dict[str, np.ndarray]]], dict[str, Any]]:
  pairs = chat.read_preferences(list(cfg.data.preference_files))
  held = _split_of(len(pairs), cfg)
  out = {split: preference_records(cfg, template, retriever,
                                   [p for p, h in zip(pairs, pick) if h])
         for split, pick in (("train", ~held), ("validation", held))}
  return out, dict(pairs=len(pairs), sequences={k: len(v) for k, v in out.items()})


def _write(builder: type, tmp: str, features: dict[str, Any],
           records: dict[str, list[dict[str, np.ndarray]]], meta: dict[str, Any]) -> str:
  def shard(recs):
    return lambda: ((i, r) for i, r in enumerate(recs))
  path = tfds_builders.write_dataset(
      builder, tmp, features=features,
      shards={s: [shard(records[s])] for s in SPLITS if records[s]}, metadata=meta)
  return os.path.relpath(path, tmp)


def prepare_chat(cfg: Any, workdir: str, *, use_memory: bool) -> dict[str, Any]:
  """Builds the chat and/or preference datasets of `cfg.data` in the data root."""
  d = cfg.data
  if not d.chat_files and not d.preference_files:
    raise ConfigError("config fields `data.chat_files` / `data.preference_files`: give the "
                      "chat JSONL files (SFT) or the preference pairs (DPO)")
  root = workspace.data_root(cfg, workdir)
  tok = prepared.open_tokenizer(root)
  template = chat.ChatTemplate(tok)
  retriever, retrieval_info = chunk_retriever(cfg, root, tok, template, use_memory)
  T, C = int(cfg.model.max_seq_len), int(cfg.model.max_seq_len) // int(cfg.model.chunk_length)
  base = dict(tokenizer=tok.hash, seq_len=T, chunk_length=int(cfg.model.chunk_length),
              eval_fraction=float(d.eval_fraction), eval_seed=int(d.eval_seed),
              retrieval=retrieval_info)
  out = {}
  if d.chat_files:
    settings = dict(base, files=_file_info(list(d.chat_files)),
                    max_rounds=int(d.chat_max_rounds))

    def build_chat(tmp: str) -> dict[str, Any]:
      records, info = _chat_records(cfg, template, retriever)
      return dict(info, path=_write(tfds_builders.M3jaxChat, tmp, chat_features(T, C), records,
                                    dict(seq_len=T, chunk_length=settings["chunk_length"])))
    out[CHAT_STAGE] = prepare.run_stage(root, CHAT_STAGE, settings, build_chat)
  if d.preference_files:
    settings = dict(base, files=_file_info(list(d.preference_files)))

    def build_pairs(tmp: str) -> dict[str, Any]:
      records, info = _preference_records(cfg, template, retriever)
      return dict(info, path=_write(tfds_builders.M3jaxPreferences, tmp, preference_features(T, C), records,
                                    dict(seq_len=T, chunk_length=settings["chunk_length"])))
    out[PREFERENCE_STAGE] = prepare.run_stage(root, PREFERENCE_STAGE, settings, build_pairs)
  return out


def dataset_dir(root: str, stage: str) -> str:
  """Version directory of a prepared chat / preference dataset."""
  rec = artifacts.read_json(os.path.join(root, stage, "stage.json"))
  return os.path.join(root, stage, rec["info"]["path"])


class PostTrainSource:
  """Random-access records of a chat / preference split, with `seq_index`."""

  def __init__(self, path: str, split: str):
    self.path, self.split = path, split
    self._source = tfds_builders.open_split(path, split)
    meta = tfds_builders.metadata(path)
    self.seq_len, self.chunk_length = int(meta["seq_len"]), int(meta["chunk_length"])
    self.pad_id = 0

  def __getstate__(self):
    return dict(path=self.path, split=self.split)

  def __setstate__(self, state):
    self.__init__(state["path"], state["split"])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    rec = {k: np.asarray(v) for k, v in self._source[int(index)].items()}
    rec["seq_index"] = np.int32(index)
    return rec

  def __repr__(self) -> str:
    return f"PostTrainSource({self.path!r}, {self.split!r})"


class RecordNeighbors:
  """The neighbor-table interface over the `neighbors` field the records carry."""

  def __init__(self, source: PostTrainSource):
    self.source = source

  def __getitem__(self, seq_index: int) -> np.ndarray:
    return self.source._source[int(seq_index)]["neighbors"]

  def __iter__(self) -> Iterator[np.ndarray]:
    raise TypeError("RecordNeighbors is indexed by seq_index")
