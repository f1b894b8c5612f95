"""Generation: the retrieval schedule, explicit memory vs a slow reference, sampling, RAG."""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.model import kv_cache as decoding
from m3jax.inference import generate as gen_lib
from m3jax.retrieval import rag as rag_lib
from m3jax.retrieval import schedule as sched
from m3jax.core.config import load_config, model_config
from m3jax.memory.source import ArrayReferenceStore, EncodeOnTheFly
from m3jax.model.transformer import Transformer, init_params
from m3jax.retrieval.retriever import Retrieval, Retriever

N_REFS = 24


@pytest.fixture(scope="module")
def cfg(repo_root):
  # Larger init so memories visibly change the logits.
  return dataclasses.replace(model_config(load_config(str(repo_root / "configs" / "tiny.py"))),
                             init_std=0.1)


@pytest.fixture(scope="module")
def params(cfg):
  return init_params(cfg, jax.random.key(0))


@pytest.fixture(scope="module")
def store(cfg):
  return ArrayReferenceStore.random(N_REFS, cfg.reference_length, cfg.vocab_size, seed=1,
                                    min_length=4)


@pytest.fixture(scope="module")
def source(cfg, params, store):
  return EncodeOnTheFly(Transformer(cfg), params, store)


@pytest.fixture(scope="module")
def generator(cfg, params):
  return gen_lib.Generator(cfg, params)


def detok(ids):
  return " ".join(str(i) for i in ids)


def fake_ids(query: str, k: int) -> list[int]:
  """Deterministic, query-dependent reference ids (distinct within a query)."""
  h = zlib.crc32(query.encode())
  return [(h + 5 * j) % N_REFS for j in range(k)]


class RecordingRetriever:
  """Stands in for Retriever: ids from a hash of the query; records every call."""

  def __init__(self, k):
    self.k = k
    self.calls = []

  def retrieve(self, queries, filter_texts=None):
    self.calls.append(list(queries))
    ids = np.array([fake_ids(q, self.k) for q in queries], np.int64).reshape(-1, self.k)
    return Retrieval(ids, np.zeros(ids.shape, np.float32), np.zeros(len(queries), np.int64))


def memory_retrieval(cfg, source, retriever):
  return sched.MemoryRetrieval.for_model(cfg, retriever, source, detok)


# ---------------------------------------------------------------- the schedule


def test_schedule_128_in_128_out_makes_three_retrievals():
  plan = sched.chunk_queries(128, 128 + 128 - 1, 64)
  assert [(q.chunk, q.start, q.end, q.reuse) for q in plan] == [
      (0, 0, 64, None), (1, 64, 128, None), (2, 64, 128, 1), (3, 128, 192, None)]
  assert sched.retrieval_count(128, 255, 64) == 3


def test_schedule_partial_prompt_chunk_queries_with_partial_text_and_is_continued():
  plan = sched.chunk_queries(100, 100 + 60 - 1, 64)
  # Chunk 1 holds prompt tokens 64..99 (partial query); generation continues it, and
  # chunk 2 queries with the whole of chunk 1 (prompt tail + generated head).
  assert [(q.chunk, q.start, q.end, q.reuse) for q in plan] == [
      (0, 0, 64, None), (1, 64, 100, None), (2, 64, 128, None)]
  assert sched.decode_memory_chunk(100, 64) == 1
  assert not sched.retrieves_before(100, 100, 64)
  assert sched.retrieves_before(128, 100, 64)
  assert not sched.retrieves_before(129, 100, 64)


