"""Reading bring-your-own text: local files and already-prepared TFDS datasets.

Local files (paths or glob patterns, expanded in sorted order):

* `.txt` / `.txt.gz`: by default every blank-line-separated block is one document
  (`txt_docs="blank_line"`: streaming, so a single huge file never has to fit in
  memory); with `txt_docs="file"` each whole file is one document.
* `.jsonl` / `.jsonl.gz`: one JSON object per line; the document is the string in
  `text_field`. Blank lines and empty texts are skipped.

Plain (uncompressed) files bigger than `max_split_bytes` are read as several byte
ranges, each starting at the first document that begins inside it, so one file can
become several output shards; `.gz` files are one range each. Documents carry a
`source` string `path@byte_offset` (offset into the decompressed stream for .gz).

Every problem is a `CorpusError` naming the file (and the byte offset and line for
bad bytes or bad JSON): missing files, patterns that match nothing, unsupported
extensions, invalid UTF-8, a missing or non-string text field, an empty corpus.
A bad record (a JSON line that is not valid UTF-8 or JSON, or lacks a string text
field; a .txt document with invalid UTF-8) is a `BadRecordError`; given `on_bad`,
the readers hand each one's `BadRecord` to it and skip the record instead
(`data.bad_records=skip`).

A TFDS dataset prepared elsewhere is read in place with `tfds.data_source` through
`TfdsDocuments`, which gives random access to the text of record i; our own
`documents` datasets are read through the same class.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import itertools
import json
import os
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Sequence

import numpy as np

from m3jax.core import errors

TXT_DOCS = ("blank_line", "file")
_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")
DEFAULT_MAX_SPLIT_BYTES = 256 << 20


class CorpusError(errors.UserError, ValueError):
  """Bad or missing input text; the message names the file (and position)."""


@dataclasses.dataclass(frozen=True)
class BadRecord:
  """One unreadable record: its file, 1-based line, byte offset and why."""
  path: str
  line: int
  offset: int
  reason: str

  def describe(self) -> str:
    return f"{self.path}: line {self.line} (byte offset {self.offset}): {self.reason}"


class BadRecordError(CorpusError):
  """A record that cannot be read; `record` says where and why."""

  def __init__(self, message: str, record: BadRecord):
    super().__init__(message)
    self.record = record


BadRecordHandler = Callable[[BadRecord], None]


def file_format(path: str) -> str:
  """'txt' or 'jsonl' from the file name; CorpusError for anything else."""
  name = path.lower()
  for suffix in _SUFFIXES:
    if name.endswith(suffix):
      return "jsonl" if ".jsonl" in suffix else "txt"
  raise CorpusError(f"{path}: unsupported file type; expected one of {', '.join(_SUFFIXES)}")


def expand_files(patterns: Sequence[str] | None, what: str = "data.files") -> list[str]:
  """Expands paths and glob patterns (sorted, de-duplicated); checks each exists."""
  if not patterns:
    raise CorpusError(f"{what}: no input files given")
  if isinstance(patterns, str):
    patterns = [patterns]
  files: list[str] = []
  for pattern in patterns:
    pattern = os.path.expanduser(str(pattern))
    if glob.has_magic(pattern):
      matched = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
      if not matched:
        raise CorpusError(f"{what}: pattern {pattern} matches no files")
      files.extend(matched)
    elif os.path.isdir(pattern):
      raise CorpusError(f"{what}: {pattern} is a directory; give files or a glob pattern "
                        f"such as {os.path.join(pattern, '*.jsonl.gz')}")
    elif not os.path.isfile(pattern):
      raise CorpusError(f"{what}: input file {pattern} does not exist")
    else:
      files.append(pattern)
  seen: set[str] = set()
  out = []
  for f in files:
    if f not in seen:
      seen.add(f)
      file_format(f)
      out.append(f)
  return out


@dataclasses.dataclass(frozen=True)
class FileSplit:
  """Documents of `path` that start in bytes [start, end) (end=-1: to the end)."""
  path: str
  start: int = 0
  end: int = -1

  def describe(self) -> str:
    return self.path if (self.start, self.end) == (0, -1) else \
        f"{self.path}[{self.start}:{self.end}]"


def plan_file_splits(files: Sequence[str], *, txt_docs: str = "blank_line",
                     max_split_bytes: int = DEFAULT_MAX_SPLIT_BYTES) -> list[FileSplit]:
  """Cuts big plain files into byte ranges; one range per .gz or whole-file document."""
  if txt_docs not in TXT_DOCS:
    raise CorpusError(f"data.txt_docs={txt_docs!r}: must be one of {TXT_DOCS}")
  splits = []
  for path in files:
    size = os.path.getsize(path)
    splittable = not path.lower().endswith(".gz") and not (
        file_format(path) == "txt" and txt_docs == "file")
    if not splittable or size <= max_split_bytes:
      splits.append(FileSplit(path))
      continue
    for start in range(0, size, max_split_bytes):
      end = start + max_split_bytes
      splits.append(FileSplit(path, start, -1 if end >= size else end))
  return splits


def _open(path: str) -> BinaryIO:
  if path.lower().endswith(".gz"):
    return gzip.open(path, "rb")  # type: ignore[return-value]
  return open(path, "rb")


class _LineNumbers:
  """1-based line numbers of byte offsets of one file (only computed for bad records).

  Offsets asked in increasing order are counted on from the previous one, so the
  bad records of a file cost one read of it in all.
  """

  def __init__(self, path: str):
    self.path, self._offset, self._line = path, 0, 1

  def at(self, offset: int) -> int:
    if offset < self._offset:
      self._offset, self._line = 0, 1
    with _open(self.path) as f:
      f.seek(self._offset)
      pos = self._offset
      while pos < offset:
        block = f.read(min(1 << 20, offset - pos))
        if not block:
          break
        self._line += block.count(b"\n")
        pos += len(block)
    self._offset = offset
    return self._line


def _bad(lines: _LineNumbers, offset: int, message: Callable[[int], str],
         reason: str) -> BadRecordError:
  """The error for a bad record at `offset`; `message(line)` is its text."""
  line = lines.at(offset)
  return BadRecordError(message(line), BadRecord(lines.path, line, offset, reason))


def _decode(lines: _LineNumbers, offset: int, raw: bytes) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    bad = offset + e.start
    gz = " (decompressed)" if lines.path.lower().endswith(".gz") else ""
    what = f"{raw[e.start:e.start + 8]!r} ({e.reason})"
    raise _bad(lines, bad, lambda line: f"{lines.path}: invalid UTF-8 at byte offset {bad}{gz}, "
               f"line {line}: {what}", f"invalid UTF-8{gz}: {what}") from None


def _prev_line_blank(f: BinaryIO, pos: int) -> bool:
  """Whether the line that ends just before `pos` (pos follows a newline) is blank."""
  i = pos - 2  # skip the newline at pos - 1
  while i >= 0:
    lo = max(0, i - 4095)
    f.seek(lo)
    block = f.read(i - lo + 1)
    for b in reversed(block):
      if b == 0x0A:
        return True
      if b not in b" \t\r\f\v":
        return False
    i = lo - 1
  return True


def _lines(f: BinaryIO, split: FileSplit) -> Iterator[tuple[int, bytes]]:
  """(offset, line) for lines from the first one starting at or after split.start."""
  pos = 0
  if split.start > 0:
    f.seek(split.start - 1)
    pos = split.start - 1 + len(f.readline())
  f.seek(pos)
  while True:
    line = f.readline()
    if not line:
      return
    yield pos, line
    pos += len(line)


def _past_end(split: FileSplit, offset: int) -> bool:
  return split.end >= 0 and offset >= split.end


def iter_split_documents(split: FileSplit, *, text_field: str = "text",
                         txt_docs: str = "blank_line",
                         on_bad: BadRecordHandler | None = None) -> Iterator[tuple[str, str]]:
  """Yields (source, text) for the documents that start inside `split`.

  A bad record raises `BadRecordError`, or, given `on_bad`, is handed to it and skipped.
  """
  fmt = file_format(split.path)
  path = split.path
  if not os.path.isfile(path):
    raise CorpusError(f"input file {path} does not exist")
  lines = _LineNumbers(path)

  def bad(e: BadRecordError) -> None:
    if on_bad is None:
      raise e
    on_bad(e.record)

  try:
    with _open(path) as f:
      if fmt == "jsonl":
        yield from _jsonl_docs(f, split, text_field, lines, bad)
      elif txt_docs == "file":
        try:
          text = _decode(lines, 0, f.read())
        except BadRecordError as e:
          bad(e)
          return
        if text.strip():
          yield f"{path}@0", text
      else:
        yield from _blank_line_docs(f, split, lines, bad)
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    if isinstance(e, FileNotFoundError):
      raise CorpusError(f"input file {path} does not exist") from e
    raise CorpusError(f"{path}: cannot read: {e}") from e


def _jsonl_text(raw: bytes, offset: int, field: str, lines: _LineNumbers) -> str | None:
  """The text field of one JSON line (None: blank line or null text); BadRecordError."""
  path = lines.path
  line = _decode(lines, offset, raw).strip()
  if not line:
    return None
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise _bad(lines, offset, lambda n: f"{path}: invalid JSON at byte offset {offset}, line "
               f"{n}: {e.msg}", f"invalid JSON: {e.msg}") from None
  if not isinstance(obj, dict) or field not in obj:
    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise _bad(lines, offset, lambda n: f"{path}: line {n} has no text field {field!r} "
               f"(data.text_field); found {keys}", f"no text field {field!r}; found {keys}")
  text = obj[field]
  if text is not None and not isinstance(text, str):
    what = f"field {field!r} is {type(text).__name__}, not a string"
    raise _bad(lines, offset, lambda n: f"{path}: line {n}: {what}", what)
  return text


def _jsonl_docs(f: BinaryIO, split: FileSplit, field: str, lines: _LineNumbers,
                bad: Callable[[BadRecordError], None]) -> Iterator[tuple[str, str]]:
  for offset, raw in _lines(f, split):
    if _past_end(split, offset):
      return
    try:
      text = _jsonl_text(raw, offset, field, lines)
    except BadRecordError as e:
      bad(e)
      continue
    if text is not None and text.strip():
      yield f"{split.path}@{offset}", text


def _blank_line_docs(f: BinaryIO, split: FileSplit, lines_of: _LineNumbers,
                     bad: Callable[[BadRecordError], None]) -> Iterator[tuple[str, str]]:
  """Blank-line separated documents; one with a line of invalid UTF-8 is a bad record."""
  path = split.path
  lines: Iterator[tuple[int, bytes]] = _lines(f, split)
  if split.start > 0:
    first = next(lines, None)
    if first is None:
      return
    continues = not _prev_line_blank(f, first[0])
    f.seek(first[0] + len(first[1]))  # _prev_line_blank moved the file position
    if not continues:
      lines = itertools.chain([first], lines)
    elif first[1].strip():
      # `first` belongs to a document that began in the previous range: skip that one.
      for _, raw in lines:
        if not raw.strip():
          break
  doc: list[str] = []
  doc_start = -1
  error: BadRecordError | None = None
  for offset, raw in lines:
    if not raw.strip():
      if error is not None:
        bad(error)
      elif doc:
        yield f"{path}@{doc_start}", "\n".join(doc)
      doc, error = [], None
      continue
    if not doc and error is None:
      if _past_end(split, offset):
        return
      doc_start = offset
    if error is not None:
      continue
    try:
      doc.append(_decode(lines_of, offset, raw).rstrip("\r\n"))
    except BadRecordError as e:
      error = e
  if error is not None:
    bad(error)
  elif doc:
    yield f"{path}@{doc_start}", "\n".join(doc)


def iter_file_documents(files: Sequence[str], *, text_field: str = "text",
                        txt_docs: str = "blank_line",
                        on_bad: BadRecordHandler | None = None) -> Iterator[tuple[str, str]]:
  """All documents of `files` in order (no byte-range splitting)."""
  for path in files:
    yield from iter_split_documents(FileSplit(path), text_field=text_field, txt_docs=txt_docs,
                                    on_bad=on_bad)


class TfdsDocuments:
  """Random access to the text of a TFDS dataset (any builder with a text feature).

  `name` is a registered/prepared dataset name (`name[/config][:version]`) read
  with `tfds.data_source(name, split=..., data_dir=...)`, or, with `path=`, a
  dataset version directory read with `tfds.builder_from_directory`.
  """

  def __init__(self, name: str = "", *, split: str = "train", data_dir: str | None = None,
               text_field: str = "text", path: str = ""):
    import tensorflow_datasets as tfds
    self.name, self.split, self.data_dir, self.text_field = name, split, data_dir, text_field
    self.path = path
    what = path or f"TFDS dataset {name!r} (data_dir={data_dir or 'default'})"
    self.what = f"{what} split {split!r}"
    try:
      if path:
        builder = tfds.builder_from_directory(path)
      else:
        builder = tfds.builder(name, data_dir=data_dir or None)
      if split not in builder.info.splits:
        raise CorpusError(f"{what}: no split {split!r}; splits: {sorted(builder.info.splits)}")
      if builder.info.splits[split].num_examples == 0:
        raise CorpusError(f"{self.what} is empty")
      features = builder.info.features
      if text_field not in features:
        raise CorpusError(f"{what}: no text field {text_field!r} (data.text_field); "
                          f"features: {sorted(features.keys())}")
      self._source = builder.as_data_source(split=split)
    except CorpusError:
      raise
    except Exception as e:  # tfds raises many types for "not found / not prepared"
      raise CorpusError(f"cannot open {self.what}: {type(e).__name__}: {e}") from e
    self._n = len(self._source)

  def __len__(self) -> int:
    return self._n

  def _text(self, i: int, record: dict[str, Any]) -> str:
    value = record[self.text_field]
    if isinstance(value, np.ndarray) and value.ndim == 0:
      value = value.item()
    if isinstance(value, bytes):
      try:
        return value.decode("utf-8")
      except UnicodeDecodeError as e:
        raise CorpusError(f"{self.what}: record {i}: field {self.text_field!r} has invalid "
                          f"UTF-8 at byte offset {e.start}") from None
    if isinstance(value, str):
      return value
    raise CorpusError(f"{self.what}: record {i}: field {self.text_field!r} is "
                      f"{type(value).__name__}, not text")

  def text(self, i: int) -> str:
    return self._text(i, self._source[i])

  def texts(self, indices: Sequence[int]) -> list[str]:
    indices = [int(i) for i in indices]
    if not indices:
      return []
    records = self._source.__getitems__(indices)
    return [self._text(i, r) for i, r in zip(indices, records)]

  def iter_texts(self, start: int = 0, stop: int | None = None,
                 batch: int = 1024) -> Iterator[tuple[int, str]]:
    stop = self._n if stop is None else min(stop, self._n)
    for lo in range(start, stop, batch):
      idx = list(range(lo, min(lo + batch, stop)))
      yield from zip(idx, self.texts(idx))

  def describe(self) -> dict[str, Any]:
    d = dict(kind="tfds", split=self.split, text_field=self.text_field, num_documents=self._n)
    if self.path:
      d["path"] = self.path
    else:
      d.update(name=self.name, data_dir=self.data_dir or "")
    return d


def doc_key(text: str) -> int:
  """Stable non-negative 63-bit content fingerprint of a document (shared across datasets).

  Used for same-document exclusion: a reference and a training chunk cut from the
  same text have the same key, whatever dataset or position they came from.
  """
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1


def sample_evenly(sources: Iterable[TfdsDocuments], max_chars: int) -> Iterator[str]:
  """Deterministic, corpus-wide tokenizer sample: evenly spaced documents of every source.

  Each source gets a share of `max_chars` proportional to its size in documents;
  documents are taken at an even stride until the share is used.
  """
  sources = list(sources)
  total = sum(len(s) for s in sources)
  for s in sources:
    share = max_chars * len(s) / max(total, 1)
    used, n = 0, len(s)
    # The stride comes from the mean length of 32 probe documents; the budget caps the rest.
    probe = s.texts(np.linspace(0, n - 1, num=min(n, 32)).astype(int).tolist())
    avg = max(1.0, sum(len(t) for t in probe) / max(len(probe), 1))
    want = int(min(n, max(1, share / avg)))
    picked = np.unique(np.linspace(0, n - 1, num=want).astype(np.int64))
    for lo in range(0, len(picked), 1024):
      for text in s.texts(picked[lo:lo + 1024].tolist()):
        if used >= share:
          break
        used += len(text)
        yield text
