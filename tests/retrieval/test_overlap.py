"""The windowed-LCS overlap (paper eq. 6) equals a plain dynamic program."""

import numpy as np
import pytest

from m3jax.retrieval import overlap as ov


def plain_overlap(t, r):
  """Eq. 6 by definition: best LCS of r with any window t[i : i + 2|r| + 1], over |r|."""
  t, r = list(t), list(r)
  m = len(r)
  if m == 0:
    return 0.0
  width = 2 * m + 1
  best = 0
  for i in range(max(1, len(t) - width + 1)):
    prev = [0] * (m + 1)
    for a in t[i:i + width]:
      cur = [0] * (m + 1)
      for j in range(m):
        cur[j + 1] = prev[j] + 1 if a == r[j] else max(prev[j + 1], cur[j])
      prev = cur
    best = max(best, prev[m])
  return best / m


def _cases(seed, n_cases):
  rng = np.random.default_rng(seed)
  for _ in range(n_cases):
    alphabet = int(rng.integers(1, 5))  # small: matches are common
    m = int(rng.integers(1, 20))
    t = rng.integers(0, alphabet, int(rng.integers(0, 120)))
    refs = [rng.integers(0, alphabet, int(rng.integers(1, 20))) for _ in range(2)]
    if len(t) > 4:  # a reference copied from t with some edits, near the threshold
      s = int(rng.integers(0, len(t) - 3))
      seg = t[s:s + m].copy()
      seg[rng.random(len(seg)) < 0.1] = alphabet
      refs.append(seg)
    yield t, refs


def test_overlap_many_equals_plain_dp_on_random_pairs():
  for t, refs in _cases(0, 60):
    want = [plain_overlap(t, r) for r in refs]
    np.testing.assert_allclose(ov.overlap_many(t, refs), want, err_msg=f"t={t.tolist()}")


@pytest.mark.parametrize("threshold", [0.3, 2 / 3, 0.9])
def test_exceeds_many_agrees_with_plain_dp(threshold):
  for t, refs in _cases(1, 40):
    want = np.array([plain_overlap(t, r) for r in refs]) > threshold
    np.testing.assert_array_equal(ov.exceeds_many(t, refs, threshold), want)


@pytest.mark.parametrize("m", [63, 64, 65, 128, 129, 140])
def test_multiword_references_carry_correctly(m):
  # Widths around 64-bit word boundaries; one symbol forces all-ones words (carry chains).
  rng = np.random.default_rng(m)
  for alphabet in (1, 2):
    t = rng.integers(0, alphabet, int(1.5 * m) + 7)
    refs = [rng.integers(0, alphabet, m), t[:m], t[-m:][::-1]]
    np.testing.assert_allclose(ov.overlap_many(t, refs), [plain_overlap(t, r) for r in refs])


def test_window_limits_the_span():
  # r's tokens all occur in t, but spread over more than 2|r| positions: not a copy.
  r = [1, 2, 3]
  spread = [1] + [0] * 10 + [2] + [0] * 10 + [3]
  assert ov.overlap(spread, r) == pytest.approx(1 / 3)
  close = [0, 1, 0, 2, 0, 3, 0]
  assert ov.overlap(close, r) == 1.0
  assert ov.overlap(spread, r) == pytest.approx(plain_overlap(spread, r))


def test_edge_cases():
  assert ov.overlap([1, 2, 3], []) == 0.0  # empty reference
  assert ov.overlap([], [1, 2]) == 0.0  # empty text
  assert not ov.exceeds([1, 2, 3], [], 0.0)
  # r longer than t: at most |t| of |r| tokens can match.
  assert ov.overlap([1, 2], [1, 2, 3, 4]) == 0.5
  # t shorter than the window: the whole of t is the only window.
  assert ov.overlap([5, 1, 9, 2], [1, 2]) == 1.0
  assert ov.overlap("abcab", "ab") == 1.0  # strings count code points


def test_verbatim_copy_exceeds_and_paraphrase_does_not():
  rng = np.random.default_rng(3)
  t = rng.integers(5, 8000, 2048)
  copy = t[700:828].copy()
  para = copy.copy()
  para[rng.permutation(128)[:40]] = rng.integers(8000, 9000, 40)  # ~31% replaced
  unrelated = rng.integers(5, 8000, 128)
  got = ov.exceeds_many(t, [copy, para, unrelated], 0.9)
  np.testing.assert_array_equal(got, [True, False, False])
  assert ov.overlap(t, copy) == 1.0
  assert ov.overlap(t, para) == pytest.approx(88 / 128)


def test_bad_input_is_named():
  with pytest.raises(ValueError, match="refs\\[0\\]"):
    ov.overlap_many([1, 2], [[0.5, 1.5]])
  with pytest.raises(ValueError, match="`t` must be a 1-D"):
    ov.overlap([[1, 2]], [1])
