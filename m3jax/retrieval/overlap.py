"""The paper's windowed LCS overlap (eq. 6) between a text t and a reference r.

    overlap(t, r) = (1/|r|) max{ N : i_1 < ... < i_N, j_1 < ... < j_N,
                                    |i_N - i_1| <= 2|r|, t[i_k] = r[j_k] }

A common subsequence whose matched positions in t span at most 2|r| lies inside
one window t[i : i + 2|r| + 1], so the overlap is the largest LCS between r and
any such window, divided by |r|. Training drops references with overlap > 0.9
(the text contains the reference nearly verbatim); evaluation drops > 2/3.

Evaluating every window naively costs O(|t| * |r| * 2|r|) per pair. Here:
  * LCS lengths come from the bit-parallel algorithm of Allison-Dix / Hyyro
    (bits index positions of r, one step per token of t; a step with a token
    absent from r is the identity, so those tokens are skipped), vectorised in
    numpy over many (reference, block of t) rows at once;
  * a branch-and-bound over blocks of window starts: the LCS of a block of t
    covering several windows bounds each of them from above, and the first
    window of the block, read mid-scan, is an exact lower bound; blocks whose
    bound cannot beat the best window found (or the threshold, for `exceeds`)
    are dropped, the rest are halved until each covers one window;
  * for `exceeds`, a bag-of-tokens bound (sum over tokens of the smaller count)
    settles most unrelated pairs before any LCS is computed.
Results are exact (tests compare with a plain dynamic program).

Sequences are 1-D integer arrays (token ids); a `str` is taken as its code
points. An empty reference has overlap 0.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

Tokens = Union[np.ndarray, Sequence[int], str]

# Rows (pair x block) scanned together; bounds temporary memory to a few MB per word.
_ROWS_PER_BATCH = 8192
# Pairs whose match tables are built together (memory ~ pairs * distinct tokens of t).
_PAIRS_PER_GROUP = 256


def window_length(ref_len: int) -> int:
  """Length of the windows of t searched for a reference of `ref_len` tokens."""
  return 2 * ref_len + 1


def _as_tokens(x: Tokens, name: str) -> np.ndarray:
  if isinstance(x, str):
    return np.frombuffer(x.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
  a = np.asarray(x)
  if a.ndim != 1:
    raise ValueError(f"overlap: `{name}` must be a 1-D token sequence, got shape {a.shape}")
  if a.size and not np.issubdtype(a.dtype, np.integer):
    raise ValueError(f"overlap: `{name}` must hold integer token ids, got dtype {a.dtype}")
  return a.astype(np.int64, copy=False)


def overlap(t: Tokens, r: Tokens) -> float:
  """Eq. 6 overlap of reference `r` with text `t`, in [0, 1]."""
  return float(overlap_many(t, [r])[0])


def exceeds(t: Tokens, r: Tokens, threshold: float) -> bool:
  """True iff overlap(t, r) > threshold (cheaper than computing the overlap)."""
  return bool(exceeds_many(t, [r], threshold)[0])


def overlap_many(t: Tokens, refs: Sequence[Tokens]) -> np.ndarray:
  """Overlap of each reference with the same text t: float64 [len(refs)]."""
  lcs, lens = _run(t, refs, threshold=None)
  return np.where(lens > 0, lcs / np.maximum(lens, 1), 0.0)


def exceeds_many(t: Tokens, refs: Sequence[Tokens], threshold: float) -> np.ndarray:
  """Whether each reference's overlap with t exceeds `threshold`: bool [len(refs)]."""
  threshold = float(threshold)
  if not np.isfinite(threshold):
    raise ValueError(f"overlap: threshold must be finite, got {threshold}")
  lcs, lens = _run(t, refs, threshold=threshold)
  return (lens > 0) & (lcs / np.maximum(lens, 1) > threshold)


