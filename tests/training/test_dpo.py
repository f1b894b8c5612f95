"""DPO loss: equals a direct implementation; zero margin when policy == reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.training import dpo


def _direct(pc, pr, rc, rr, beta):
  losses, margins, acc = [], [], []
  for a, b, c, d in zip(pc, pr, rc, rr):
    m = beta * ((a - c) - (b - d))
    losses.append(math.log1p(math.exp(-m)))
    margins.append(m)
    acc.append(float(m > 0))
  return np.mean(losses), np.mean(margins), np.mean(acc)


def test_loss_equals_direct_implementation():
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(-20, 5, 6) for _ in range(4))
  loss, m = dpo.dpo_loss(*(jnp.asarray(x) for x in (pc, pr, rc, rr)), beta=0.1)
  want_loss, want_margin, want_acc = _direct(pc, pr, rc, rr, 0.1)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(m["reward_margin"], want_margin, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["preference_accuracy"], want_acc)
  np.testing.assert_allclose(m["logp_chosen"], pc.mean(), rtol=1e-5)


def test_zero_margin_when_policy_is_reference():
  lp = jnp.asarray([-3.0, -7.5, -1.25])
  lr = jnp.asarray([-4.0, -2.0, -9.0])
  loss, m = dpo.dpo_loss(lp, lr, lp, lr, beta=0.01)
  assert float(m["reward_margin"]) == 0.0
  np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-6)


def test_padding_rows_do_not_count():
  a = jnp.asarray([-1.0, 100.0])
  b = jnp.asarray([-2.0, -100.0])
  z = jnp.zeros(2)
  loss, _ = dpo.dpo_loss(a, b, z, z, beta=1.0, valid=jnp.asarray([1.0, 0.0]))
  np.testing.assert_allclose(loss, math.log1p(math.exp(-1.0)), rtol=1e-6)


def test_sequence_logprobs_sum_over_the_mask():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
  targets = jnp.asarray([[1, 2, 3, 4, 5], [6, 0, 1, 2, 3]])
  mask = jnp.asarray([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)
  got = dpo.sequence_logprobs(logits, targets, mask)
  logp = jax.nn.log_softmax(logits)
  want = [sum(float(logp[b, t, targets[b, t]]) * float(mask[b, t]) for t in range(5))
          for b in range(2)]
  np.testing.assert_allclose(got, want, rtol=1e-5)
