"""Text metrics: answer normalisation, exact match, choice picking, per-group means.

Pure functions of text and numbers (no model): acc picks the largest summed
log-likelihood, acc_norm the largest per character of the continuation; exact
match compares answers after SQuAD-style normalisation (`normalize_answer`).
Every metric is reported as {"all": mean, <group>: mean, ...} (`group_means`).
"""

from __future__ import annotations

import math
import re
import string
from typing import Any, Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
  """SQuAD-style: first line, lower case, no punctuation or articles, single spaces."""
  text = text.strip().split("\n", 1)[0] if text.strip() else ""
  text = text.lower().translate(_PUNCT)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
  """Equal after `normalize_answer`."""
  return normalize_answer(prediction) == normalize_answer(answer)


def choose(logprobs: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
  """(argmax of summed log-likelihood, argmax per character of the continuation)."""
  lp = np.asarray(logprobs, np.float64)
  chars = np.asarray([max(len(c), 1) for c in choices], np.float64)
  return int(np.argmax(lp)), int(np.argmax(lp / chars))


def group_means(values: Sequence[float], groups: Sequence[str]) -> dict[str, Any]:
  """{"all": mean of values, <group>: mean over that group, ...} (ungrouped: "")."""
  out = {"all": float(np.mean(values)) if len(values) else float("nan")}
  for g in sorted(set(groups) - {""}):
    sel = [v for v, gg in zip(values, groups) if gg == g]
    out[g] = float(np.mean(sel))
  return out


def perplexity_from(nll_sum: float, n_tokens: int) -> dict[str, Any]:
  """{tokens, nll (mean per token), perplexity} from a summed negative log-likelihood."""
  nll = nll_sum / max(n_tokens, 1)
  return dict(tokens=int(n_tokens), nll=float(nll), perplexity=float(math.exp(nll)))
