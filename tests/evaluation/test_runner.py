"""Running tasks in every memory mode from an opened checkpoint, and the results table."""

import numpy as np
import pytest

from eval_fakes import RecordingRetriever, WordTokenizer
from m3jax.evaluation import runner
from m3jax.evaluation import tasks
from m3jax.inference.session import Inference


@pytest.mark.slow
def test_run_all_reports_every_mode_and_filter_effect(cfg, params, source, store):
  tok = WordTokenizer()

  class DroppingRetriever(RecordingRetriever):
    """Reports one dropped reference per query while the filter is on."""

    def __init__(self, k, threshold=0.5):
      super().__init__(k)
      self.overlap_threshold = threshold

    def with_threshold(self, t):
      return DroppingRetriever(self.k, t)

    def retrieve(self, queries, filter_texts=None):
      got = super().retrieve(queries, filter_texts)
      drop = np.full(len(queries), 0 if self.overlap_threshold is None else 1, np.int64)
      return got._replace(dropped=drop)

  inf = Inference(cfg=None, config=cfg, params=params, step=None, tokenizer=tok, data_root="",
                  retriever=DroppingRetriever(cfg.memories_per_chunk), references=store,
                  memory_source=source)
  mc = [tasks.MCItem("10 11 12", (" 13", " 14 15"), 0, "10 11 12", "seen")]
  qa = [tasks.QAItem("10 11 12", "13", "10 11 12", "unseen")]
  results = runner.run_all(inf, {"kw_mc": mc, "kw_qa": qa}, ["none", "explicit"],
                           batch_size=4, max_new_tokens=3, unfiltered=True, log=lambda s: None)
  assert set(results["kw_mc"]) == {"none", "explicit", "explicit/unfiltered"}
  assert results["kw_mc"]["explicit"]["retrieval"]["dropped_by_filter"] == 1
  assert results["kw_mc"]["explicit/unfiltered"]["retrieval"]["dropped_by_filter"] == 0
  assert results["kw_qa"]["explicit"]["retrieval"]["queries"] >= 1
  table = runner.format_table(results)
  assert "kw_mc acc [seen]" in table and "kw_qa refs dropped by filter" in table
  assert "explicit/unfiltered" in table.splitlines()[0]