def test_schedule_generation_rule_agrees_with_chunk_plan():
  for n in (1, 5, 16, 17, 31, 32, 40):
    for i in range(n, n + 60):
      want = i % 16 == 0 and sched.chunk_query(i // 16, n, 16).retrieves
      assert sched.retrieves_before(i, n, 16) == want, (n, i)
    first = sched.chunk_query(sched.decode_memory_chunk(n, 16), n, 16)
    assert first.retrieves and first.start < n <= first.start + 16


def test_schedule_rejects_bad_lengths():
  with pytest.raises(ValueError, match="at least one token"):
    sched.chunk_queries(0, 10, 16)
  with pytest.raises(ValueError, match="n_input"):
    sched.chunk_queries(10, 5, 16)


# ---------------------------------------------------------------- generation vs slow reference


def slow_greedy(cfg, params, source, prompt, max_new, *, memory: bool, with_prefix=None):
  """Recomputes the whole sequence with `Transformer.__call__` for every new token.

  The sequence is right-padded to a fixed length (causal: padding does not change
  earlier logits) so the forward compiles once; the next token is the argmax at
  the last real position. With memory, chunk c gets the references the schedule
  assigns to it (fake_ids of its query text), chunks past the sequence none.
  """
  model = Transformer(cfg)
  m, L = cfg.memories_per_chunk, cfg.chunk_length
  total = -(-(len(prompt) + max_new) // L) * L
  forward = jax.jit(lambda p, t, mem, mask: model.apply(
      {"params": p}, t, memories=mem, memory_mask=mask, with_prefix=with_prefix))
  seq = list(prompt)
  for _ in range(max_new):
    tokens = np.zeros((1, total), np.int32)
    tokens[0, :len(seq)] = seq
    mem = mask = None
    if memory:
      ids = np.full((total // L, m), -1, np.int64)
      for q in sched.chunk_queries(len(prompt), len(seq), L):
        ids[q.chunk] = (ids[q.reuse] if q.reuse is not None else
                        fake_ids(detok([t for t in seq[q.start:q.end] if t != cfg.bos_id]), m))
      mem, mask = source.lookup(ids.reshape(-1))
      mem = jnp.asarray(mem).reshape((1, total // L, m) + cfg.memory_shape)
      mask = jnp.asarray(mask).reshape((1, total // L, m) + mask.shape[1:])
    logits = forward(params, tokens, mem, mask)
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


def _prompts(cfg):
  rng = np.random.default_rng(3)
  # Lengths: exactly one chunk, a partial second chunk, a short prompt (tiny: L = 16).
  return [[cfg.bos_id] + rng.integers(5, cfg.vocab_size, n - 1).tolist() for n in (16, 20, 7)]


@pytest.mark.slow
def test_explicit_memory_generation_matches_slow_reference_and_schedule(cfg, params, source,
                                                                        generator):
  prompts, max_new, L = _prompts(cfg), 30, cfg.chunk_length
  retriever = RecordingRetriever(cfg.memories_per_chunk)
  segment = gen_lib._compiled(cfg)[1]
  compiled_before = segment._cache_size()
  out = generator.generate(prompts, max_new_tokens=max_new,
                           memory=memory_retrieval(cfg, source, retriever), stop_at_eos=False)
  # Five boundaries (segments) below, but the decode loop compiled at most once.
  assert segment._cache_size() - compiled_before <= 1
  want = [slow_greedy(cfg, params, source, p, max_new, memory=True) for p in prompts]
  assert out.tokens.tolist() == want

  # The exact retrieval calls. Context index i of row r is prompt + generated tokens.
  ctx = [p + w for p, w in zip(prompts, want)]
  text = lambda r, a, b: detok([t for t in ctx[r][a:b] if t != cfg.bos_id])
  # First call: every prompt chunk of every row, with its own (maybe partial) text.
  first = [text(0, 0, 16), text(1, 0, 16), text(1, 16, 20), text(2, 0, 7)]
  # Then, in step order: a row feeding context index i = n + s - 1 with i % 16 == 0 and
  # i > n queries with [i - 16, i).  Row 0 (n=16): i=32 at s=17. Row 1 (n=20): i=32 at
  # s=13, i=48 at s=29. Row 2 (n=7): i=16 at s=10, i=32 at s=26.
  later = [[text(2, 0, 16)], [text(1, 16, 32)], [text(0, 16, 32)], [text(2, 16, 32)],
           [text(1, 32, 48)]]
  assert retriever.calls == [first] + later
  n_in = [len(p) + max_new - 1 for p in prompts]
  assert out.retrievals == sum(sched.retrieval_count(len(p), n, L)
                               for p, n in zip(prompts, n_in)) == 9


@pytest.mark.slow
def test_memories_change_the_generation_and_prefix_only_matches_reference(cfg, params, source,
                                                                          generator):
  """Guards the comparison above: with random memories, outputs differ from no memory."""
  prompts = _prompts(cfg)
  with_mem = generator.generate(prompts, max_new_tokens=30, stop_at_eos=False, memory=(
      memory_retrieval(cfg, source, RecordingRetriever(cfg.memories_per_chunk))))
  plain = generator.generate(prompts, max_new_tokens=30, stop_at_eos=False, with_prefix=True)
  assert with_mem.tokens.tolist() != plain.tokens.tolist()
  assert plain.tokens.tolist() == [
      slow_greedy(cfg, params, source, p, 30, memory=False, with_prefix=True) for p in prompts]


@pytest.mark.slow
def test_no_memory_generation_matches_slow_reference(cfg, params, source, generator):
  prompts = _prompts(cfg)
  out = generator.generate(prompts, max_new_tokens=12, stop_at_eos=False)
  assert out.retrievals == 0
  assert out.tokens.tolist() == [slow_greedy(cfg, params, source, p, 12, memory=False)
                                 for p in prompts]


@pytest.mark.slow
def test_rag_generation_matches_slow_reference(cfg, params, source, generator, store):
  """RAG = the plain model on references + prompt: the decode loop equals recomputation."""
  prompts = _prompts(cfg)[:2]
  got = rag_lib.rag_contexts(RecordingRetriever(cfg.memories_per_chunk), store, prompts,
                             ["q a", "q b"], bos_id=cfg.bos_id)
  out = generator.generate(got.contexts, max_new_tokens=6, stop_at_eos=False)
  assert out.tokens.tolist() == [slow_greedy(cfg, params, source, c, 6, memory=False)
                                 for c in got.contexts]


def chain_params(cfg, params, chain):
  """Params whose greedy next token depends only on the current one: `chain[a] = b`.

  Attention and MLP outputs are zeroed, so the residual stream is the token's
  embedding; token a's embedding is a one-hot in dimension j, and the LM head maps
  dimension j to token chain[a]. Other tokens embed to zero (argmax: token 0).
  """
  p = jax.tree_util.tree_map(np.array, params)
  for i in range(cfg.n_layers):
    p[f"layers_{i}"]["attn"]["o"]["kernel"][:] = 0
    p[f"layers_{i}"]["mlp"]["down"]["kernel"][:] = 0
  p["embed"]["embedding"][:] = 0
  p["lm_head"]["kernel"][:] = 0
  for j, (a, b) in enumerate(chain.items()):
    p["embed"]["embedding"][a, j] = 1.0
    p["lm_head"]["kernel"][j, b] = 10.0
  return jax.tree_util.tree_map(jnp.asarray, p)


@pytest.mark.slow
def test_stops_each_row_at_its_eos_and_pads_after(cfg, params):
  p = chain_params(cfg, params, {10: 11, 11: 12, 12: cfg.eos_id})
  # Three rows padded to 32 tokens, 12 new: the shapes of the other no-memory tests.
  prompts = [[cfg.bos_id, 5, 10], [cfg.bos_id, 12], [cfg.bos_id] + [5] * 18 + [11]]
  gen = gen_lib.Generator(cfg, p)
  out = gen.generate(prompts, max_new_tokens=12)
  assert out.tokens.tolist() == [[11, 12] + [cfg.pad_id] * 10, [cfg.pad_id] * 12,
                                 [12] + [cfg.pad_id] * 11]
  assert out.lengths.tolist() == [2, 0, 1]
  assert out.stopped_at_eos.tolist() == [True, True, True]
  # Without stopping, the chain runs into token 0 after eos (eos embeds to zero).
  out = gen.generate(prompts, max_new_tokens=12, stop_at_eos=False)
  assert out.tokens[0, :4].tolist() == [11, 12, cfg.eos_id, 0]
  assert out.lengths.tolist() == [12, 12, 12]


# ---------------------------------------------------------------- sampling


def test_sampling_is_deterministic_for_a_key_and_varies_with_it(cfg, generator):
  prompts = _prompts(cfg)
  s = gen_lib.Sampling(temperature=1.0)
  a = generator.generate(prompts, max_new_tokens=12, sampling=s, key=jax.random.key(7),
                         stop_at_eos=False)
  b = generator.generate(prompts, max_new_tokens=12, sampling=s, key=jax.random.key(7),
                         stop_at_eos=False)
  c = generator.generate(prompts, max_new_tokens=12, sampling=s, key=jax.random.key(8),
                         stop_at_eos=False)
  assert a.tokens.tolist() == b.tokens.tolist()
  assert a.tokens.tolist() != c.tokens.tolist()


def test_tiny_top_p_equals_greedy(cfg, generator):
  prompts = _prompts(cfg)
  greedy = generator.generate(prompts, max_new_tokens=12, stop_at_eos=False)
  nucleus = generator.generate(prompts, max_new_tokens=12, stop_at_eos=False,
                               sampling=gen_lib.Sampling(temperature=1.0, top_p=1e-6),
                               key=jax.random.key(3))
  assert nucleus.tokens.tolist() == greedy.tokens.tolist()


def test_top_p_keeps_only_the_nucleus():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draw = jax.vmap(lambda k: gen_lib.sample_tokens(logits, k, 1.0, 0.7, greedy=False,
                                                  nucleus=True))(keys)[:, 0]
  counts = np.bincount(np.asarray(draw), minlength=4)
  assert counts[2] == counts[3] == 0  # 0.5 + 0.3 >= 0.7: tokens 2, 3 are outside
  assert 0.5 < counts[0] / 400 < 0.75  # renormalised: 0.5 / 0.8 = 0.625


def test_sampling_rejects_bad_settings():
  with pytest.raises(ValueError, match="top_p"):
    gen_lib.Sampling(temperature=1.0, top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    gen_lib.Sampling(temperature=-1.0)


def test_sampling_without_a_key_is_refused(cfg, generator):
  with pytest.raises(ValueError, match="PRNG key"):
    generator.generate(_prompts(cfg), max_new_tokens=2, sampling=gen_lib.Sampling(1.0))


# ---------------------------------------------------------------- retriever and RAG


class TableEmbedder:
  """Query text 'qN' -> one-hot vector N (so search order is controlled)."""
  dim = 8

  def embed(self, texts):
    out = np.zeros((len(texts), self.dim), np.float32)
    for i, t in enumerate(texts):
      out[i, int(t[1:]) % self.dim] = 1.0
    return out


class TableIndex:
  """Fixed candidate list per query vector: row n of `table`."""

  def __init__(self, table):
    self.table = np.asarray(table, np.int64)

  def search(self, vectors, k):
    rows = np.argmax(vectors, axis=1)
    ids = self.table[rows][:, :k]
    return ids, -np.arange(ids.shape[1], dtype=np.float32)[None].repeat(len(ids), 0)


def test_retriever_leakage_filter_drops_overlapping_refs_and_backfills():
  toks = np.zeros((6, 8), np.int32)
  lens = np.full(6, 6, np.int32)
  for i in range(6):
    toks[i, :6] = np.arange(6) + 100 * (i + 1)
  question = [200, 201, 202, 203, 204, 205, 9, 9]  # contains ref 1 verbatim
  store = ArrayReferenceStore(toks, lens)
  tokenize = lambda text: question if text == "Q" else [1]
  index = TableIndex([[1, 2, 4, 5, 0, 3]] * 8)
  r = Retriever(TableEmbedder(), index, k=3, references=store, tokenize=tokenize,
                overlap_threshold=2 / 3, overfetch=3)
  got = r.retrieve(["q0", "q1", "  "], ["Q", None, "Q"])
  assert got.ids.tolist() == [[2, 4, 5], [1, 2, 4], [-1, -1, -1]]
  assert got.dropped.tolist() == [1, 0, 0]
  off = r.with_threshold(None).retrieve(["q0"], ["Q"])
  assert off.ids.tolist() == [[1, 2, 4]] and off.dropped.tolist() == [0]


def test_retriever_pads_when_the_filter_leaves_too_few():
  toks = np.arange(8, dtype=np.int32).reshape(2, 4) + 10
  store = ArrayReferenceStore(toks, np.full(2, 4, np.int32))
  r = Retriever(TableEmbedder(), TableIndex([[0, 1]] * 8), k=3, references=store,
                tokenize=lambda t: list(range(10, 18)), overlap_threshold=0.5, overfetch=2)
  got = r.retrieve(["q0"], ["text"])
  assert got.ids.tolist() == [[-1, -1, -1]] and got.dropped.tolist() == [2]
  assert np.isinf(got.scores).all()


def test_rag_context_prepends_reference_tokens_once_per_prompt(cfg, store):
  retriever = RecordingRetriever(3)
  prompts = [[cfg.bos_id, 50, 51], [cfg.bos_id, 60]]
  out = rag_lib.rag_contexts(retriever, store, prompts, ["first", "second"],
                             bos_id=cfg.bos_id, separator=[7])
  assert retriever.calls == [["first", "second"]]
  toks, lens = store.tokens_by_ids(out.ref_ids)
  for row, prompt in enumerate(prompts):
    want = [cfg.bos_id]
    for j in range(3):
      want += toks[row, j, :lens[row, j]].tolist() + [7]
    assert out.contexts[row] == want + prompt[1:]


def test_rag_references_keep_only_used_ids_and_count_what_the_filter_dropped(store):
  class FilteringRetriever(RecordingRetriever):
    def retrieve(self, queries, filter_texts=None):
      got = super().retrieve(queries, filter_texts)
      ids = got.ids.copy()
      ids[0, 1:] = -1  # the filter removed two of the first query's references
      return got._replace(ids=ids, dropped=np.array([2, 0], np.int64))

  got = rag_lib.retrieve_references(FilteringRetriever(3), store, ["first", "second"])
  toks, lens = store.tokens_by_ids(got.ref_ids)
  assert [len(refs) for refs in got.tokens] == [1, 3]
  assert got.tokens[1][2] == toks[1, 2, :lens[1, 2]].tolist()
  assert got.n_refs == 4 and got.n_dropped == 2
  out = rag_lib.rag_contexts(FilteringRetriever(3), store, [[7], [8]], ["first", "second"],
                             bos_id=1)
  assert out.references.tokens == got.tokens and out.n_refs == 4 and out.n_dropped == 2
  assert out.contexts[0] == [1] + got.tokens[0][0] + [7]


def test_read_prompts_from_flags_text_and_jsonl(tmp_path):
  txt = tmp_path / "p.txt"
  txt.write_text("first\\nline\n\nsecond\n")
  jl = tmp_path / "p.jsonl"
  jl.write_text('{"prompt": "a\\nb"}\n')
  assert gen_lib.read_prompts(str(txt), ["x\\ny"]) == ["x\ny", "first\nline", "second"]
  assert gen_lib.read_prompts(str(jl)) == ["a\nb"]
  jl.write_text('{"text": 1}\n')
  with pytest.raises(ValueError, match=r"p.jsonl:1: expected a JSON object"):
    gen_lib.read_prompts(str(jl))
  with pytest.raises(ValueError, match="no prompts"):
    gen_lib.read_prompts(None, [])


class _RecordingGenerator:
  """Records how TextGenerator calls Generator.generate; returns empty completions."""

  def __init__(self, config):
    self.config, self.calls = config, []

  def generate(self, prompts, **kw):
    self.calls.append(kw)
    n = len(prompts)
    return gen_lib.GenerationOutput(np.zeros((n, 1), np.int32), np.zeros((n,), np.int32),
                                    np.zeros((n,), bool), 0)


@pytest.mark.parametrize("mode,with_prefix", [("none", True), ("none-noprefix", False)])
def test_text_generation_without_memory_keeps_the_sink_prefix_in_mode_none(cfg, mode,
                                                                           with_prefix):
  fake = _RecordingGenerator(cfg)
  tok = type("Tok", (), dict(encode=lambda self, t: [int(w) for w in t.split()],
                             decode=lambda self, ids: " ".join(map(str, ids))))()
  gen_lib.TextGenerator(fake, tok, mode).complete(["10 11"], max_new_tokens=2)
  assert fake.calls[0]["with_prefix"] is with_prefix and fake.calls[0]["memory"] is None
  assert gen_lib.uses_reference_prefix(mode) is with_prefix
