"""lm-evaluation-harness adapter: an m3jax checkpoint as an lm-eval `LM` named "m3jax".

    lm_eval.simple_evaluate(model="m3jax", model_args="checkpoint=runs/demo/continual,"
                            "workdir=runs/demo,memory=explicit", tasks=["hellaswag"])

(after `import m3jax.evaluation.lm_eval_adapter`, which registers the name), or from the
command line with `m3jax-lm-eval` (m3jax.commands.lm_eval: lm-eval's own CLI with this
model registered; lm-eval 0.4 discovers no models from other packages by itself).

Model arguments: `checkpoint` (what `load_for_inference` takes), `memory`
(explicit | none | rag), `workdir` / `data_dir` / `index` / `bank` (as `m3jax eval`:
the prepare-data directory, the ScaNN index and the memory bank, by default found from
the workdir), `leakage_filter` (default True) and `overlap_threshold` (default
`data.eval_overlap_threshold`), `query_field` (a field of the task's documents used as
the RAG query and the leakage filter's text, e.g. `question` for ARC / BoolQ; default:
the request's context, which is what `m3jax eval` uses for HellaSwag), `batch_size`,
`max_gen_toks`, `dtype`.

Nothing is scored here: requests go to the scorer and generator `m3jax eval` uses
(m3jax.evaluation.scoring.Scorer, m3jax.inference.generate.TextGenerator), so memories
follow the same retrieval schedule (every chunk of the context retrieves with its own
text; generated chunks follow the generation rule) and the numbers are `m3jax eval`'s.
"""

from __future__ import annotations

import sys
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from m3jax.evaluation import runner
from m3jax.evaluation.scoring import LLRequest, Scorer
from m3jax.inference import generate as gen_lib
from m3jax.inference import session as inference

NAME = "m3jax"


def _none(value: Any) -> Any:
  """lm-eval passes model args as strings (or parsed numbers/bools); "" and None mean unset."""
  return None if value in ("", None, "None") else value


def _bool(value: Any) -> bool:
  return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model(NAME)
class M3jaxLM(LM):
  """An m3jax checkpoint under one memory mode (see the module docstring)."""

  def __init__(self, checkpoint: str, memory: str = "explicit", workdir: str | None = None,
               data_dir: str | None = None, index: str | None = None, bank: str | None = None,
               leakage_filter: Any = True, overlap_threshold: Any = None,
               query_field: str = "", batch_size: Any = 8, max_gen_toks: Any = 256,
               dtype: str | None = None, **unused: Any):
    super().__init__()
    memory = "none" if memory is None else memory  # lm-eval parses `memory=none` as None
    if memory not in gen_lib.MEMORY_MODES:
      raise ValueError(f"model arg memory={memory!r}: expected one of {gen_lib.MEMORY_MODES}")
    self.mode = memory
    self.inf = inference.open_inference(
        str(checkpoint), modes=[memory], workdir=_none(workdir), data_dir=_none(data_dir),
        index_dir=_none(index), bank_dir=_none(bank), dtype=_none(dtype),
        log=lambda msg: print(msg, file=sys.stderr))
    threshold = _none(overlap_threshold)
    threshold = runner.filter_threshold(self.inf, _bool(leakage_filter),
                                        None if threshold is None else float(threshold))
    if self.inf.retriever is not None:
      self.inf.retriever = self.inf.retriever.with_threshold(threshold)
    self.query_field = _none(query_field) or ""
    size = _none(batch_size)
    self.batch_size = 8 if size is None or str(size).startswith("auto") else int(size)
    self.max_gen_toks = int(max_gen_toks)
    self.retrieval = (inference.memory_retrieval(self.inf, cache_queries=True)
                      if memory == "explicit" else None)
    inf = self.inf
    self.scorer = Scorer(inf.config, inf.params, inf.tokenizer, memory,
                         retrieval=self.retrieval, retriever=inf.retriever,
                         references=inf.references, batch_size=self.batch_size)

  # ------------------------------------------------------------ helpers

  def _question(self, request: Any, context: str) -> str:
    doc = getattr(request, "doc", None)
    if self.query_field and isinstance(doc, dict) and self.query_field in doc:
      return str(doc[self.query_field])
    return context

  # ------------------------------------------------------------ the LM interface

  def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False
                    ) -> list[tuple[float, bool]]:
    """(log p(continuation | context), continuation is the greedy one) per request."""
    reqs = [LLRequest(ctx, cont, self._question(r, ctx))
            for r in requests for ctx, cont in [r.args[:2]]]
    return [(r.logprob, r.greedy) for r in self.scorer.loglikelihood(reqs)]

  def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                            ) -> list[float]:
    """log p of each whole string after <s> (m3jax eval's perplexity scoring, one sequence
    at a time: explicit memory retrieves per chunk, RAG once with the first chunk)."""
    bos = self.inf.config.bos_id
    out = []
    for r in requests:
      tokens = [bos] + list(self.inf.tokenizer.encode(r.args[0]))
      nll, _ = self.scorer.sequence_nll([tokens])
      out.append(-float(nll))
    return out

  def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
    """Greedy completions (m3jax generate's schedule), cut at the first `until` string."""
    textgen = gen_lib.TextGenerator(gen_lib.Generator(self.inf.config, self.inf.params),
                                    self.inf.tokenizer, self.mode, retrieval=self.retrieval,
                                    retriever=self.inf.retriever,
                                    references=self.inf.references)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, r in enumerate(requests):
      kw = dict(r.args[1]) if len(r.args) > 1 else {}
      until = kw.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      key = (tuple(until), int(kw.get("max_gen_toks", self.max_gen_toks)))
      groups.setdefault(key, []).append(i)
    out: list[str] = [""] * len(requests)
    for (until, max_new), rows in groups.items():
      prompts = [requests[i].args[0] for i in rows]
      questions = [self._question(requests[i], requests[i].args[0]) for i in rows]
      done = textgen.complete(prompts, max_new_tokens=max_new, batch_size=self.batch_size,
                              queries=questions, filter_texts=questions)
      for i, c in zip(rows, done):
        text = c.text
        for stop in until:
          if stop and stop in text:
            text = text[:text.index(stop)]
        out[i] = text
    return out
