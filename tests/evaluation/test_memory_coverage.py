"""Answer coverage: retrieval and sparse selection measured against the model's own encoding."""

import dataclasses

import jax
import numpy as np
import pytest

from m3jax.evaluation import runner
from m3jax.evaluation import tasks
from m3jax.evaluation import coverage as cov
from m3jax.core.config import load_config, model_config
from m3jax.inference.session import Inference
from m3jax.memory.source import ArrayReferenceStore
from m3jax.model.transformer import Transformer, init_params
from m3jax.retrieval.retriever import Retrieval


class WordTokenizer:
  """Text is space-separated token ids; any other word is token 1."""

  def encode(self, text):
    return [int(w) if w.isdigit() else 1 for w in text.split()]


class FixedRetriever:
  def __init__(self, ids):
    self.ids = np.asarray(ids, np.int64)

  def retrieve(self, queries, filter_texts=None):
    ids = self.ids[:len(queries)]
    return Retrieval(ids, np.zeros(ids.shape, np.float32), np.zeros(len(queries), np.int64))


@pytest.fixture(scope="module")
def setup(repo_root):
  cfg = dataclasses.replace(model_config(load_config(str(repo_root / "configs" / "tiny.py"))),
                            init_std=0.1)
  params = init_params(cfg, jax.random.key(3))
  store = ArrayReferenceStore.random(6, cfg.reference_length, cfg.vocab_size, seed=4,
                                     min_length=cfg.reference_length)
  return cfg, params, store


def test_find_subsequence():
  assert cov.find_subsequence([5, 6, 7, 6, 7], [6, 7]) == 1
  assert cov.find_subsequence([5, 6, 7], [7, 5]) == -1
  assert cov.find_subsequence([5], []) == -1


@pytest.mark.slow
def test_coverage_equals_the_models_kept_positions(setup):
  cfg, params, store = setup
  tokens, lengths = store.tokens_by_ids(np.arange(len(store)))
  _, kept = Transformer(cfg).apply({"params": params}, tokens, lengths,
                                   method=Transformer.encode_references)
  kept = np.asarray(kept)
  p = cfg.prefix_length
  items, expect_kept = [], []
  # Each question asks for a 2-token span of reference i, at positions chosen so that
  # some answers' first tokens are kept and some are not.
  for i in range(len(store)):
    row = tokens[i].tolist()
    for at in (int(kept[i, 0, 0, 0]) - p, 3):
      if cov.find_subsequence(row, row[at:at + 2]) != at:
        continue  # the span occurs earlier too: the first occurrence would be checked
      items.append(tasks.QAItem("", " ".join(map(str, row[at:at + 2])), f"q{i}-{at}",
                             "even" if i % 2 == 0 else "odd"))
      expect_kept.append([(kept[i, l] == p + at).any() for l in range(cfg.n_memory_layers)])
  # The gold reference plus one that holds other tokens; one question retrieves nothing.
  gold = [int(it.question[1:].split("-")[0]) for it in items]
  ids = [[g, (g + 1) % len(store)] for g in gold]
  ids[-1] = [-1, -1]
  expect_kept[-1] = [False] * cfg.n_memory_layers
  out = cov.answer_coverage(items, cfg, params, WordTokenizer(), FixedRetriever(ids), store)
  expect_kept = np.array(expect_kept)
  assert 0 < expect_kept[:, 0].sum() < len(items)  # the check can tell kept from dropped
  retrieved = np.ones(len(items), bool)
  retrieved[-1] = False
  assert out["answer_retrieved"]["all"] == pytest.approx(retrieved.mean())
  for l, layer in enumerate(cfg.memory_layers):
    assert out[f"answer_kept_l{layer}"]["all"] == pytest.approx(expect_kept[:, l].mean())
  assert out["answer_kept_any"]["all"] == pytest.approx(expect_kept.any(1).mean())
  assert out["answer_kept_all"]["all"] == pytest.approx(expect_kept.all(1).mean())
  odd = np.array([it.group == "odd" for it in items])
  assert out["answer_kept_any"]["odd"] == pytest.approx(expect_kept.any(1)[odd].mean())
  assert out["items"] == len(items)


def test_coverage_runs_as_an_eval_task_in_explicit_mode_only(setup):
  cfg, params, store = setup
  row = store.tokens_by_ids(np.array([0]))[0][0].tolist()
  items = [tasks.QAItem("", f"{row[5]} {row[6]}", "q", "unseen")]
  inf = Inference(cfg=None, config=cfg, params=params, step=None, tokenizer=WordTokenizer(),
                  data_root="", retriever=FixedRetriever([[0, 1]]), references=store)
  results = runner.run_all(inf, {"kw_coverage": items}, ["none", "explicit"], log=lambda m: None)
  assert list(results["kw_coverage"]) == ["explicit"]
  assert results["kw_coverage"]["explicit"]["answer_retrieved"]["unseen"] == 1.0
  assert "kw_coverage answer_kept_any" in runner.format_table(results)
  with pytest.raises(ValueError, match="explicit"):
    runner.run_task(inf, "kw_coverage", items, "rag", retriever=inf.retriever)
