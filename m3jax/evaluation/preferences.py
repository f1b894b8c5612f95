"""Held-out preference pairs: does a model prefer the reply that states the fact?

For each pair (prompt, chosen, rejected) the summed reply log-probabilities under
a model and, for DPO, under its reference are computed with the same memories
for both replies (each chunk's reference retrieved from the prompt,
m3jax.training.chat_data). Reported: the likelihood preference (share of pairs
with log π(chosen) > log π(rejected), meaningful for any model) and, against a
reference, DPO's implicit-reward margin and accuracy (m3jax.training.dpo).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from data_pipeline import chat as chat_lib
from data_pipeline import prepared
from m3jax.core import config as config_lib
from m3jax.model.transformer import Transformer
from m3jax.training import chat_data
from m3jax.training import dpo


def _batches(records: Sequence[dict[str, np.ndarray]], references: Any, batch_size: int,
             use_memory: bool):
  for lo in range(0, len(records), batch_size):
    recs = records[lo:lo + batch_size]
    batch = {k: np.stack([r[k] for r in recs]) for k in recs[0] if k != "neighbors"}
    if use_memory:
      nb = np.stack([r["neighbors"] for r in recs])
      toks, lens = references.tokens_by_ids(nb.reshape(-1))
      batch["ref_tokens"] = toks.reshape(nb.shape + toks.shape[1:]).astype(np.int32)
      batch["ref_lengths"] = lens.reshape(nb.shape).astype(np.int32)
    yield batch


def score_pairs(cfg: Any, root: str, params: Any, pairs: Sequence[chat_lib.PreferencePair], *,
                ref_params: Any = None, use_memory: bool = True, beta: float = 0.01,
                batch_size: int = 32) -> dict[str, float]:
  """Likelihood preference of `params` (and DPO metrics against `ref_params`)."""
  tok = prepared.open_tokenizer(root)
  template = chat_lib.ChatTemplate(tok)
  retriever, _ = chat_data.chunk_retriever(cfg, root, tok, template, use_memory)
  records = chat_data.preference_records(cfg, template, retriever, list(pairs))
  model = Transformer(config_lib.model_config(cfg))
  logp = jax.jit(lambda p, b: dpo.pair_logprobs(model, p, b, use_memory=use_memory))
  refs = prepared.open_references(root) if use_memory else None
  pc, pr, rc, rr = [], [], [], []
  for batch in _batches(records, refs, batch_size, use_memory):
    c, r = jax.device_get(logp(params, batch))
    pc.append(c), pr.append(r)
    if ref_params is not None:
      c, r = jax.device_get(logp(ref_params, batch))
      rc.append(c), rr.append(r)
  pc, pr = np.concatenate(pc), np.concatenate(pr)
  out = dict(pairs=len(records), likelihood_preference=float(np.mean(pc > pr)),
             logp_chosen=float(np.mean(pc)), logp_rejected=float(np.mean(pr)))
  if ref_params is not None:
    _, m = dpo.dpo_loss(pc, pr, np.concatenate(rc), np.concatenate(rr), beta)
    out.update({f"dpo_{k}": float(v) for k, v in m.items()})
  return out
