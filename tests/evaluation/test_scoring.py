"""Scoring under each memory mode against direct forwards, and task metrics from scores."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline import knowledge_world
from data_pipeline import tokenizer as tok_lib
from eval_fakes import N_REFS, RecordingRetriever, WordTokenizer
from m3jax.evaluation import scoring
from m3jax.evaluation import tasks
from m3jax.evaluation import text_metrics
from m3jax.model.transformer import Transformer
from m3jax.retrieval import schedule as sched


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


def test_score_exact_match_by_group():
  items = [tasks.QAItem("p1", "Ardenmere", "q1", "seen"),
           tasks.QAItem("p2", "Belcaster", "q2", "seen"),
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


def _direct_logprob(cfg, params, seq, start, mem=None, mask=None, with_prefix=None):
  logits = Transformer(cfg).apply({"params": params}, jnp.asarray([seq[:-1]]), memories=mem,
                                  memory_mask=mask, with_prefix=with_prefix)
  logp = jax.nn.log_softmax(logits[0], -1)
  return float(sum(logp[k - 1, seq[k]] for k in range(start, len(seq))))


def _check_against_direct_forwards(cfg, params, tok, reqs, got, with_prefix):
  for r, g in zip(reqs, got):
    ctx = [cfg.bos_id] + tok.encode(r.context)
    seq = ctx + tok.encode(r.continuation)
    assert g.n_tokens == len(tok.encode(r.continuation))
    want = _direct_logprob(cfg, params, seq, len(ctx), with_prefix=with_prefix)
    assert g.logprob == pytest.approx(want, abs=1e-4)
    # The two no-memory modes differ: the sink prefix changes what the model computes.
    other = _direct_logprob(cfg, params, seq, len(ctx), with_prefix=not with_prefix)
    assert g.logprob != pytest.approx(other, abs=1e-4)


# none keeps the `<s>Reference:` sink prefix (memories masked); none-noprefix drops it.
_NO_MEMORY = (("none", True), ("none-noprefix", False))


@pytest.mark.slow
@pytest.mark.parametrize("mode,with_prefix", _NO_MEMORY)
def test_loglikelihood_matches_a_direct_forward_without_memory(cfg, params, mode, with_prefix):
  tok = WordTokenizer()
  scorer = scoring.Scorer(cfg, params, tok, mode, batch_size=4)
  reqs = [scoring.LLRequest("10 11 12", " 13 14", "q"),
          scoring.LLRequest("20 " * 19, "21", "q")]
  _check_against_direct_forwards(cfg, params, tok, reqs, scorer.loglikelihood(reqs),
                                 with_prefix)


@pytest.mark.slow
@pytest.mark.parametrize("mode,with_prefix", _NO_MEMORY)
def test_choices_sharing_a_context_score_as_separate_forwards(cfg, params, mode, with_prefix):
  # none / rag encode a context once and feed its choices with decode steps.
  tok = WordTokenizer()
  scorer = scoring.Scorer(cfg, params, tok, mode, batch_size=2)
  conts = (" 13", " 14 15 16", " 17 18", " 19 20 21 22 23")
  reqs = ([scoring.LLRequest("10 11 12", c, "q") for c in conts]
          + [scoring.LLRequest("30", " 31", "q")])
  _check_against_direct_forwards(cfg, params, tok, reqs, scorer.loglikelihood(reqs),
                                 with_prefix)


def test_none_sequence_nll_keeps_the_sink_prefix(cfg, params):
  rng = np.random.default_rng(3)
  seq = rng.integers(5, cfg.vocab_size, 21).tolist()
  for mode, with_prefix in _NO_MEMORY:
    nll, n = scoring.Scorer(cfg, params, WordTokenizer(), mode).sequence_nll([seq])
    assert n == 20
    assert -nll == pytest.approx(_direct_logprob(cfg, params, seq, 1, with_prefix=with_prefix),
                                 abs=1e-4)


def test_perplexity_memories_are_retrieved_with_the_text_before_each_chunk(cfg, params, source):
  # Held-out perplexity retrieves as generation does: chunk c's memories with the
  # tokens before chunk c, never with the tokens it scores.
  tok = WordTokenizer()
  L, m = cfg.chunk_length, cfg.memories_per_chunk
  retriever = RecordingRetriever(m)
  retrieval = sched.MemoryRetrieval.for_model(cfg, retriever, source, tok.decode)
  scorer = scoring.Scorer(cfg, params, tok, "explicit", retrieval=retrieval, batch_size=4)
  seq = [100 + i for i in range(2 * L + 5)]  # 3 chunks of inputs (the last partial)
  nll, n = scorer.sequence_nll([seq])
  assert n == len(seq) - 1
  (queries, filters), = retriever.calls
  text = lambda a, b: tok.decode(seq[a:b])
  assert queries == [text(0, 1), text(0, L), text(L, 2 * L)]
  assert filters == [text(0, len(seq))] * 3
  for c, q in enumerate(queries):  # chunk c scores targets seq[c*L + 1 : (c+1)*L + 1]
    scored = set(seq[c * L + 1:(c + 1) * L + 1])
    assert not scored & set(tok.encode(q))
  ids = np.stack([np.array([(zlib.crc32(q.encode()) + 3 * j) % N_REFS for j in range(m)])
                  for q in queries])
  mem, mask = source.lookup(ids.reshape(-1))
  mem = jnp.asarray(mem).reshape((1, 3, m) + cfg.memory_shape)
  mask = jnp.asarray(mask).reshape((1, 3, m) + mask.shape[1:])
  assert -nll == pytest.approx(_direct_logprob(cfg, params, seq, 1, mem, mask), abs=1e-3)


def test_rag_perplexity_scores_each_chunk_after_references_its_predecessor_found(
    cfg, params, store):
  tok = WordTokenizer()
  L = cfg.chunk_length
  retriever = RecordingRetriever(2)
  scorer = scoring.Scorer(cfg, params, tok, "rag", retriever=retriever, references=store,
                          batch_size=4, rag_separator="")
  seq = [cfg.bos_id] + [100 + i for i in range(L + 3)]  # two chunks of inputs
  nll, n = scorer.sequence_nll([seq])
  assert n == len(seq) - 1
  (queries, _), = retriever.calls
  assert queries == ["", tok.decode(seq[1:L])]  # chunk 0: nothing before it
  # Chunk 0: the plain sequence (the fake retriever's ids for "" are used as the real
  # retriever would not: an empty query retrieves nothing there). Check chunk 1 directly.
  ids = np.array([(zlib.crc32(queries[1].encode()) + 3 * j) % N_REFS for j in range(2)])
  toks, lens = store.tokens_by_ids(ids)
  refs = toks[0, :lens[0]].tolist() + toks[1, :lens[1]].tolist()
  ids0 = np.array([(zlib.crc32(b"") + 3 * j) % N_REFS for j in range(2)])
  t0, l0 = store.tokens_by_ids(ids0)
  refs0 = t0[0, :l0[0]].tolist() + t0[1, :l0[1]].tolist()
  ctx0 = [cfg.bos_id] + refs0 + seq[1:L + 1]
  ctx1 = [cfg.bos_id] + refs + seq[1:]
  want = (_direct_logprob(cfg, params, ctx0, 1 + len(refs0), with_prefix=False)
          + _direct_logprob(cfg, params, ctx1, 1 + len(refs) + L, with_prefix=False))
  assert -nll == pytest.approx(want, abs=1e-3)


@pytest.mark.slow
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


@pytest.mark.slow
def test_rag_scoring_prepends_references_retrieved_once_per_question(cfg, params, store):
  tok = WordTokenizer()
  retriever = RecordingRetriever(2)
  scorer = scoring.Scorer(cfg, params, tok, "rag", retriever=retriever, references=store,
                          batch_size=4)
  reqs = [scoring.LLRequest("10 11", " 12", "7 7"),
          scoring.LLRequest("10 11", " 13", "7 7")]
  got = scorer.loglikelihood(reqs)
  assert retriever.calls == [(["7 7"], ["7 7"])]
  ids = np.array([(zlib.crc32(b"7 7") + 3 * j) % N_REFS for j in range(2)])
  toks, lens = store.tokens_by_ids(ids)
  ctx = [cfg.bos_id] + toks[0, :lens[0]].tolist() + toks[1, :lens[1]].tolist() + [10, 11]
  for r, g in zip(reqs, got):
    seq = ctx + tok.encode(r.continuation)
    assert g.logprob == pytest.approx(_direct_logprob(cfg, params, seq, len(ctx)), abs=1e-4)
  assert scorer.stats["rag_retrievals"] == 1
  assert scorer.stats["rag_refs"] == 2 and scorer.stats["rag_dropped"] == 0


def test_continuations_are_tokenized_as_in_the_running_text(tmp_path):
  # SentencePiece encodes " Corvale" alone as ["▁", "▁Corvale"]; after "Answer:" the text
  # holds ["▁Corvale"]. Scoring must see the tokens training saw.
  world = knowledge_world.generate(dict(n_seen=20, n_memory_taught=20, n_unseen=10))
  tok = tok_lib.train_tokenizer([d.text for d in world.train_documents + world.kb_documents],
                                str(tmp_path / "m3"), vocab_size=512)
  context, cont = "Question: Where was Alia Ashwick born?\nAnswer:", " Corvale Bay"
  ctx, got = scoring.split_continuation(tok, context, cont)
  whole = tok.encode(context + cont)
  assert ctx + got == whole and ctx == tok.encode(context)
  assert tok.decode(got) == "Corvale Bay"
  assert len(tok.encode(cont)) > len(got)  # the stand-alone encoding has an extra "▁"
