"""Hugging Face `datasets` as a corpus or a knowledge base (`data.corpus=hf`, `data.kb_hf_path`).

`data.hf_path` (or `data.kb_hf_path`) names one of:

* a directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`
  (`data.hf_split` picks the split of a DatasetDict);
* data files or glob patterns, comma-separated, all of one kind: `.parquet`, `.arrow`,
  `.json` / `.jsonl` (optionally `.gz`), read with the matching `datasets` builder;
* otherwise a dataset name on the Hugging Face Hub (`data.hf_config`, `data.hf_split`),
  which needs network the first time (then the `datasets` cache).

The text is the string field `data.text_field` (`data.kb_text_field` for the knowledge
base). The documents are copied into prepare-data's own `m3jax_documents` dataset,
exactly as local files are, so manifests, the refusal of changed inputs and the
per-host sharding of everything downstream are those of any other corpus. The
stage settings identify local inputs by file names and sizes (and the dataset
fingerprint `save_to_disk` records), so a changed dataset is refused by the next
prepare-data run; a Hub dataset is identified by name, config, split and its
resolved fingerprint when it is not streamed.

Local datasets are read through memory-mapped Arrow files, so a dataset larger than
RAM is fine without streaming. `data.hf_streaming=True` reads data files or a Hub
dataset as an `IterableDataset` instead (no full download, no Arrow copy in the
`datasets` cache); its shards are the dataset's own data files. `datasets` is an
optional dependency (the `hf` extra), imported on use.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterator

from data_pipeline.corpus import CorpusError

_FILE_KINDS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json",
               ".json.gz": "json", ".jsonl.gz": "json"}
ROWS_PER_SHARD = 100_000


def _datasets():
  try:
    import datasets  # optional dependency (the `hf` extra), imported on use
  except ImportError as e:
    raise CorpusError("data.corpus='hf' needs the `datasets` package: pip install "
                      "'m3jax[hf]' (or pip install datasets)") from e
  datasets.disable_progress_bars()
  return datasets


def _file_kind(path: str) -> str | None:
  name = path.lower()
  for suffix, kind in sorted(_FILE_KINDS.items(), key=lambda kv: -len(kv[0])):
    if name.endswith(suffix):
      return kind
  return None


def resolve(path: str, what: str) -> dict[str, Any]:
  """What `path` is: {"kind": "disk", "path"} | {"kind": "files", "builder", "files"} |
  {"kind": "hub", "name"}."""
  if not path:
    raise CorpusError(f"{what}: empty; give a save_to_disk directory, data files or a Hub name")
  if os.path.isdir(path):
    if not any(os.path.exists(os.path.join(path, f))
               for f in ("state.json", "dataset_dict.json")):
      raise CorpusError(f"{what}={path}: not a `save_to_disk` directory (no state.json or "
                        "dataset_dict.json); give its data files instead, e.g. "
                        f"{os.path.join(path, '*.parquet')}")
    return dict(kind="disk", path=os.path.abspath(path))
  parts = [p.strip() for p in path.split(",") if p.strip()]
  looks_local = any(glob.has_magic(p) or os.path.exists(p) or _file_kind(p) for p in parts)
  if not looks_local:
    return dict(kind="hub", name=path)
  files: list[str] = []
  for p in parts:
    matched = sorted(glob.glob(p, recursive=True)) if glob.has_magic(p) else [p]
    matched = [m for m in matched if os.path.isfile(m)]
    if not matched:
      raise CorpusError(f"{what}: {p} matches no file")
    files += [os.path.abspath(m) for m in matched]
  kinds = {_file_kind(f) for f in files}
  if None in kinds or len(kinds) != 1:
    names = sorted(os.path.basename(f) for f in files)[:4]
    raise CorpusError(f"{what}: data files must all be one of .parquet, .arrow, .json, "
                      f".jsonl (optionally .gz); got {names}")
  return dict(kind="files", builder=kinds.pop(), files=files)


def _disk_files(path: str) -> list[list[Any]]:
  out = []
  for root, _, names in sorted(os.walk(path)):
    for n in sorted(names):
      full = os.path.join(root, n)
      out.append([os.path.relpath(full, path), os.path.getsize(full)])
  return out


def open_dataset(spec: dict[str, Any]) -> Any:
  """The `datasets` Dataset (or IterableDataset when streaming) a source spec describes."""
  ds_lib = _datasets()
  where = spec["what"]
  split, streaming = spec.get("split") or "train", bool(spec.get("streaming"))
  src = spec["source"]
  try:
    if src["kind"] == "disk":
      ds = ds_lib.load_from_disk(src["path"])
      if isinstance(ds, ds_lib.DatasetDict):
        if split not in ds:
          raise CorpusError(f"{where}: no split {split!r}; splits: {sorted(ds)}")
        ds = ds[split]
    elif src["kind"] == "files":
      ds = ds_lib.load_dataset(src["builder"], data_files=src["files"], split="train",
                               streaming=streaming)
    else:
      ds = ds_lib.load_dataset(src["name"], spec.get("config") or None, split=split,
                               streaming=streaming)
  except CorpusError:
    raise
  except Exception as e:  # datasets raises many types for "not found / no network"
    raise CorpusError(f"cannot open {where}: {type(e).__name__}: {e}") from e
  names = getattr(ds, "column_names", None)
  field = spec["text_field"]
  if names is not None and field not in names:
    raise CorpusError(f"{where}: no text field {field!r} (data.text_field); columns: "
                      f"{sorted(names)}")
  return ds


def source_settings(path: str, *, config: str, split: str, text_field: str, streaming: bool,
                    what: str) -> dict[str, Any]:
  """The documents-stage settings of a Hugging Face source (opened once: fails early)."""
  src = resolve(path, what)
  spec = dict(kind="hf", what=f"{what}={path}", source=src, config=config, split=split,
              text_field=text_field, streaming=bool(streaming and src["kind"] != "disk"))
  ds = open_dataset(spec)
  if src["kind"] == "disk":
    spec["files"] = _disk_files(src["path"])
  elif src["kind"] == "files":
    spec["files"] = [[f, os.path.getsize(f)] for f in src["files"]]
  if not spec["streaming"]:
    spec["num_documents"] = len(ds)
    if src["kind"] != "files":  # files: names and sizes identify them (the cache path would not)
      spec["fingerprint"] = getattr(ds, "_fingerprint", "")
    if spec["num_documents"] == 0:
      raise CorpusError(f"{spec['what']}: the dataset is empty")
  return json.loads(json.dumps(spec))


class HfShard:
  """Shard generator: the documents of rows [start, stop) (or of one streamed data file)."""

  def __init__(self, spec: dict[str, Any], start: int, stop: int, counts: dict[str, int]):
    self.spec, self.start, self.stop, self.counts = spec, start, stop, counts

  def _rows(self) -> Iterator[tuple[int, Any]]:
    ds = open_dataset(self.spec)
    field = self.spec["text_field"]
    if self.spec["streaming"]:
      part = ds.shard(num_shards=ds.num_shards, index=self.start) if ds.num_shards > 1 else ds
      for i, row in enumerate(part):
        if field not in row:
          raise CorpusError(f"{self.spec['what']}: shard {self.start} row {i} has no text "
                            f"field {field!r}; found {sorted(row)}")
        yield i, row[field]
      return
    for lo in range(self.start, self.stop, 1024):
      hi = min(lo + 1024, self.stop)
      yield from zip(range(lo, hi), ds[lo:hi][field])

  def __call__(self) -> Iterator[tuple[int, dict[str, str]]]:
    k = 0
    where = self.spec["what"]
    for row, text in self._rows():
      if text is None:
        continue
      if not isinstance(text, str):
        raise CorpusError(f"{where}: row {row}: field {self.spec['text_field']!r} is "
                          f"{type(text).__name__}, not a string")
      if text.strip():
        source = f"{where}#{self.start}:{row}" if self.spec["streaming"] else f"{where}#{row}"
        yield k, dict(text=text, source=source)
        k += 1
    self.counts[str(self.start)] = k


def shards(spec: dict[str, Any], counts: dict[str, int],
           rows_per_shard: int = ROWS_PER_SHARD) -> list[HfShard]:
  """The shard generators of a source: row ranges, or one per streamed data file."""
  if spec["streaming"]:
    n = max(1, int(getattr(open_dataset(spec), "num_shards", 1) or 1))
    return [HfShard(spec, i, i + 1, counts) for i in range(n)]
  n = int(spec["num_documents"])
  return [HfShard(spec, lo, min(n, lo + rows_per_shard), counts)
          for lo in range(0, n, rows_per_shard)]
