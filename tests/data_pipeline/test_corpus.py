"""Corpus readers: formats, byte-range splitting, TFDS sources, and clear errors."""

import gzip
import json
import random

import pytest

from data_pipeline import corpus
from data_pipeline import tfds_builders


def _docs(paths, **kw):
  return [t for _, t in corpus.iter_file_documents([str(p) for p in paths], **kw)]


def test_txt_blank_line_blocks_are_documents(tmp_path):
  p = tmp_path / "a.txt"
  p.write_text("\n\nfirst doc\nsecond line\n\n \n\nsecond doc\n\n\nthird\r\nend\r\n")
  assert _docs([p]) == ["first doc\nsecond line", "second doc", "third\nend"]
  sources = [s for s, _ in corpus.iter_file_documents([str(p)])]
  assert sources[0] == f"{p}@2"


def test_txt_file_mode_is_one_document_per_file(tmp_path):
  (tmp_path / "a.txt").write_text("one\n\ntwo\n")
  (tmp_path / "b.txt").write_text("   \n")
  assert _docs([tmp_path / "a.txt", tmp_path / "b.txt"], txt_docs="file") == ["one\n\ntwo\n"]


def test_jsonl_and_gzip_with_text_field(tmp_path):
  rows = [{"body": "alpha"}, {"body": ""}, {"body": "beta é"}]
  plain = tmp_path / "a.jsonl"
  plain.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
  gz = tmp_path / "b.jsonl.gz"
  with gzip.open(gz, "wt", encoding="utf-8") as f:
    f.write("\n".join(json.dumps(r) for r in rows))
  assert _docs([plain, gz], text_field="body") == ["alpha", "beta é"] * 2


def test_globs_expand_sorted_and_deduplicated(tmp_path):
  for name in ("b.txt", "a.txt", "c.jsonl"):
    (tmp_path / name).write_text("x")
  files = corpus.expand_files([str(tmp_path / "*.txt"), str(tmp_path / "a.txt")])
  assert files == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_byte_range_splits_read_every_document_once(tmp_path, fmt):
  rng = random.Random(0)
  for trial in range(20):
    docs = ["\n".join(" ".join(rng.choice(["ab", "c", "déf"]) for _ in range(rng.randint(1, 6)))
                      for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(1, 10))]
    p = tmp_path / f"t{trial}.{fmt}"
    if fmt == "txt":
      p.write_text("".join(d + rng.choice(["\n\n", "\n\n\n", "\n \n"]) for d in docs))
    else:
      p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    whole = _docs([p])
    assert whole == docs
    for max_bytes in (1, 3, 17):
      splits = corpus.plan_file_splits([str(p)], max_split_bytes=max_bytes)
      assert len(splits) > 1
      got = [t for s in splits for _, t in corpus.iter_split_documents(s)]
      assert got == whole, (trial, max_bytes)


def test_gzip_files_are_never_split(tmp_path):
  p = tmp_path / "a.jsonl.gz"
  with gzip.open(p, "wt") as f:
    f.write('{"text": "x"}\n' * 100)
  assert len(corpus.plan_file_splits([str(p)], max_split_bytes=10)) == 1


def test_missing_file_is_named(tmp_path):
  with pytest.raises(corpus.CorpusError, match="nope.txt does not exist"):
    corpus.expand_files([str(tmp_path / "nope.txt")], "data.files")


def test_pattern_matching_nothing_is_named(tmp_path):
  with pytest.raises(corpus.CorpusError, match=r"data.kb_files: pattern .*\*.jsonl matches no"):
    corpus.expand_files([str(tmp_path / "*.jsonl")], "data.kb_files")


def test_unsupported_extension_is_named(tmp_path):
  (tmp_path / "x.parquet").write_text("")
  with pytest.raises(corpus.CorpusError, match="x.parquet: unsupported file type"):
    corpus.expand_files([str(tmp_path / "x.parquet")])


def test_directory_instead_of_files_is_explained(tmp_path):
  with pytest.raises(corpus.CorpusError, match="is a directory"):
    corpus.expand_files([str(tmp_path)])


def test_non_utf8_bytes_report_file_offset_and_line(tmp_path):
  p = tmp_path / "bad.txt"
  p.write_bytes(b"good line\n\nsecond \xff\xfe doc\n")
  with pytest.raises(corpus.CorpusError, match=r"bad.txt: invalid UTF-8 at byte offset 18, line 3"):
    _docs([p])


def test_non_utf8_in_gzip_jsonl_reports_decompressed_offset(tmp_path):
  p = tmp_path / "bad.jsonl.gz"
  with gzip.open(p, "wb") as f:
    f.write(b'{"text": "ok"}\n{"text": "\xc3("}\n')
  with pytest.raises(corpus.CorpusError, match=r"bad.jsonl.gz: invalid UTF-8 at byte offset 25 "
                     r"\(decompressed\), line 2"):
    _docs([p])


def test_jsonl_missing_text_field_names_file_line_and_field(tmp_path):
  p = tmp_path / "rows.jsonl"
  p.write_text('{"text": "a"}\n{"content": "b"}\n')
  with pytest.raises(corpus.CorpusError, match=r"rows.jsonl: line 2 has no text field 'text'"):
    _docs([p])


def test_jsonl_invalid_json_names_file_and_line(tmp_path):
  p = tmp_path / "rows.jsonl"
  p.write_text('{"text": "a"}\n{"text": \n')
  with pytest.raises(corpus.CorpusError,
                     match=r"rows.jsonl: invalid JSON at byte offset 14, line 2"):
    _docs([p])


