"""`m3jax tokenizer`: train a SentencePiece tokenizer with m3jax's special ids.

  m3jax tokenizer --input=a.txt,b.jsonl.gz --vocab_size=8192 --out=tok/m3

Writes tok/m3.model and tok/m3.json (sha256 hash, vocab size, special ids:
pad=0 unk=1 bos=2 eos=3 "Reference:"=4). Inputs are .txt/.jsonl(.gz) files or glob
patterns, read like `data.files` (see `data_pipeline.corpus`).
"""

from __future__ import annotations

import json
import sys

from absl import app
from absl import flags

from m3jax import cli
from m3jax import commands
from data_pipeline import corpus
from data_pipeline import tokenizer as tok_lib

_INPUT = flags.DEFINE_list("input", None, "Text files or glob patterns (.txt, .jsonl, .gz).")
_VOCAB = flags.DEFINE_integer("vocab_size", None, "Vocabulary size, special pieces included.")
_OUT = flags.DEFINE_string("out", None, "Output prefix: writes OUT.model and OUT.json.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram", "char", "word"],
                                "SentencePiece model type.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "Text field of .jsonl records.")
_TXT_DOCS = flags.DEFINE_enum("txt_docs", "blank_line", ["blank_line", "file"],
                              ".txt documents: blank-line-separated blocks or whole files.")
_MAX_SENTENCES = flags.DEFINE_integer(
    "max_sentences", 10_000_000,
    "At most this many lines are used (seeded reservoir sample over the whole input).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv: list[str]) -> None:
  commands.check_args(argv)
  for flag, value in (("--input", _INPUT.value), ("--vocab_size", _VOCAB.value),
                      ("--out", _OUT.value)):
    if not value:
      raise app.UsageError(f"{flag} is required")
  files = corpus.expand_files(_INPUT.value, "--input")
  texts = (text for _, text in corpus.iter_file_documents(
      files, text_field=_TEXT_FIELD.value, txt_docs=_TXT_DOCS.value))
  tok = tok_lib.train_tokenizer(texts, _OUT.value, vocab_size=_VOCAB.value,
                                model_type=_MODEL_TYPE.value,
                                max_sentences=_MAX_SENTENCES.value, seed=_SEED.value,
                                description=json.dumps(dict(files=files)))
  print(json.dumps(dict(model=tok.path, **tok.metadata()), indent=2))


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
