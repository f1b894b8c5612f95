"""Text RAG baseline: the retrieved references' tokens prepended to the prompt.

As in the paper's RAG baselines (paper §7.4, Table 20; docs/model.md "Memory modes"):
ONE retrieval per prompt, with the question alone as the query (few-shot examples do
not pollute it), the same index and knowledge base as explicit memory, and the references as plain text in
front of the prompt. The context is

    <s> ref_1 SEP ref_2 SEP ... ref_k SEP prompt

built from the references' stored token ids (no re-tokenization, so it is exact
and cheap); SEP is the tokenized separator text (a newline by default). The
model then runs without memory and without the `<s>Reference:` prefix.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np


class RagReferences(NamedTuple):
  """One retrieval per query: the references to prepend and what the filter removed."""
  tokens: list[list[list[int]]]  # per query, the token ids of each reference used
  ref_ids: np.ndarray  # int64 [B, k] references used (-1 = none)
  dropped: np.ndarray  # int64 [B] references removed by the leakage filter

  @property
  def n_refs(self) -> int:
    """References used, over all queries."""
    return int((self.ref_ids >= 0).sum())

  @property
  def n_dropped(self) -> int:
    """References the leakage filter removed, over all queries."""
    return int(self.dropped.sum())


class RagContexts(NamedTuple):
  contexts: list[list[int]]  # <s> + references + prompt, per row
  references: RagReferences  # what was retrieved for each row

  @property
  def ref_ids(self) -> np.ndarray:
    return self.references.ref_ids

  @property
  def dropped(self) -> np.ndarray:
    return self.references.dropped

  @property
  def n_refs(self) -> int:
    return self.references.n_refs

  @property
  def n_dropped(self) -> int:
    return self.references.n_dropped


def encode_separator(tokenizer: Any, text: str) -> list[int]:
  """The separator's token ids (none for empty text)."""
  return list(tokenizer.encode(text)) if text else []


def build_context(ref_tokens: Sequence[Sequence[int]], prompt: Sequence[int], *, bos_id: int,
                  separator: Sequence[int] = ()) -> list[int]:
  """`<s> ref_1 SEP ... ref_k SEP prompt`; the prompt's own leading <s> is dropped."""
  prompt = list(prompt)
  if prompt and prompt[0] == bos_id:
    prompt = prompt[1:]
  out = [bos_id]
  for ref in ref_tokens:
    out += list(ref) + list(separator)
  return out + prompt


def retrieve_references(retriever: Any, references: Any, queries: Sequence[str],
                        filter_texts: Sequence[str | None] | None = None) -> RagReferences:
  """ONE retrieval per query; the token ids of the references it kept.

  `retriever` is an m3jax.retrieval.retriever.Retriever (its k is the number of
  references; its leakage filter applies to `filter_texts`), `references` a
  store with `tokens_by_ids` (data_pipeline.references.ReferenceStore).
  """
  got = retriever.retrieve(list(queries), filter_texts)
  toks, lens = references.tokens_by_ids(got.ids)
  toks, lens = np.asarray(toks), np.asarray(lens)
  tokens = [[toks[row, j, :lens[row, j]].tolist() for j in range(got.ids.shape[1])
             if got.ids[row, j] >= 0] for row in range(len(queries))]
  return RagReferences(tokens, got.ids, got.dropped)


def rag_contexts(retriever: Any, references: Any, prompts: Sequence[Sequence[int]],
                 queries: Sequence[str], *, bos_id: int, separator: Sequence[int] = (),
                 filter_texts: Sequence[str | None] | None = None) -> RagContexts:
  """Retrieves once per prompt (query = `queries[i]`) and prepends the references
  (`retrieve_references`, then `build_context`)."""
  if len(queries) != len(prompts):
    raise ValueError(f"{len(queries)} RAG queries for {len(prompts)} prompts")
  got = retrieve_references(retriever, references, queries, filter_texts)
  contexts = [build_context(refs, prompt, bos_id=bos_id, separator=separator)
              for refs, prompt in zip(got.tokens, prompts)]
  return RagContexts(contexts, got)