def test_jsonl_non_string_text_is_refused(tmp_path):
  p = tmp_path / "rows.jsonl"
  p.write_text('{"text": 3}\n')
  with pytest.raises(corpus.CorpusError, match="rows.jsonl: line 1: field 'text' is int"):
    _docs([p])


def _skipping(paths, **kw):
  bad = []
  docs = [t for _, t in corpus.iter_file_documents([str(p) for p in paths], on_bad=bad.append,
                                                   **kw)]
  return docs, [(r.path.rsplit("/", 1)[-1], r.line, r.offset, r.reason) for r in bad]


def test_bad_jsonl_records_are_skipped_with_file_line_and_reason(tmp_path):
  p = tmp_path / "rows.jsonl"
  p.write_bytes(b'{"text": "a"}\n{"text": \n\n{"content": "b"}\n{"text": 3}\n'
                b'{"text": "\xc3("}\n[1]\n{"text": "z"}\n')
  docs, bad = _skipping([p])
  assert docs == ["a", "z"]
  assert bad == [("rows.jsonl", 2, 14, "invalid JSON: Expecting value"),
                 ("rows.jsonl", 4, 25, "no text field 'text'; found ['content']"),
                 ("rows.jsonl", 5, 42, "field 'text' is int, not a string"),
                 ("rows.jsonl", 6, 64, "invalid UTF-8: b'\\xc3(\"}\\n' (invalid continuation byte)"),
                 ("rows.jsonl", 7, 69, "no text field 'text'; found list")]
  with pytest.raises(corpus.BadRecordError, match="rows.jsonl: invalid JSON at byte offset 14"):
    _docs([p])  # without on_bad: the first bad record stops the read, as before


def test_bad_txt_documents_are_skipped_whole(tmp_path):
  p = tmp_path / "a.txt"
  p.write_bytes(b"good one\n\nbad \xff doc\nits second line\n\n\xfe\n\nlast good\n")
  docs, bad = _skipping([p])
  assert docs == ["good one", "last good"]
  assert [b[:3] for b in bad] == [("a.txt", 3, 14), ("a.txt", 6, 37)]
  assert _skipping([p], txt_docs="file") == (
      [], [("a.txt", 3, 14, "invalid UTF-8: b'\\xff doc\\nit' (invalid start byte)")])
  q = tmp_path / "b.txt"
  q.write_bytes(b"x\n" * 5 + b"\n\xff\n" * 3)
  for max_bytes in (1, 4, 7):  # byte ranges: every bad document is reported once
    splits = corpus.plan_file_splits([str(q)], max_split_bytes=max_bytes)
    seen = []
    got = [t for s in splits for _, t in corpus.iter_split_documents(s, on_bad=seen.append)]
    assert got == ["x\nx\nx\nx\nx"] and [r.line for r in seen] == [7, 9, 11]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  """A text dataset 'prepared elsewhere': our documents builder in its own data_dir."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  rows = [dict(text=f"document number {i} ü", source=f"s{i}") for i in range(30)]
  shards = {"train": [lambda: enumerate(rows[:13]), lambda: enumerate(rows[13:])]}
  tfds_builders.write_dataset(tfds_builders.M3jaxDocuments, data_dir,
                              features=tfds_builders.DOCUMENT_FEATURES, shards=shards)
  return data_dir


def test_tfds_source_by_name_reads_text_in_order(tfds_dir):
  src = corpus.TfdsDocuments("m3jax_documents", split="train", data_dir=tfds_dir)
  assert len(src) == 30
  assert src.text(14) == "document number 14 ü"
  assert src.texts([3, 0]) == ["document number 3 ü", "document number 0 ü"]
  assert [i for i, _ in src.iter_texts(batch=7)] == list(range(30))
  assert src.describe()["num_documents"] == 30


def test_tfds_source_missing_dataset_is_named(tfds_dir):
  with pytest.raises(corpus.CorpusError, match="no_such_corpus"):
    corpus.TfdsDocuments("no_such_corpus", data_dir=tfds_dir)


def test_tfds_source_missing_field_lists_features(tfds_dir):
  with pytest.raises(corpus.CorpusError, match=r"no text field 'body'.*'source', 'text'"):
    corpus.TfdsDocuments("m3jax_documents", data_dir=tfds_dir, text_field="body")


def test_tfds_source_missing_split_is_named(tfds_dir):
  with pytest.raises(corpus.CorpusError, match="no split 'validation'"):
    corpus.TfdsDocuments("m3jax_documents", split="validation", data_dir=tfds_dir)


def test_doc_key_is_a_stable_content_fingerprint():
  assert corpus.doc_key("abc") == corpus.doc_key("abc") != corpus.doc_key("abd")
  assert 0 <= corpus.doc_key("abc") < 2**63
  assert corpus.doc_key("abc") == 8459872020976057437  # sha256-based: same on every machine


def test_sample_evenly_spans_the_corpus(tfds_dir):
  src = corpus.TfdsDocuments("m3jax_documents", data_dir=tfds_dir)
  sample = list(corpus.sample_evenly([src], max_chars=200))
  assert 5 <= len(sample) <= 12
  assert sample[0].endswith(" 0 ü") and sample == list(corpus.sample_evenly([src], 200))
  numbers = [int(t.split()[2]) for t in sample]
  assert numbers[-1] >= 20  # reaches the end, not just the head
