"""Evaluation metrics on tasks with known answers, and scoring under each memory mode."""

import dataclasses
import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.evaluation import runner
from m3jax.evaluation import scoring
from m3jax.evaluation import tasks
from m3jax.evaluation import text_metrics
from m3jax.retrieval import schedule as sched
from m3jax.core.config import load_config, model_config
from m3jax.inference.session import Inference
from m3jax.memory.source import ArrayReferenceStore, EncodeOnTheFly
from m3jax.model.transformer import Transformer, init_params
from m3jax.retrieval.retriever import Retrieval

N_REFS = 16


@pytest.fixture(scope="module")
def cfg(repo_root):
  return dataclasses.replace(model_config(load_config(str(repo_root / "configs" / "tiny.py"))),
                             init_std=0.1)


@pytest.fixture(scope="module")
def params(cfg):
  return init_params(cfg, jax.random.key(1))


@pytest.fixture(scope="module")
def store(cfg):
  return ArrayReferenceStore.random(N_REFS, cfg.reference_length, cfg.vocab_size, seed=2,
                                    min_length=4)


@pytest.fixture(scope="module")
def source(cfg, params, store):
  return EncodeOnTheFly(Transformer(cfg), params, store)


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


# ---------------------------------------------------------------- metrics on known answers


class FakeScorer:
  """Log-likelihood = a table lookup on the continuation text."""

  def __init__(self, table):
    self.table = table
    self.requests = []

  def loglikelihood(self, requests):
    self.requests += list(requests)
    return [scoring.LLResult(self.table[r.continuation], 1, False) for r in requests]


def test_multiple_choice_acc_and_acc_norm_pick_different_choices():
  # "a": -2 (per char -2); "bbbbbbbb": -3 (per char -0.375). acc picks "a", acc_norm the other.
  scorer = FakeScorer({"a": -2.0, "bbbbbbbb": -3.0, "x": -1.0, "y": -5.0})
  items = [tasks.MCItem("ctx1", ("a", "bbbbbbbb"), 0, "q1", "seen"),
           tasks.MCItem("ctx2", ("y", "x"), 1, "q2", "unseen")]
  got = scoring.score_multiple_choice(scorer, items)
  assert got["n"] == 2
  assert got["acc"] == {"all": 1.0, "seen": 1.0, "unseen": 1.0}
  assert got["acc_norm"] == {"all": 0.5, "seen": 0.0, "unseen": 1.0}
  assert [(r.context, r.continuation, r.question) for r in scorer.requests] == [
      ("ctx1", "a", "q1"), ("ctx1", "bbbbbbbb", "q1"), ("ctx2", "y", "q2"), ("ctx2", "x", "q2")]


def test_multiple_choice_rejects_a_gold_index_out_of_range():
  with pytest.raises(ValueError, match="item 0: gold index 2"):
    scoring.score_multiple_choice(FakeScorer({}), [tasks.MCItem("c", ("a", "b"), 2, "q")])


@pytest.mark.parametrize("prediction,answer,want", [
    (" Ardenmere.\nQuestion: Where was", "Ardenmere", True),
    ("12 March 1990.", "12 March 1990", True),
    ("The University of Corvale", "university of corvale", True),
    ("Corvale University", "University of Corvale", False),
    ("", "x", False),
])
def test_exact_match_normalisation(prediction, answer, want):
  assert text_metrics.exact_match(prediction, answer) is want


def test_score_exact_match_by_group():
  items = [tasks.QAItem("p1", "Ardenmere", "q1", "seen"), tasks.QAItem("p2", "Belcaster", "q2", "seen"),
           tasks.QAItem("p3", "Corvale", "q3", "unseen")]
  got = scoring.score_exact_match(lambda its: [" Ardenmere.", " Dunmarsh.", "corvale"], items)
  assert got["exact_match"] == {"all": pytest.approx(2 / 3), "seen": 0.5, "unseen": 1.0}


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(cfg, params, source):
  p = jax.tree_util.tree_map(lambda a: a, params)
  p["lm_head"] = {"kernel": jnp.zeros_like(params["lm_head"]["kernel"])}  # logits all 0
  rng = np.random.default_rng(0)
  seqs = [rng.integers(5, cfg.vocab_size, n) for n in (17, 40, 33)]
  for mode, kw in (("none", {}), ("explicit", dict(retrieval=sched.MemoryRetrieval.for_model(
      cfg, RecordingRetriever(cfg.memories_per_chunk), source, WordTokenizer().decode)))):
    scorer = scoring.Scorer(cfg, p, WordTokenizer(), mode, batch_size=4, **kw)
    nll, n = scorer.sequence_nll(seqs)
    assert n == 16 + 39 + 32
    got = text_metrics.perplexity_from(nll, n)
    assert got["perplexity"] == pytest.approx(cfg.vocab_size, rel=1e-5)