def _run(t: Tokens, refs: Sequence[Tokens], threshold: float | None):
  """Returns (lcs int64 [P], ref lengths int64 [P]).

  With a threshold the LCS value is exact only as far as deciding
  `lcs / len > threshold` needs: pairs proven below keep a lower value.
  """
  t = _as_tokens(t, "t")
  refs = [_as_tokens(r, f"refs[{i}]") for i, r in enumerate(refs)]
  lens = np.array([len(r) for r in refs], dtype=np.int64)
  lcs = np.zeros(len(refs), dtype=np.int64)
  if len(t) == 0:
    return lcs, lens
  u_t, inv_t = np.unique(t, return_inverse=True)
  inv_t = inv_t.astype(np.int64).reshape(-1)
  cnt_t = np.bincount(inv_t, minlength=len(u_t))
  # Group pairs by bit-vector width (words of 64 bits) so each scan has one shape.
  words = (lens + 63) // 64
  for nw in np.unique(words[lens > 0]):
    idx = np.nonzero((words == nw) & (lens > 0))[0]
    for g in range(0, len(idx), _PAIRS_PER_GROUP):
      sel = idx[g:g + _PAIRS_PER_GROUP]
      lcs[sel] = _group(len(t), inv_t, u_t, cnt_t, [refs[i] for i in sel], int(nw), threshold)
  return lcs, lens


