"""Learning-rate schedules follow their definitions; norms are not decayed."""

import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.training import optim


def _train_cfg(tiny_config, **kw):
  t = tiny_config.train.copy_and_resolve_references()
  t.update(dict(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1, decay_fraction=0.1) | kw)
  return t


def test_wsd_warmup_stable_decay(tiny_config):
  s = optim.learning_rate_schedule(_train_cfg(tiny_config, schedule="wsd"))
  assert float(s(0)) == 0.0
  assert float(s(5)) == pytest.approx(5e-4)
  assert float(s(10)) == pytest.approx(1e-3)
  assert float(s(89)) == pytest.approx(1e-3)  # stable until the last 10%
  assert float(s(95)) == pytest.approx(1e-3 - 0.5 * 9e-4)
  assert float(s(100)) == pytest.approx(1e-4)


def test_cosine_ends_at_floor(tiny_config):
  s = optim.learning_rate_schedule(_train_cfg(tiny_config, schedule="cosine"))
  assert float(s(10)) == pytest.approx(1e-3)
  assert float(s(55)) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-5)
  assert float(s(100)) == pytest.approx(1e-4)


def test_weight_decay_skips_norm_scales(tiny_config):
  t = _train_cfg(tiny_config, schedule="constant", warmup_steps=0, weight_decay=0.5, grad_clip=0.0)
  tx = optim.make_optimizer(t)
  params = {"w": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
  state = tx.init(params)
  zeros = {"w": jnp.zeros((2, 2)), "scale": jnp.zeros((2,))}
  updates, _ = tx.update(zeros, state, params)
  np.testing.assert_allclose(updates["scale"], 0.0)
  np.testing.assert_allclose(updates["w"], -1e-3 * 0.5, rtol=1e-6)