# ---------------------------------------------------------------- scoring against the model


def _direct_logprob(cfg, params, seq, start, mem=None, mask=None):
  logits = Transformer(cfg).apply({"params": params}, jnp.asarray([seq[:-1]]), memories=mem,
                                  memory_mask=mask)
  logp = jax.nn.log_softmax(logits[0], -1)
  return float(sum(logp[k - 1, seq[k]] for k in range(start, len(seq))))


def _check_against_direct_forwards(cfg, params, tok, reqs, got):
  for r, g in zip(reqs, got):
    ctx = [cfg.bos_id] + tok.encode(r.context)
    seq = ctx + tok.encode(r.continuation)
    assert g.n_tokens == len(tok.encode(r.continuation))
    assert g.logprob == pytest.approx(_direct_logprob(cfg, params, seq, len(ctx)), abs=1e-4)


def test_loglikelihood_matches_a_direct_forward_without_memory(cfg, params):
  tok = WordTokenizer()
  scorer = scoring.Scorer(cfg, params, tok, "none", batch_size=4)
  reqs = [scoring.LLRequest("10 11 12", " 13 14", "q"), scoring.LLRequest("20 " * 19, "21", "q")]
  _check_against_direct_forwards(cfg, params, tok, reqs, scorer.loglikelihood(reqs))


def test_choices_sharing_a_context_score_as_separate_forwards(cfg, params):
  # none / rag encode a context once and feed its choices with decode steps.
  tok = WordTokenizer()
  scorer = scoring.Scorer(cfg, params, tok, "none", batch_size=2)
  conts = (" 13", " 14 15 16", " 17 18", " 19 20 21 22 23")
  reqs = [scoring.LLRequest("10 11 12", c, "q") for c in conts] + [scoring.LLRequest("30", " 31", "q")]
  _check_against_direct_forwards(cfg, params, tok, reqs, scorer.loglikelihood(reqs))


def test_explicit_scoring_retrieves_like_a_prompt_and_matches_a_direct_forward(
    cfg, params, source):
  tok = WordTokenizer()
  L, m = cfg.chunk_length, cfg.memories_per_chunk
  retriever = RecordingRetriever(m)
  retrieval = sched.MemoryRetrieval.for_model(cfg, retriever, source, tok.decode)
  scorer = scoring.Scorer(cfg, params, tok, "explicit", retrieval=retrieval, batch_size=4)
  context = " ".join(str(100 + i) for i in range(19))  # <s> + 19 = 20 tokens: chunk 1 partial
  cont = " " + " ".join(str(200 + i) for i in range(20))
  (got,) = scorer.loglikelihood([scoring.LLRequest(context, cont, "the question")])

  seq = [cfg.bos_id] + tok.encode(context) + tok.encode(cont)
  text = lambda a, b: tok.decode([t for t in seq[a:b] if t != cfg.bos_id])
  # Chunk 0 and the partial chunk 1 query with their own context text only; chunk 2 (all
  # continuation) queries with the whole of chunk 1, as generation would.
  assert retriever.calls == [([text(0, 16), text(16, 20), text(16, 32)], ["the question"] * 3)]
  ids = np.stack([np.array([(zlib.crc32(text(a, b).encode()) + 3 * j) % N_REFS
                            for j in range(m)]) for a, b in ((0, 16), (16, 20), (16, 32))])
  mem, mask = source.lookup(ids.reshape(-1))
  mem = jnp.asarray(mem).reshape((1, 3, m) + cfg.memory_shape)
  mask = jnp.asarray(mask).reshape((1, 3, m) + mask.shape[1:])
  want = _direct_logprob(cfg, params, seq, 20, mem, mask)
  assert got.logprob == pytest.approx(want, abs=1e-4)
  assert got.logprob != pytest.approx(_direct_logprob(cfg, params, seq, 20), abs=1e-3)


