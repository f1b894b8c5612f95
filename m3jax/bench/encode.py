"""`m3jax bench encode`: reference-encoding throughput against a full forward pass.

Both sides run the same config with random parameters on the same random tokens,
[B, R] with R = model.reference_length (every reference full length), batch-sharded
over this process's devices exactly as `m3jax encode-memory` shards it:

- encode: `ReferenceEncoder` (the job's jitted encoder: `<s>Reference:` prefix +
  reference through layers 0..last memory layer, top-k selection, bfloat16 memories);
- forward: `Transformer.__call__` on the same [B, R] tokens (all layers + LM head,
  memory off): what encoding would cost without the early stop.

Each is compiled and warmed up, then timed `repeats` times (median). Tokens count
reference tokens only (the P prefix tokens the encoder also runs are not counted).
With memory layers = the first half, the layers alone give ~2x; the skipped LM head
and the selection scores move it up or down (the FLOP ratio from m3jax.model.costs is
printed beside the measured one).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

from m3jax.core.config import model_config
from m3jax.core.errors import InputError
from m3jax.memory import bank_format
from m3jax.memory import codecs
from m3jax.memory import pq as pq_lib
from m3jax.memory.encoder import ReferenceEncoder, encoder_mesh, sample_memories
from m3jax.memory.quantization_quality import quantization_report
from m3jax.memory.source import ArrayReferenceStore
from m3jax.model import costs
from m3jax.model.transformer import Transformer, init_params


def _time(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, float, list[float]]:
  """(first-call seconds incl. compile, median seconds, all timed runs)."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  for _ in range(max(0, warmup - 1)):
    jax.block_until_ready(fn())
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    runs.append(time.perf_counter() - t0)
  return first, statistics.median(runs), runs


def run(cfg: Any, *, batch_size: int = 16, repeats: int = 5, warmup: int = 2, seed: int = 0,
        printer: Callable[[str], None] | None = print) -> dict[str, Any]:
  """Measures encode vs forward throughput; returns the figures (and prints them)."""
  mc = model_config(cfg)
  if repeats < 1 or warmup < 1 or batch_size < 1:
    raise InputError("bench encode: batch_size, repeats and warmup must be >= 1")
  params = init_params(mc, jax.random.key(seed))
  mesh = encoder_mesh(cfg)
  encoder = ReferenceEncoder(mc, params, batch_size, mesh=mesh)
  r = mc.reference_length
  rng = np.random.default_rng(seed)
  tokens = rng.integers(5, mc.vocab_size, size=(batch_size, r)).astype(np.int32)
  lengths = np.full(batch_size, r, np.int32)

  model = Transformer(mc)
  forward = jax.jit(lambda p, t: model.apply({"params": p}, t),
                    in_shardings=(jax.tree.map(lambda x: x.sharding, encoder.params),
                                  encoder._tok_sharding))  # pylint: disable=protected-access
  dev_tokens = jax.device_put(tokens, encoder._tok_sharding)  # pylint: disable=protected-access

  enc_first, enc_s, enc_runs = _time(lambda: encoder(tokens, lengths), warmup, repeats)
  fwd_first, fwd_s, fwd_runs = _time(lambda: forward(encoder.params, dev_tokens), warmup,
                                     repeats)
  n_tok = batch_size * r
  enc_flops = costs.explicit_write_flops(mc) * batch_size
  fwd_flops = costs.forward_flops(mc, r, lm_head=True) * batch_size
  out = dict(
      config=cfg.get("name", ""), device=jax.devices()[0].device_kind,
      devices=encoder.data_parallel, batch_references=batch_size, reference_length=r,
      tokens_per_batch=n_tok, memory_layers=list(mc.memory_layers), n_layers=mc.n_layers,
      repeats=repeats,
      encode_seconds=enc_s, encode_first_call_seconds=enc_first,
      encode_references_per_s=batch_size / enc_s, encode_tokens_per_s=n_tok / enc_s,
      forward_seconds=fwd_s, forward_first_call_seconds=fwd_first,
      forward_references_per_s=batch_size / fwd_s, forward_tokens_per_s=n_tok / fwd_s,
      speedup=fwd_s / enc_s, flop_ratio=fwd_flops / enc_flops,
      encode_gflops_per_s=enc_flops / enc_s / 1e9, forward_gflops_per_s=fwd_flops / fwd_s / 1e9,
      encode_runs=enc_runs, forward_runs=fwd_runs)
  if printer is not None:
    printer(format_result(out))
  return out