def _group(n: int, inv_t: np.ndarray, u_t: np.ndarray, cnt_t: np.ndarray,
           refs: list[np.ndarray], nw: int, threshold: float | None) -> np.ndarray:
  """Windowed LCS for refs that all need `nw` words; see module docstring."""
  P, K = len(refs), len(u_t)
  m = np.array([len(r) for r in refs], dtype=np.int64)
  W = window_length(m)
  # Positions of every reference token in t's alphabet (K = "absent from t").
  pair_of = np.repeat(np.arange(P), m)
  pos_in_r = np.concatenate([np.arange(k) for k in m])
  r_all = np.concatenate(refs)
  loc = np.searchsorted(u_t, r_all)
  loc_c = np.minimum(loc, K - 1)
  present = u_t[loc_c] == r_all
  loc = np.where(present, loc_c, K)
  best = np.zeros(P, dtype=np.int64)
  if threshold is not None:
    # Bag-of-tokens bound: no common subsequence beats the multiset intersection.
    cnt_r = np.bincount(pair_of[present] * K + loc[present], minlength=P * K).reshape(P, K)
    bag = np.minimum(cnt_r, cnt_t[None, :]).sum(axis=1)
    alive = np.nonzero(bag / m > threshold)[0]
    if len(alive) < P:
      if len(alive):
        best[alive] = _group(n, inv_t, u_t, cnt_t, [refs[i] for i in alive], nw, threshold)
      return best

  # Match masks: pm[w][p, k] has bit j set iff r_p[64 w + j] is token u_t[k].
  pm = [np.zeros(P * (K + 1), dtype=np.uint64) for _ in range(nw)]
  for w in range(nw):
    in_word = present & (pos_in_r // 64 == w)
    bits = np.left_shift(np.uint64(1), (pos_in_r[in_word] % 64).astype(np.uint64))
    np.bitwise_or.at(pm[w], pair_of[in_word] * (K + 1) + loc[in_word], bits)
  has = np.zeros(P * (K + 1), dtype=bool)
  for w in range(nw):
    has |= pm[w] != 0
  # Each pair's view of t compacted to the tokens that occur in r: a step with a
  # token absent from r leaves the bit-vector unchanged, so blocks scan only these.
  # kept[p, i]: prefix counts; stream: match masks of the kept tokens, pair by pair.
  code_t = np.arange(P)[:, None] * (K + 1) + inv_t[None, :]
  keep_t = has[code_t]
  kept = np.zeros((P, n + 1), dtype=np.int64)
  np.cumsum(keep_t, axis=1, out=kept[:, 1:])
  offset = np.cumsum(kept[:, -1]) - kept[:, -1]
  kept_codes = code_t[keep_t]
  # One extra all-zero entry at the end pads rows shorter than the longest.
  stream = np.zeros((nw, len(kept_codes) + 1), dtype=np.uint64)
  for w in range(nw):
    stream[w, :-1] = pm[w][kept_codes]
  n_starts = np.maximum(n - W + 1, 1)
  s0 = np.where(n <= W, 1, 1 << np.ceil(np.log2(W)).astype(np.int64))
  # Initial blocks: starts 0, s0, 2 s0, ... for each pair.
  counts = (n_starts + s0 - 1) // s0
  rp = np.repeat(np.arange(P), counts)
  first = np.cumsum(counts) - counts
  ra = (np.arange(len(rp)) - np.repeat(first, counts)) * s0[rp]
  rs = s0[rp]
  decided = np.zeros(P, dtype=bool)

  while len(rp):
    ub = np.empty(len(rp), dtype=np.int64)
    lb = np.empty(len(rp), dtype=np.int64)
    for b in range(0, len(rp), _ROWS_PER_BATCH):
      sl = slice(b, b + _ROWS_PER_BATCH)
      ub[sl], lb[sl] = _scan_blocks(n, stream, kept, offset, m, W, n_starts,
                                    rp[sl], ra[sl], rs[sl])
    np.maximum.at(best, rp, lb)
    if threshold is None:
      keep = (ub > best[rp]) & (rs > 1)
    else:
      decided |= best / m > threshold
      keep = (ub / m[rp] > threshold) & ~decided[rp] & (ub > best[rp]) & (rs > 1)
    rp, ra, rs = rp[keep], ra[keep], rs[keep]
    half = rs // 2
    second = ra + half < n_starts[rp]
    rp = np.concatenate([rp, rp[second]])
    ra = np.concatenate([ra, (ra + half)[second]])
    rs = np.concatenate([half, half[second]])
  return best


def _scan_blocks(n, stream, kept, offset, m, W, n_starts, rp, ra, rs):
  """Bit-parallel LCS of r_p against each block t[a : a + s - 1 + W].

  Returns (LCS of the whole block, LCS of its first window t[a : a + W]).
  """
  nw = stream.shape[0]
  R = len(rp)
  s_eff = np.minimum(rs, n_starts[rp] - ra)
  end = np.minimum(ra + s_eff - 1 + W[rp], n)
  first = kept[rp, ra]
  nk = kept[rp, end] - first  # kept tokens in the block
  cut = kept[rp, np.minimum(ra + W[rp], n)] - first  # ... and in its first window
  Lc = int(nk.max()) if R else 0
  lcs_end = np.zeros(R, dtype=np.int64)
  lcs_cut = np.zeros(R, dtype=np.int64)
  if Lc == 0:
    return lcs_end, lcs_cut
  steps = np.arange(Lc)[:, None]
  idx = np.where(steps < nk[None, :], (offset[rp] + first)[None, :] + steps,
                 stream.shape[1] - 1)  # [Lc, R], step-major for contiguous reads
  M = np.stack([stream[w][idx] for w in range(nw)], axis=1)  # [Lc, nw, R]
  ones = np.uint64(0xFFFFFFFFFFFFFFFF)
  V = np.full((nw, R), ones, dtype=np.uint64)
  snap = np.full((nw, R), ones, dtype=np.uint64)
  order = np.argsort(cut, kind="stable")
  bounds = np.searchsorted(cut[order], np.arange(Lc + 2))
  U = np.empty((nw, R), dtype=np.uint64)
  S = np.empty((nw, R), dtype=np.uint64)
  raw_carry = np.empty((max(nw - 1, 1), R), dtype=bool)
  for j in range(Lc):
    # V <- (V + (V & M)) | (V & ~M), a multi-word add with the carry rippling up.
    np.bitwise_and(V, M[j], out=U)
    np.add(V, U, out=S)
    if nw > 1:
      np.less(S[:-1], V[:-1], out=raw_carry)  # carries out of each word before carry-in
      cin = raw_carry[0]
      for w in range(1, nw):
        np.add(S[w], cin, out=S[w], casting="unsafe")
        if w + 1 < nw:  # an all-ones word that received a carry wrapped to 0
          cin = raw_carry[w] | ((S[w] == 0) & cin)
    np.bitwise_xor(V, U, out=V)
    np.bitwise_or(V, S, out=V)
    lo, hi = bounds[j + 1], bounds[j + 2]
    if hi > lo:
      r_idx = order[lo:hi]
      snap[:, r_idx] = V[:, r_idx]
  mj = m[rp]
  for w in range(nw):
    nbits = np.clip(mj - 64 * w, 0, 64).astype(np.uint64)
    mask = np.where(nbits == 64, ones,
                    (np.left_shift(np.uint64(1), np.minimum(nbits, 63)) - np.uint64(1)))
    lcs_end += np.bitwise_count(V[w] & mask).astype(np.int64)
    lcs_cut += np.bitwise_count(snap[w] & mask).astype(np.int64)
  # Rows whose first window keeps no token of r: their snapshot was never taken.
  zero_cut = cut == 0
  return mj - lcs_end, np.where(zero_cut, 0, mj - lcs_cut)
