"""Does the answer reach the memory? Retrieval and sparse-selection coverage of QA answers.

    answer_coverage(items, config, params, tokenizer, retriever, references) -> metrics

Explicit memory can only answer a question when (1) a retrieved reference holds the
answer and (2) the reference's sparse memory kept the answer's tokens: each memory
layer keeps `memory_tokens_per_head` tokens per KV head, chosen by how much
attention the reference pays them (m3jax.model.sparsify), not by what questions will ask.
This measures both steps on questions with known answers (the knowledge world's
`kw_coverage` eval task):

- answer_retrieved: share of questions for which the answer's tokens (as they
  appear in running text after a space) occur in one of the retrieved references;
- answer_kept_l{i}: share of questions for which the answer's first token is kept
  by at least one KV head of memory layer i in such a reference;
- answer_kept_any / answer_kept_all: kept in at least one / in every memory layer.

Each metric is a dict {"all": share, <group>: share, ...} like the other tasks'.
Kept positions come from the encode job's own encoder (m3jax.memory.encoder), so they
are what the bank stores.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from m3jax.core.config import ModelConfig
from m3jax.core.errors import InputError
from m3jax.evaluation.scoring import split_continuation
from m3jax.evaluation.text_metrics import group_means
from m3jax.memory import encoder as encoder_lib

REFS_PER_DEVICE = 16  # references per encoding step and data-parallel device


def answer_tokens(tokenizer: Any, answer: str) -> list[int]:
  """The answer's tokens as they appear after a word and a space in running text."""
  return split_continuation(tokenizer, "a", " " + answer.strip())[1]


def find_subsequence(haystack: Sequence[int], needle: Sequence[int]) -> int:
  """Index of the first occurrence of `needle` in `haystack`, -1 if absent."""
  hay, needle, n = list(haystack), list(needle), len(needle)
  if n == 0:
    return -1
  return next((i for i in range(len(hay) - n + 1) if hay[i:i + n] == needle), -1)


def answer_coverage(items: Sequence[Any], config: ModelConfig, params: Any, tokenizer: Any,
                    retriever: Any, references: Any) -> dict[str, Any]:
  """Coverage metrics (module docstring) over QA items with .question, .answer, .group."""
  if retriever is None or references is None:
    raise InputError("kw_coverage needs an index (retriever) and the references")
  if not items:
    raise InputError("kw_coverage: no questions")
  got = retriever.retrieve([it.question for it in items],
                           filter_texts=[it.question for it in items])
  unique = np.unique(got.ids[got.ids >= 0])
  tokens, lengths = references.tokens_by_ids(unique)
  tokens, lengths = np.asarray(tokens), np.asarray(lengths)
  mesh = encoder_lib.encoder_mesh()
  encoder = encoder_lib.ReferenceEncoder(config, params, REFS_PER_DEVICE * mesh.shape["data"],
                                        mesh=mesh)
  _, kept = encoder_lib.encode_ids(encoder, references, unique)
  row = {int(r): i for i, r in enumerate(unique.tolist())}
  p = config.prefix_length
  n_layers = config.n_memory_layers
  retrieved = np.zeros(len(items), bool)
  kept_by_layer = np.zeros((len(items), n_layers), bool)
  for q, it in enumerate(items):
    needle = answer_tokens(tokenizer, it.answer)
    for rid in got.ids[q]:
      if rid < 0:
        continue
      i = row[int(rid)]
      at = find_subsequence(tokens[i, :lengths[i]].tolist(), needle)
      if at < 0:
        continue
      retrieved[q] = True
      kept_by_layer[q] |= (kept[i] == p + at).any(axis=(1, 2))
  groups = [getattr(it, "group", "") for it in items]
  by_group = lambda values: group_means(values.tolist(), groups)
  result: dict[str, Any] = dict(answer_retrieved=by_group(retrieved))
  for layer in range(n_layers):
    result[f"answer_kept_l{config.memory_layers[layer]}"] = by_group(kept_by_layer[:, layer])
  result["answer_kept_any"] = by_group(kept_by_layer.any(axis=1))
  result["answer_kept_all"] = by_group(kept_by_layer.all(axis=1))
  result["items"] = len(items)
  return result
