"""Guard of the central claim: a model trained to read memory answers questions about
people who are in no training text from memory, and is near chance without it.

A 4-layer, d=64 model (memory layers 0-1, 4 KV heads x 8 tokens, one 32-token chunk
per sequence, like configs/demo.py at a quarter of the width) trains with the
continual-stage step (`m3jax.training.step`, references encoded inside the step)
on the QA lines of 300 memory-taught people of a knowledge world, each line reading
the knowledge-base sentence that answers it. It is then asked multiple-choice
questions (gold + 9 distractors, chance 10%) about 40 unseen people, reading the
sentence that states the answer (retrieval is not under test here: the demo's
retriever finds it for 99.4% of questions), or with the sink prefix and no memory.
Text is split into words, so the test needs no tokenizer training.

Thresholds, from `run_guard(seed)` below for seeds 0-2 (world, initialisation and data
order; 600 steps; 80 unseen questions each, so one standard error is ~3.4 points at 10%):

  seed                      0       1       2
  memory                 96.2%   98.8%  100.0%
  no memory (sink kept)  12.5%   17.5%   12.5%

At 400 steps reading was not yet reliable (seeds 0 / 1: 51.2% / 62.5% with memory, 6.2% /
6.2% without), hence 600. Without memory the model sits slightly above chance (14.2% over
the 240 questions, 2.2 standard errors above 10%: a small bias left unexplained). The test asserts >= 70% with memory (26 points
below the worst run) and <= 25% without (chance + 4.4 standard errors, 7.5 points above
the worst run); seed 0 is the one it runs.
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from data_pipeline import knowledge_world as kw
from m3jax.core.config import ModelConfig
from m3jax.model.transformer import Transformer
from m3jax.training import optim
from m3jax.training import step as ts

SEED, STEPS, BATCH, LR = 0, 600, 32, 3e-3
T = R = 32  # one chunk per sequence; references of up to 32 words
MEMORY_MIN, NONE_MAX = 0.70, 0.25


class _Words:
  """Word-level ids (0-4 are the model's special ids), grown as text arrives."""

  def __init__(self):
    self.ids: dict[str, int] = {}

  def __call__(self, text: str) -> list[int]:
    return [self.ids.setdefault(w, 5 + len(self.ids))
            for w in re.findall(r"\w+|[^\w\s]|\n", text)]


def _pad(rows, n):
  out = np.zeros((len(rows), n), np.int32)
  for i, r in enumerate(rows):
    out[i, :min(len(r), n)] = r[:n]
  return out


def _batch(tokens, refs):
  return dict(tokens=jnp.asarray(_pad(tokens, T + 1)[:, :T]),
              next_token=jnp.asarray(_pad(tokens, T + 1)[:, T]),
              ref_tokens=jnp.asarray(_pad(refs, R)[:, None]),
              ref_lengths=jnp.asarray([[min(len(r), R)] for r in refs], jnp.int32))


def _train(world, words, cfg, seed):
  people = {e.id: e for e in world.entities}

  def reference(q):
    return words(kw.kb_sentences(people[q.entity_id])[kw.KB_SENTENCE_OF[q.attribute]])

  lines = [([cfg.bos_id] + words(q.text), reference(q)) for q in world.train_questions]
  questions = [([cfg.bos_id] + words(q.prompt), [words(" " + o) for o in
                                                   (q.answer,) + q.distractors], reference(q))
               for q in world.eval_questions if q.group == "unseen"]
  t = ml_collections.ConfigDict(dict(
      lr=LR, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1, grad_clip=1.0, schedule="wsd",
      warmup_steps=10, steps=STEPS, decay_fraction=0.2, min_lr_ratio=0.0))
  tx = optim.make_optimizer(t)
  model = Transformer(cfg)
  params = model.init(jax.random.key(seed), jnp.zeros((1, T), jnp.int32))["params"]
  state = ts.TrainState.create(jax.tree.map(jnp.asarray, params), tx)
  train_step = jax.jit(ts.make_train_step(cfg, tx, use_memory=True))
  rng = np.random.default_rng(seed)
  order: list[int] = []
  for _ in range(STEPS):
    if len(order) < BATCH:
      order += rng.permutation(len(lines)).tolist()
    rows, order = order[:BATCH], order[BATCH:]
    state, _ = train_step(state, _batch([lines[i][0] for i in rows],
                                        [lines[i][1] for i in rows]))
  return model, state.params, questions


def _accuracy(model, params, questions, use_memory):
  """Multiple-choice accuracy: the gold (choice 0) has the highest summed log-prob."""
  seqs, refs, spans = [], [], []
  for prompt, choices, ref in questions:
    for c in choices:
      seqs.append(prompt + c)
      refs.append(ref)
      spans.append((len(prompt), min(len(prompt) + len(c), T + 1)))
  b = _batch(seqs, refs)
  logits = jax.jit(lambda p, b: ts.forward(model, p, b, use_memory=use_memory,
                                           with_prefix=not use_memory)[0])(params, b)
  targets = np.asarray(_pad(seqs, T + 1)[:, 1:])
  lp = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(logits, -1),
                                      jnp.asarray(targets)[..., None], -1)[..., 0])
  scores = np.array([lp[i, a - 1:e - 1].sum() for i, (a, e) in enumerate(spans)])
  n_choices = len(questions[0][1])
  return float(np.mean(scores.reshape(-1, n_choices).argmax(1) == 0))


def run_guard(seed: int) -> tuple[float, float]:
  """(accuracy with memory, without) on unseen people, world/init/data from `seed`."""
  world = kw.generate(dict(seed=seed, n_seen=0, n_memory_taught=300, n_unseen=40))
  words = _Words()
  for d in world.train_documents + world.kb_documents:  # fixes the vocabulary size
    words(d.text)
  for q in world.eval_questions:
    words(" ".join((q.prompt,) + (q.answer,) + q.distractors))
  cfg = ModelConfig(vocab_size=-(-(5 + len(words.ids)) // 64) * 64, d_model=64, n_layers=4,
                    n_heads=4, n_kv_heads=4, head_dim=16, mlp_dim=192, max_seq_len=T,
                    memory_layers=(0, 1), memory_heads=(0, 1, 2, 3),
                    memory_tokens_per_head=8, reference_length=R, chunk_length=T,
                    memories_per_chunk=1)
  model, params, questions = _train(world, words, cfg, seed)
  assert len(questions) == 80
  return (_accuracy(model, params, questions, use_memory=True),
          _accuracy(model, params, questions, use_memory=False))


@pytest.mark.slow
def test_a_trained_model_answers_unseen_people_from_memory_and_only_from_memory():
  with_memory, without = run_guard(SEED)
  assert with_memory >= MEMORY_MIN, (with_memory, without)
  assert without <= NONE_MAX, (with_memory, without)