def quantization(cfg: Any, *, n_references: int = 2048, seed: int = 0,
                 printer: Callable[[str], None] | None = print) -> dict[str, Any]:
  """Bytes and reconstruction error of int8 and of PQ (cfg.bank settings) on a sample.

  Encodes `n_references` random full-length references with random parameters
  (training uses 3/4 of them, the error is measured on the held-out quarter), so
  the figures describe the codecs' mechanics, not a trained model's memories.
  """
  mc = model_config(cfg)
  settings = bank_format.bank_settings(cfg)
  params = init_params(mc, jax.random.key(seed))
  mesh = encoder_mesh(cfg)
  batch = 16 * mesh.shape["data"]
  encoder = ReferenceEncoder(mc, params, batch, mesh=mesh)
  store = ArrayReferenceStore.random(n_references, mc.reference_length, mc.vocab_size,
                                     seed=seed, min_length=mc.reference_length)
  mem = sample_memories(encoder, store, np.arange(n_references))
  n_train = n_references * 3 // 4
  t0 = time.perf_counter()
  pq = pq_lib.train_pq(mem[:n_train], grouping=settings.pq_groups,
                          subvectors=settings.pq_subvectors, iterations=settings.pq_iterations,
                          opq_iterations=settings.pq_opq_iterations, seed=settings.pq_seed)
  train_s = time.perf_counter() - t0
  held = mem[n_train:]
  reports = [quantization_report(c, held)
             for c in (codecs.BFloat16Codec(mc.memory_shape),
                       codecs.Int8Codec(mc.memory_shape), pq)]
  codes = pq.encode(held)
  t0 = time.perf_counter()
  pq.decode(codes)
  decode_s = time.perf_counter() - t0
  out = dict(config=cfg.get("name", ""), references=n_references, train_references=n_train,
             pq_train_seconds=train_s,
             pq_decode_memories_per_s=len(held) / decode_s,
             pq=pq.describe(),
             reports=[dataclasses.asdict(r) for r in reports])
  if printer is not None:
    printer(f"quantization: {cfg.get('name', '')}, memories {mc.memory_shape}, PQ trained on "
            f"{n_train} references in {train_s:.1f} s, error on {len(held)} held out; PQ "
            f"decode {out['pq_decode_memories_per_s']:,.0f} memories/s on the CPU")
    for r in reports:
      printer("  " + r.line())
  return out


def format_result(r: dict[str, Any]) -> str:
  return "\n".join([
      f"bench encode: {r['config']} on {r['devices']} x {r['device']}, "
      f"{r['batch_references']} references x {r['reference_length']} tokens, "
      f"median of {r['repeats']}",
      f"  encode  (layers 0..{max(r['memory_layers'])} + top-k): "
      f"{r['encode_references_per_s']:,.1f} refs/s, {r['encode_tokens_per_s']:,.0f} tokens/s "
      f"({r['encode_seconds'] * 1e3:.1f} ms/batch, {r['encode_gflops_per_s']:.1f} GFLOP/s; "
      f"first call {r['encode_first_call_seconds']:.2f} s)",
      f"  forward (all {r['n_layers']} layers + LM head): "
      f"{r['forward_references_per_s']:,.1f} refs/s, {r['forward_tokens_per_s']:,.0f} tokens/s "
      f"({r['forward_seconds'] * 1e3:.1f} ms/batch, {r['forward_gflops_per_s']:.1f} GFLOP/s; "
      f"first call {r['forward_first_call_seconds']:.2f} s)",
      f"  encode / forward tokens/s: {r['speedup']:.2f}x (FLOP ratio from m3jax.model.costs: "
      f"{r['flop_ratio']:.2f}x)",
  ])
