"""Direct preference optimisation (DPO): the loss and its metrics, pure functions.

For a prompt x with a chosen reply y_w and a rejected reply y_l, the policy π and
a frozen reference model π_ref (the SFT checkpoint), DPO minimises

  -log σ(β [(log π(y_w|x) - log π_ref(y_w|x)) - (log π(y_l|x) - log π_ref(y_l|x))])

(Rafailov et al., 2023; the paper's §4.6 uses β = 0.01). The implicit reward of a
reply is β (log π - log π_ref); the metrics are the mean loss, the reward margin
(chosen minus rejected reward), the preference accuracy (share of pairs whose
chosen reward is higher) and the policy's summed log-probabilities of both replies.
Log-probabilities are summed over the reply tokens only (`loss_mask`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from m3jax.core.config import ModelConfig
from m3jax.model.transformer import Transformer
from m3jax.training import step as step_lib

Batch = step_lib.Batch
Metrics = step_lib.Metrics


class DpoState(struct.PyTreeNode):
  """The train state of DPO: the policy's step, parameters and optimizer state, and the
  frozen reference parameters (the SFT checkpoint) the step scores replies with."""
  step: jax.Array
  params: Any
  opt_state: Any
  ref_params: Any

  @classmethod
  def create(cls, params: Any, tx: optax.GradientTransformation) -> "DpoState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               ref_params=params)


def sequence_logprobs(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Summed log-probability [B] of `targets` [B, T] where `mask` [B, T] is 1."""
  logp = -optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(logp * mask, axis=-1)


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, beta: float, valid: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean DPO loss over the valid pairs [B] and its metrics.

  All inputs are summed reply log-probabilities [B]; `valid` [B] (1 = a real
  pair, 0 = a padding row) weights the means.
  """
  valid = jnp.ones_like(policy_chosen) if valid is None else valid.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(valid), 1.0)
  mean = lambda x: jnp.sum(x * valid) / n
  reward_chosen = beta * (policy_chosen - ref_chosen)
  reward_rejected = beta * (policy_rejected - ref_rejected)
  margin = reward_chosen - reward_rejected
  losses = -jax.nn.log_sigmoid(margin)
  metrics = {
      "loss": mean(losses),
      "reward_margin": mean(margin),
      "reward_chosen": mean(reward_chosen),
      "reward_rejected": mean(reward_rejected),
      "preference_accuracy": mean((margin > 0).astype(jnp.float32)),
      "logp_chosen": mean(policy_chosen),
      "logp_rejected": mean(policy_rejected),
  }
  return metrics["loss"], metrics


def _side(batch: Batch, side: str) -> Batch:
  """The chosen or rejected half of a preference batch as a plain LM batch."""
  out = {k: batch[f"{side}_{k}"] for k in ("tokens", "targets", "loss_mask")}
  for k in ("ref_tokens", "ref_lengths"):
    if k in batch:
      out[k] = batch[k]
  return out


def _both(batch: Batch) -> Batch:
  """[chosen; rejected] stacked on the batch axis (one forward for both)."""
  c, r = _side(batch, "chosen"), _side(batch, "rejected")
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), c, r)


def pair_logprobs(model: Transformer, params: Any, batch: Batch, *, use_memory: bool
                  ) -> tuple[jax.Array, jax.Array]:
  """Summed reply log-probabilities (chosen [B], rejected [B]) under `params`."""
  both = _both(batch)
  logits, _ = step_lib.forward(model, params, both, use_memory=use_memory)
  logp = sequence_logprobs(logits, both["targets"], both["loss_mask"])
  B = batch["chosen_tokens"].shape[0]
  return logp[:B], logp[B:]


def _valid(batch: Batch) -> jax.Array:
  return (jnp.sum(batch["chosen_loss_mask"], -1) > 0).astype(jnp.float32)


def make_dpo_train_step(config: ModelConfig, tx: optax.GradientTransformation, *, beta: float,
                        use_memory: bool,
                        lr_schedule: Callable[[jax.Array], jax.Array] | None = None
                        ) -> Callable[[DpoState, Batch], tuple[DpoState, Metrics]]:
  """The pure DPO step: reference log-probs (frozen, same step), then the policy update."""
  model = Transformer(config)

  def loss_fn(params, batch, ref_c, ref_r):
    pc, pr = pair_logprobs(model, params, batch, use_memory=use_memory)
    return dpo_loss(pc, pr, ref_c, ref_r, beta, _valid(batch))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: DpoState, batch: Batch) -> tuple[DpoState, Metrics]:
    ref_c, ref_r = jax.lax.stop_gradient(
        pair_logprobs(model, state.ref_params, batch, use_memory=use_memory))
    (_, metrics), grads = grad_fn(state.params, batch, ref_c, ref_r)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, tokens=jnp.sum(batch["chosen_loss_mask"]) +
                   jnp.sum(batch["rejected_loss_mask"]),
                   grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(params))
    if lr_schedule is not None:
      metrics["lr"] = lr_schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_dpo_eval_step(config: ModelConfig, *, beta: float, use_memory: bool
                       ) -> Callable[[Any, Any, Batch], Metrics]:
  """(params, ref_params, batch) -> sums of the DPO metrics and the pair count."""
  model = Transformer(config)

  def eval_step(params: Any, ref_params: Any, batch: Batch) -> Metrics:
    pc, pr = pair_logprobs(model, params, batch, use_memory=use_memory)
    rc, rr = pair_logprobs(model, ref_params, batch, use_memory=use_memory)
    valid = _valid(batch)
    _, m = dpo_loss(pc, pr, rc, rr, beta, valid)
    n = jnp.sum(valid)
    return dict({k: v * n for k, v in m.items()}, pairs=n)

  return eval_step
