"""Learning-rate schedules and the AdamW optimizer of both training stages.

The paper trains with AdamW (weight decay 0.1) under MiniCPM's warmup-stable-decay
(WSD) schedule: linear warmup, a long constant phase, then a fast decay over the
last 10% of steps (paper §5.1; docs/model.md "Learning-rate schedule and optimizer").
Cosine and constant are offered too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  """Returns step -> learning rate for `cfg.train` (`schedule` = wsd | cosine | constant)."""
  peak, steps, warmup = float(t.lr), int(t.steps), int(t.warmup_steps)
  floor = peak * float(t.min_lr_ratio)
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if t.schedule == "constant":
    rest = optax.constant_schedule(peak)
  elif t.schedule == "cosine":
    rest = optax.cosine_decay_schedule(peak, max(steps - warmup, 1), alpha=float(t.min_lr_ratio))
  elif t.schedule == "wsd":
    decay = max(int(round(steps * float(t.decay_fraction))), 1)
    stable = max(steps - warmup - decay, 0)
    rest = optax.join_schedules(
        [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)], [stable])
  else:
    raise ValueError(f"config field `train.schedule`: unknown schedule {t.schedule!r}")
  return optax.join_schedules([warm, rest], [warmup])


def decay_mask(params) -> object:
  """Weight decay applies to matrices only; norm scales (1-D) are not decayed."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Gradient clipping by global norm, then AdamW with the configured schedule."""
  chain = []
  if t.grad_clip and t.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(float(t.grad_clip)))
  chain.append(optax.adamw(learning_rate_schedule(t), b1=float(t.b1), b2=float(t.b2),
                           eps=float(t.eps), weight_decay=float(t.weight_decay),
                           mask=decay_mask))
  return optax.chain(*chain)