def test_rag_scoring_prepends_references_retrieved_once_per_question(cfg, params, store):
  tok = WordTokenizer()
  retriever = RecordingRetriever(2)
  scorer = scoring.Scorer(cfg, params, tok, "rag", retriever=retriever, references=store,
                     batch_size=4)
  reqs = [scoring.LLRequest("10 11", " 12", "7 7"), scoring.LLRequest("10 11", " 13", "7 7")]
  got = scorer.loglikelihood(reqs)
  assert retriever.calls == [(["7 7"], ["7 7"])]
  ids = np.array([(zlib.crc32(b"7 7") + 3 * j) % N_REFS for j in range(2)])
  toks, lens = store.tokens_by_ids(ids)
  ctx = [cfg.bos_id] + toks[0, :lens[0]].tolist() + toks[1, :lens[1]].tolist() + [10, 11]
  for r, g in zip(reqs, got):
    seq = ctx + tok.encode(r.continuation)
    assert g.logprob == pytest.approx(_direct_logprob(cfg, params, seq, len(ctx)), abs=1e-4)
  assert scorer.stats["rag_retrievals"] == 1


# ---------------------------------------------------------------- task files


def _write(path, rows):
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  return str(path)


def test_jsonl_loaders(tmp_path):
  hs = _write(tmp_path / "hs.jsonl", [
      {"ctx": "A man [title] sits.", "endings": ["e0", "e1", "e2", "e3"], "label": "2"}])
  (item,) = tasks.load_mc_jsonl("hellaswag", hs)
  assert item.context == "A man. sits." and item.choices == (" e0", " e1", " e2", " e3")
  assert item.gold == 2
  arc = _write(tmp_path / "arc.jsonl", [
      {"question": "Why?", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
       "answerKey": "B"}])
  (item,) = tasks.load_mc_jsonl("arc", arc)
  assert item.context == "Question: Why?\nAnswer:" and item.gold == 1
  assert item.choices == (" x", " y")
  bq = _write(tmp_path / "bq.jsonl", [
      {"passage": "P.", "question": "is it", "answer": True},
      {"passage": "P.", "question": "is it not", "answer": "false"}])
  items = tasks.load_mc_jsonl("boolq", bq)
  assert [i.gold for i in items] == [1, 0] and items[0].choices == (" no", " yes")
  assert items[0].context == "P.\nQuestion: Is it?\nAnswer:"


def test_jsonl_loader_errors_name_file_line_and_field(tmp_path):
  bad = _write(tmp_path / "arc.jsonl", [{"question": "Why?", "choices": {"text": ["x"],
                                                                        "label": ["A"]}}])
  with pytest.raises(ValueError, match=r"arc.jsonl:1: missing field `answerKey`"):
    tasks.load_mc_jsonl("arc", bad)
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    tasks.load_mc_jsonl("arc", str(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------- running and reporting


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


def test_parse_tasks_flag():
  assert tasks.parse_tasks(["perplexity", "arc=/d/arc.jsonl"]) == {"perplexity": None,
                                                               "arc": "/d/arc.jsonl"}
  with pytest.raises(ValueError, match="unknown task 'mmlu'"):
    tasks.parse_tasks(["mmlu"])
  with pytest.raises(ValueError, match="boolq needs a JSONL file"):
    tasks.parse_tasks(["boolq"])
  with pytest.raises(ValueError, match="kw_qa takes no file"):
    tasks.parse_tasks(["kw_qa=x"])


def test_continuations_are_tokenized_as_in_the_running_text(tmp_path):
  # SentencePiece encodes " Corvale" alone as ["▁", "▁Corvale"]; after "Answer:" the text
  # holds ["▁Corvale"]. Scoring must see the tokens training saw.
  from data_pipeline import knowledge_world
  from data_pipeline import tokenizer as tok_lib
  world = knowledge_world.generate(dict(n_seen=20, n_memory_taught=20, n_unseen=10))
  tok = tok_lib.train_tokenizer([d.text for d in world.train_documents + world.kb_documents],
                                str(tmp_path / "m3"), vocab_size=512)
  context, cont = "Question: Where was Alia Ashwick born?\nAnswer:", " Corvale Bay"
  ctx, got = scoring.split_continuation(tok, context, cont)
  whole = tok.encode(context + cont)
  assert ctx + got == whole and ctx == tok.encode(context)
  assert tok.decode(got) == "Corvale Bay"
  assert len(tok.encode(cont)) > len(got)  # the stand-alone encoding has an extra "▁"


def test_heldout_sequences_drop_padding(tiny_prepared):
  cfg, workdir = tiny_prepared
  from data_pipeline import prepare
  root = prepare.data_root(cfg, str(workdir))
  pad = prepare.open_tokenizer(root).pad_id
  seqs = tasks.load_heldout_sequences(root)
  assert seqs and all(pad not in s.tolist() for s in seqs)
  # The split's last sequence is padded at the end: its text is kept, the padding is not.
  assert len(seqs[-1]) <= cfg.model.max_seq_len + 1
  assert sum(len(s) for s in seqs) < len(seqs) * (cfg.model.max_seq_len + 1)
