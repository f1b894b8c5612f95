"""The pure train step: masking, accumulation, memory path, determinism."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.core import config as config_lib
from m3jax.model import transformer as model_lib
from m3jax.training import optim
from m3jax.training import step as ts


def _batch(mc, b=4, seed=0, with_refs=False):
  rng = np.random.default_rng(seed)
  t, c = mc.max_seq_len, mc.max_seq_len // mc.chunk_length
  batch = {"tokens": rng.integers(5, mc.vocab_size, (b, t)).astype(np.int32),
           "next_token": rng.integers(5, mc.vocab_size, (b,)).astype(np.int32)}
  if with_refs:
    r = mc.reference_length
    batch["ref_tokens"] = rng.integers(5, mc.vocab_size, (b, c, r)).astype(np.int32)
    lengths = rng.integers(mc.memory_tokens_per_head, r + 1, (b, c)).astype(np.int32)
    lengths[:, 1] = 0  # a chunk without reference
    batch["ref_lengths"] = lengths
    batch["ref_tokens"] = np.where(np.arange(r) < lengths[..., None], batch["ref_tokens"], 0)
  return jax.tree.map(jnp.asarray, batch)


_STEPS = {}


def _step(mc, tx, use_memory, grad_accum=1):
  """Jitted steps shared by the tests (compiling the memory step is the slow part)."""
  key = (use_memory, grad_accum)
  if key not in _STEPS:
    _STEPS[key] = jax.jit(ts.make_train_step(mc, tx, use_memory=use_memory,
                                             grad_accum=grad_accum))
  return _STEPS[key]


@pytest.fixture(scope="module")
def setup(tiny_config):
  mc = dataclasses.replace(config_lib.model_config(tiny_config), max_seq_len=48)  # 3 chunks
  params = model_lib.init_params(mc, jax.random.key(0))
  t = tiny_config.train.copy_and_resolve_references()
  t.grad_clip = 0.0
  _STEPS.clear()
  return mc, params, t, optim.make_optimizer(t)


@pytest.mark.slow
def test_targets_shift_and_pad_mask(setup):
  mc = setup[0]
  batch = {"tokens": jnp.array([[5, 6, 7, 0]]), "next_token": jnp.array([0])}
  targets, mask = ts.targets_and_mask(batch, mc.pad_id)
  np.testing.assert_array_equal(targets, [[6, 7, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 0, 0]])


@pytest.mark.slow
def test_loss_ignores_padding_targets(setup):
  mc, params = setup[:2]
  step = ts.make_eval_step(mc, use_memory=False)
  batch = _batch(mc, b=2)
  padded = dict(batch, tokens=batch["tokens"].at[:, 40:].set(mc.pad_id),
                next_token=jnp.zeros_like(batch["next_token"]))
  out = step(params, padded)
  assert float(out["tokens"]) == 2 * 39
  manual = ts.token_losses(model_lib.Transformer(mc).apply({"params": params}, padded["tokens"]),
                           jnp.concatenate([padded["tokens"][:, 1:],
                                            padded["next_token"][:, None]], 1))
  np.testing.assert_allclose(out["loss_sum"], manual[:, :39].sum(), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("use_memory", [False, True])
def test_grad_accumulation_matches_full_batch(setup, use_memory):
  mc, params, _, tx = setup
  batch = _batch(mc, b=4, with_refs=use_memory)
  batch = dict(batch, tokens=batch["tokens"].at[0, 30:].set(mc.pad_id))  # uneven counts
  state = ts.TrainState.create(params, tx)
  full = _step(mc, tx, use_memory)(state, batch)
  acc = _step(mc, tx, use_memory, 2)(state, batch)
  np.testing.assert_allclose(full[1]["loss"], acc[1]["loss"], rtol=1e-5)
  np.testing.assert_allclose(full[1]["grad_norm"], acc[1]["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(full[0].params), jax.tree.leaves(acc[0].params)):
    np.testing.assert_allclose(a, b, atol=2e-6)


@pytest.mark.slow
def test_memory_changes_loss_and_reports_statistics(setup):
  mc, params, _, tx = setup
  batch = _batch(mc, b=4, with_refs=True)
  state = ts.TrainState.create(params, tx)
  _, with_mem = _step(mc, tx, True)(state, batch)
  _, without = _step(mc, tx, False)(state, batch)
  assert abs(float(with_mem["loss"]) - float(without["loss"])) > 1e-6
  c = mc.max_seq_len // mc.chunk_length
  assert float(with_mem["memory_chunk_share"]) == pytest.approx((c - 1) / c)
  assert 0.0 < float(with_mem["memory_attention_mass"]) < 1.0


@pytest.mark.slow
def test_gradient_through_references_is_optional(setup):
  mc, params = setup[:2]
  model = model_lib.Transformer(mc)
  batch = _batch(mc, b=4, with_refs=True)

  def ref_grad(stop):
    def f(ref_emb_scale):
      p = jax.tree.map(lambda x: x, params)
      p["embed"]["embedding"] = params["embed"]["embedding"] * ref_emb_scale
      logits, _ = ts.forward(model, p, batch, use_memory=True, grad_through_references=not stop)
      return jnp.mean(logits)
    return jax.jit(jax.grad(f))(1.0)

  assert np.isfinite(float(ref_grad(False)))
  assert float(ref_grad(False)) != pytest.approx(float(ref_grad(True)), rel=1e-6)


@pytest.mark.slow
def test_step_is_deterministic(setup):
  mc, params, _, tx = setup
  batch = _batch(mc, b=4, with_refs=True)
  step = _step(mc, tx, True)
  s0 = ts.TrainState.create(params, tx)
  a = step(s0, batch)[1]["loss"]
  b = step(s0, batch)[1]["loss"]
  assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.slow
def test_no_memory_eval_of_a_memory_model_keeps_the_sink_prefix(setup):
  # A continual model is evaluated without memory as it was trained: the `<s>Reference:`
  # prefix kept, every memory masked (m3jax.training.loop.compile_steps).
  mc, params = setup[:2]
  batch = _batch(mc, b=2)
  targets = jnp.concatenate([batch["tokens"][:, 1:], batch["next_token"][:, None]], 1)
  model = model_lib.Transformer(mc)
  for with_prefix in (True, False):
    out = ts.make_eval_step(mc, use_memory=False, with_prefix=with_prefix)(params, batch)
    logits = model.apply({"params": params}, batch["tokens"], with_prefix=with_prefix)
    np.testing.assert_allclose(out["loss_sum"], ts.token_losses(logits, targets).sum(),
                               rtol=1e-5)
  with_sink = ts.make_eval_step(mc, use_memory=False, with_prefix=True)(params, batch)
  plain = ts.make_eval_step(mc, use_memory=False)(params, batch)
  assert float(with_sink["loss_sum"]) != pytest.approx(float(plain["loss_sum"]), rel=1e-4)
