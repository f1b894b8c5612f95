"""The train state and the pure training / evaluation step functions.

`train_step(state, batch) -> (state, metrics)` is a pure function, jitted by the
loop with explicit shardings. With memory on (continual stage, or the paper's
from-scratch ablation) each 64-token chunk's retrieved reference arrives as tokens
(`ref_tokens [B, C, R]`, `ref_lengths [B, C]`, gathered by the input pipeline);
the step encodes them through the memory layers and sparsifies them exactly as
the offline encoder does (`Transformer.memories_from_references`), and chunk c
attends to the references of chunks c-4..c.

Gradients flow through reference encoding by default (`train.grad_through_references`):
the memory layers then learn to *write* memories that later queries can read,
which is what the paper's ~2x step cost implies; turning it off makes the reference
pass forward-only (cheaper, and the memory format is fixed by the warmup weights).

Gradient accumulation splits the batch into `train.grad_accum` micro-batches and
sums token-weighted gradients, so accumulated and full-batch steps agree.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from m3jax.core.config import ModelConfig
from m3jax.model.transformer import Transformer

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class TrainState(struct.PyTreeNode):
  """Everything a step changes: the step counter, parameters and optimizer state."""
  step: jax.Array
  params: Any
  opt_state: Any

  @classmethod
  def create(cls, params: Any, tx: optax.GradientTransformation) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def batch_shapes(config: ModelConfig, batch_size: int, *, use_memory: bool
                 ) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of a global training batch as the loader delivers it (docs/architecture.md
  "Data between stages"), with one reference per chunk when memory is on."""
  b, t = batch_size, config.max_seq_len
  shapes = {"tokens": jax.ShapeDtypeStruct((b, t), jnp.int32),
            "targets": jax.ShapeDtypeStruct((b, t), jnp.int32),
            "loss_mask": jax.ShapeDtypeStruct((b, t), jnp.float32)}
  if use_memory:
    c = t // config.chunk_length
    shapes["ref_tokens"] = jax.ShapeDtypeStruct((b, c, config.reference_length), jnp.int32)
    shapes["ref_lengths"] = jax.ShapeDtypeStruct((b, c), jnp.int32)
  return shapes


def targets_and_mask(batch: Batch, pad_id: int) -> tuple[jax.Array, jax.Array]:
  """Next-token targets [B, T] and loss mask [B, T] (padding targets excluded).

  Packed records carry `next_token` (the token after the sequence), so every
  position of a sequence has a target; `targets`/`loss_mask` win when given.
  """
  tokens = batch["tokens"]
  if "targets" in batch:
    targets = batch["targets"]
  else:
    targets = jnp.concatenate([tokens[:, 1:], batch["next_token"][:, None]], axis=1)
  mask = batch["loss_mask"] if "loss_mask" in batch else targets != pad_id
  return targets, mask.astype(jnp.float32)


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token cross-entropy [B, T] in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def forward(model: Transformer, params: Any, batch: Batch, *, use_memory: bool,
            grad_through_references: bool = True,
            with_intermediates: bool = False,
            with_prefix: bool = False) -> tuple[jax.Array, dict]:
  """Logits [B, T, V] for a batch, encoding its references first when memory is on.

  `with_prefix` (memory off only) keeps the `<s>Reference:` sink prefix: a
  continual-stage model read without memory, as it was trained, all memories masked.

  Returns (logits, stats) where stats holds memory statistics when memory is on:
  `memory_chunk_share` (chunks whose reference exists) and, with
  `with_intermediates`, `memory_attention_mass` (softmax mass on memory tokens,
  mean over memory layers and memory heads, over the positions that have a target).
  """
  variables = {"params": params}
  if not use_memory:
    return model.apply(variables, batch["tokens"], with_prefix=with_prefix), {}
  memories, mask = model.apply(variables, batch["ref_tokens"], batch["ref_lengths"],
                               stop_gradient=not grad_through_references,
                               method=Transformer.memories_from_references)
  stats = {"memory_chunk_share": jnp.mean((batch["ref_lengths"] > 0).astype(jnp.float32))}
  if not with_intermediates:
    return model.apply(variables, batch["tokens"], memories=memories, memory_mask=mask), stats
  logits, inter = model.apply(variables, batch["tokens"], memories=memories, memory_mask=mask,
                              mutable=["intermediates"])
  masses = jnp.stack(jax.tree.leaves(inter["intermediates"]))  # [L_mem, B, T]
  _, weights = targets_and_mask(batch, model.config.pad_id)  # real positions only
  stats["memory_attention_mass"] = (jnp.sum(masses.mean(0) * weights) /
                                    jnp.maximum(jnp.sum(weights), 1.0))
  return logits, stats


def _split(batch: Batch, n: int) -> Batch:
  """[B, ...] -> [n, B/n, ...] micro-batches."""
  return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), batch)


def make_train_step(config: ModelConfig, tx: optax.GradientTransformation, *,
                    use_memory: bool, grad_accum: int = 1,
                    grad_through_references: bool = True,
                    lr_schedule: Callable[[jax.Array], jax.Array] | None = None
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
  """Builds the pure step (jit it with shardings in the loop)."""
  model = Transformer(config)

  def loss_sums(params, mb):
    logits, stats = forward(model, params, mb, use_memory=use_memory,
                            grad_through_references=grad_through_references,
                            with_intermediates=use_memory)
    targets, mask = targets_and_mask(mb, config.pad_id)
    losses = token_losses(logits, targets)
    return jnp.sum(losses * mask), (jnp.sum(mask), stats)

  grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

  def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    if grad_accum == 1:
      (loss_sum, (count, stats)), grads = grad_fn(state.params, batch)
    else:
      def body(carry, mb):
        g_acc, l_acc, n_acc = carry
        (l, (n, st)), g = grad_fn(state.params, mb)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, n_acc + n), st

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, loss_sum, count), stats = jax.lax.scan(
          body, (zeros, jnp.zeros(()), jnp.zeros(())), _split(batch, grad_accum))
      stats = jax.tree.map(jnp.mean, stats)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum / denom, "tokens": count, "grad_norm": optax.global_norm(grads),
               "param_norm": optax.global_norm(params), **stats}
    if lr_schedule is not None:
      metrics["lr"] = lr_schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(config: ModelConfig, *, use_memory: bool, with_prefix: bool = False
                   ) -> Callable[[Any, Batch], Metrics]:
  """Pure eval step: summed loss and token count (aggregate over batches, then divide).

  `with_prefix` (memory off): keep the `<s>Reference:` sink, memories masked."""
  model = Transformer(config)

  def eval_step(params: Any, batch: Batch) -> Metrics:
    logits, stats = forward(model, params, batch, use_memory=use_memory,
                            with_intermediates=use_memory, with_prefix=with_prefix)
    targets, mask = targets_and_mask(batch, config.pad_id)
    out = {"loss_sum": jnp.sum(token_losses(logits, targets) * mask), "tokens": jnp.sum(mask)}
    out.update(stats)
    return out

  return eval_step


def state_logical_specs(abstract_state: TrainState) -> Any:
  """Logical PartitionSpecs of a boxed abstract state (optimizer moments follow params)."""
  return nn.get_partition_spec(abstract_state)
