"""The documents stage of prepare-data: where the train text and the knowledge base come from.

`sources(cfg)` describes both before anything is built (these are the documents
stage's settings), `build_documents` writes local files, Hugging Face datasets
(data_pipeline.hf_corpus) and the knowledge world into
`m3jax_documents` (splits train, kb) and, for the knowledge world, its questions into
`m3jax_qa` (train, eval); a TFDS corpus is read in place. `doc_spec` is the opening
spec (see `references.open_documents`) of the train or KB documents once built.

With `data.bad_records=skip`, a bad record of a local file (see `corpus.BadRecord`) is
skipped, printed (the first `SHOWN_BAD_RECORDS` per file) and counted per file in the
stage info, which the data manifest copies (`datasets.documents.bad_records`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator

from data_pipeline import corpus as corpus_lib
from data_pipeline import hf_corpus
from data_pipeline import knowledge_world as kw_lib
from data_pipeline import tfds_builders
from m3jax.core import artifacts


BAD_RECORDS = ("error", "skip")
SHOWN_BAD_RECORDS = 10  # printed per file
LISTED_BAD_RECORDS = 100  # listed per file in the stage info / data manifest


class BadRecords:
  """Collects skipped bad records (`data.bad_records=skip`): counted per file, the first
  SHOWN_BAD_RECORDS of a file printed, the first LISTED_BAD_RECORDS listed."""

  def __init__(self, log: Callable[[str], None] = print):
    self.files: dict[str, dict[str, Any]] = {}
    self.log = log

  def __call__(self, record: corpus_lib.BadRecord) -> None:
    entry = self.files.setdefault(record.path, dict(count=0, records=[]))
    entry["count"] += 1
    if entry["count"] <= LISTED_BAD_RECORDS:
      entry["records"].append(dict(line=record.line, offset=record.offset,
                                   reason=record.reason))
    if entry["count"] <= SHOWN_BAD_RECORDS:
      self.log(f"skipping bad record: {record.describe()}")
    elif entry["count"] == SHOWN_BAD_RECORDS + 1:
      self.log(f"{record.path}: more bad records, not shown (all are counted in the data "
               "manifest, datasets.documents.bad_records)")

  @property
  def total(self) -> int:
    return sum(e["count"] for e in self.files.values())

  def summary(self) -> dict[str, dict[str, Any]]:
    """{file: {count, records (sorted by offset)}}, and one printed line per file."""
    for path, e in sorted(self.files.items()):
      e["records"].sort(key=lambda r: r["offset"])
      self.log(f"skipped {e['count']} bad record(s) in {path}")
    return {p: self.files[p] for p in sorted(self.files)}


class _FileShard:
  """Shard generator: the documents starting in one byte range of one file."""

  def __init__(self, split: corpus_lib.FileSplit, text_field: str, txt_docs: str,
               counts: dict[str, int], on_bad: BadRecords | None = None):
    self.split, self.text_field, self.txt_docs, self.counts = split, text_field, txt_docs, counts
    self.on_bad = on_bad

  def __call__(self) -> Iterator[tuple[int, dict[str, str]]]:
    k = 0
    for source, text in corpus_lib.iter_split_documents(
        self.split, text_field=self.text_field, txt_docs=self.txt_docs, on_bad=self.on_bad):
      yield k, dict(text=text, source=source)
      k += 1
    self.counts[self.split.path] = self.counts.get(self.split.path, 0) + k


class _ListShard:
  def __init__(self, rows: list[dict[str, Any]]):
    self.rows = rows

  def __call__(self):
    return enumerate(self.rows)


def _list_shards(rows: list[dict[str, Any]], per_shard: int) -> list[_ListShard]:
  return [_ListShard(rows[i:i + per_shard]) for i in range(0, len(rows), per_shard)] or \
      [_ListShard([])]


def _file_settings(files: list[str], d: Any, text_field: str) -> dict[str, Any]:
  out = dict(kind="files", files=[[f, os.path.getsize(f)] for f in files],
             text_field=text_field, txt_docs=d.txt_docs, max_split_bytes=d.max_split_bytes)
  if d.get("bad_records", "error") != "error":  # absent by default: old stages still match
    out["bad_records"] = d.bad_records
  return out


def _tfds_settings(name: str, split: str, data_dir: str, text_field: str) -> dict[str, Any]:
  """A TFDS source, opened once here so that a missing dataset fails before any work."""
  src = corpus_lib.TfdsDocuments(name, split=split, data_dir=data_dir or None,
                                 text_field=text_field)
  return dict(kind="tfds", name=name, split=split, data_dir=data_dir, text_field=text_field,
              num_documents=len(src))


def sources(cfg: Any) -> dict[str, dict[str, Any]]:
  """What the train text and the knowledge base are, before anything is built."""
  d = cfg.data
  out: dict[str, dict[str, Any]] = {}
  if d.corpus == "knowledge_world":
    out["train"] = dict(kind="knowledge_world", **kw_lib.resolve_settings(d.knowledge_world))
  elif d.corpus == "files":
    out["train"] = _file_settings(corpus_lib.expand_files(list(d.files), "data.files"), d,
                                  d.text_field)
  elif d.corpus == "hf":
    out["train"] = hf_corpus.source_settings(d.hf_path, config=d.hf_config, split=d.hf_split,
                                             text_field=d.text_field,
                                             streaming=d.hf_streaming, what="data.hf_path")
  else:
    out["train"] = _tfds_settings(d.tfds_name, d.tfds_split, d.tfds_data_dir, d.text_field)
  kb_field = d.kb_text_field or d.text_field
  if d.kb_files:
    out["kb"] = _file_settings(corpus_lib.expand_files(list(d.kb_files), "data.kb_files"), d,
                               kb_field)
  elif d.kb_hf_path:
    out["kb"] = hf_corpus.source_settings(d.kb_hf_path, config=d.kb_hf_config,
                                          split=d.kb_hf_split, text_field=kb_field,
                                          streaming=d.hf_streaming, what="data.kb_hf_path")
  elif d.kb_tfds_name:
    out["kb"] = _tfds_settings(d.kb_tfds_name, d.kb_tfds_split,
                               d.kb_tfds_data_dir or d.tfds_data_dir, kb_field)
  elif d.corpus == "knowledge_world":
    out["kb"] = dict(out["train"])
  else:
    out["kb"] = dict(kind="same_as_train")
  return out


def build_documents(cfg: Any, sources: dict[str, dict[str, Any]], tmp: str,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
  """Writes the documents (and QA) datasets of `sources` into `tmp`; returns the stage info."""
  shards: dict[str, list] = {}
  bad: dict[str, BadRecords] = {}
  info: dict[str, Any] = {}
  counts: dict[str, dict[str, int]] = {}
  world = None
  for split in ("train", "kb"):
    src = sources[split]
    if src["kind"] == "knowledge_world":
      world = world or kw_lib.generate(cfg.data.knowledge_world)
      docs = world.train_documents if split == "train" else world.kb_documents
      shards[split] = _list_shards([dict(text=x.text, source=x.source) for x in docs],
                                   cfg.data.shard_docs)
    elif src["kind"] == "files":
      files = [f for f, _ in src["files"]]
      counts[split] = {}
      if src.get("bad_records") == "skip":
        bad[split] = BadRecords(log)
      splits = corpus_lib.plan_file_splits(files, txt_docs=src["txt_docs"],
                                           max_split_bytes=src["max_split_bytes"])
      shards[split] = [_FileShard(s, src["text_field"], src["txt_docs"], counts[split],
                                  bad.get(split)) for s in splits]
    elif src["kind"] == "hf":
      counts[split] = {}
      shards[split] = hf_corpus.shards(src, counts[split], cfg.data.shard_docs)
  if shards:
    path = tfds_builders.write_dataset(
        tfds_builders.M3jaxDocuments, tmp, features=tfds_builders.DOCUMENT_FEATURES,
        shards=shards, description="m3jax documents (train text / knowledge base).")
    sizes = tfds_builders.split_sizes(path)
    for split in shards:
      if sizes.get(split, 0) == 0:
        what = sources[split].get("what") or {"train": "data.files", "kb": "data.kb_files"}[split]
        files = ", ".join(f for f, _ in sources[split].get("files", [])) or split
        skipped = f" ({bad[split].total} bad records skipped)" if split in bad else ""
        raise corpus_lib.CorpusError(
            f"{what}: empty corpus: no non-blank documents in {files}{skipped}")
    info["documents"] = dict(path=os.path.relpath(path, tmp), splits=sizes,
                             documents_per_file=counts)
    if bad:
      info["documents"]["bad_records"] = {split: b.summary() for split, b in bad.items()}
  if world is not None:
    qa = {"train": world.train_questions, "eval": world.eval_questions}
    rows = {s: [dict(question=q.question, prompt=q.prompt, answer=q.answer,
                     distractors=list(q.distractors), group=q.group, entity_id=q.entity_id,
                     entity_name=q.entity_name, attribute=q.attribute) for q in qs]
            for s, qs in qa.items()}
    path = tfds_builders.write_dataset(
        tfds_builders.M3jaxQa, tmp, features=tfds_builders.QA_FEATURES,
        shards={s: _list_shards(r, 1 << 30) for s, r in rows.items() if r},
        description="Knowledge-world QA: train (in the training text) and eval (held out).")
    info["qa"] = dict(path=os.path.relpath(path, tmp), splits=tfds_builders.split_sizes(path))
    info["knowledge_world"] = world.summary()
  return info


def doc_spec(root: str, sources: dict[str, Any], docs: dict[str, Any], split: str
              ) -> dict[str, Any]:
  """Opening spec (absolute) for the train or KB documents."""
  src = sources[split]
  if src["kind"] == "same_as_train":
    return doc_spec(root, sources, docs, "train")
  if src["kind"] == "tfds":
    return dict(name=src["name"], split=src["split"], data_dir=src["data_dir"],
                text_field=src["text_field"])
  stage_dir = os.path.join(root, "documents")
  path = artifacts.confined_path(stage_dir, docs["info"]["documents"].get("path"),
                                 f"{stage_dir}/stage.json info.documents.path")
  return dict(path=path, split=split, text_field="text")
