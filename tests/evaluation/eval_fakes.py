"""Fakes shared by the evaluation tests: a word tokenizer and a recording retriever."""

import zlib

import numpy as np

from m3jax.retrieval.retriever import Retrieval

N_REFS = 16  # references in the `store` fixture (conftest.py)


class WordTokenizer:
  """Text is space-separated token ids."""

  def encode(self, text):
    return [int(w) for w in text.split()]

  def decode(self, ids):
    return " ".join(str(int(i)) for i in ids)


class RecordingRetriever:
  def __init__(self, k):
    self.k = k
    self.calls = []

  def retrieve(self, queries, filter_texts=None):
    self.calls.append((list(queries), None if filter_texts is None else list(filter_texts)))
    ids = np.array([[(zlib.crc32(q.encode()) + 3 * j) % N_REFS for j in range(self.k)]
                    for q in queries], np.int64).reshape(-1, self.k)
    return Retrieval(ids, np.zeros(ids.shape, np.float32), np.zeros(len(queries), np.int64))
