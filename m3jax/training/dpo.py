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

import jax
import jax.numpy as jnp
import optax


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
