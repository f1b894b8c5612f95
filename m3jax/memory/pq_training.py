"""Training the PQ quantizer of a bank from a sample of encoded references.

Before any shard is encoded, process 0 encodes a seeded uniform sample of
`bank.pq_train_references` references, trains the codebooks (m3jax.memory.pq) and
saves `quantizer.npz` into the bank; the other processes wait for that file.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np

from m3jax.core.progress import format_duration
from m3jax.memory import bank_format
from m3jax.memory import bank_shards
from m3jax.memory import pq as pq_lib
from m3jax.memory.quantization_quality import quantization_report
from m3jax.memory.encoder import ReferenceEncoder, sample_memories


def train_quantizer(encoder: ReferenceEncoder, references: Any,
                    settings: bank_format.BankSettings, printer: Callable[[str], None] = print
                    ) -> pq_lib.ProductQuantizer:
  """PQ codebooks from a seeded uniform sample of references (+ a held-out error)."""
  n = len(references)
  rng = np.random.default_rng(settings.pq_seed)
  n_train = min(n, settings.pq_train_references)
  perm = rng.permutation(n)
  train_ids = np.sort(perm[:n_train])
  held_ids = np.sort(perm[n_train:n_train + max(1, n_train // 4)])
  t0 = time.monotonic()
  printer(f"encode-memory: training PQ codebooks ({settings.pq_groups}, sub-vectors "
          f"{settings.pq_subvectors}) on {n_train} references")
  train = sample_memories(encoder, references, train_ids)
  quantizer = pq_lib.train_pq(
      train, grouping=settings.pq_groups, subvectors=settings.pq_subvectors,
      iterations=settings.pq_iterations, opq_iterations=settings.pq_opq_iterations,
      seed=settings.pq_seed, train_info=dict(train_references=int(n_train)))
  info = dict(train_relative_mse=quantization_report(quantizer, train).relative_mse)
  if len(held_ids):
    held = sample_memories(encoder, references, held_ids)
    rep = quantization_report(quantizer, held)
    info.update(heldout_references=int(len(held_ids)), heldout_relative_mse=rep.relative_mse,
                heldout_relative_mse_keys=rep.relative_mse_keys,
                heldout_relative_mse_values=rep.relative_mse_values)
  quantizer.train_info.update({k: (round(v, 6) if isinstance(v, float) else v)
                               for k, v in info.items()})
  printer(f"encode-memory: PQ trained in {format_duration(time.monotonic() - t0)}: "
          + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in info.items()))
  return quantizer


def wait_for_file(path: str, timeout_s: float, what: str) -> None:
  """Polls until `path` exists (written by another process on a shared disk)."""
  deadline = time.monotonic() + timeout_s
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise TimeoutError(f"{path}: {what} did not appear within {timeout_s:g}s")
    time.sleep(1.0)


def bank_quantizer(root: str, *, encoder: ReferenceEncoder, references: Any,
                   settings: bank_format.BankSettings,
                   quantizer: pq_lib.ProductQuantizer | None, process_index: int,
                   printer: Callable[[str], None], wait_timeout_s: float
                   ) -> tuple[pq_lib.ProductQuantizer, str]:
  """The bank's PQ quantizer and its sha256: the given one, the one in `root`, or trained.

  Training happens once, on process 0; the others wait for its file (the bank
  directory is shared). The quantizer is stored in `root` (identical bytes from
  every process).
  """
  q_path = os.path.join(root, bank_format.QUANTIZER_FILE)
  if quantizer is None and os.path.exists(q_path):
    quantizer = pq_lib.ProductQuantizer.load(q_path)
    want = (settings.pq_groups, tuple(settings.pq_subvectors))
    have = (quantizer.grouping, quantizer.subvectors)
    if want != have:
      raise bank_format.BankMismatchError(
          f"{q_path}: quantizer has (groups, subvectors) {have}, the config asks for {want}")
  if quantizer is None:
    if process_index == 0:
      quantizer = train_quantizer(encoder, references, settings, printer)
      bank_shards.store_quantizer(root, quantizer)
    else:
      printer(f"encode-memory[p{process_index}]: waiting for process 0 to train {q_path}")
      wait_for_file(q_path, wait_timeout_s, "the PQ quantizer")
      quantizer = pq_lib.ProductQuantizer.load(q_path)
  return quantizer, bank_shards.store_quantizer(root, quantizer)
