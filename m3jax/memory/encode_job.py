"""The offline memory-encoding job: every reference -> its sparse memory -> bank shards.

    encode_bank(out_dir, encoder=ReferenceEncoder(config, params, batch_size),
                references=store, settings=bank_settings(cfg), checkpoint=...)

Work is split into fixed shards (shard s = ref_ids [s*S, (s+1)*S), see
m3jax.memory.bank_format) and each shard into fixed encode batches of B references
(the last padded with id -1), so the bytes of a shard depend only on the model, the
references and (S, B), never on which process encoded it, when, or after how many
restarts.

- Devices: `m3jax.memory.encoder.ReferenceEncoder` jits the model's reference
  encoding over a mesh of this process's local devices.
- Hosts: process p of P owns the shards s with s % P == p and needs nothing from
  the others until the end. Under `jax.distributed` (P = jax.process_count()), all
  processes meet at the end and process 0 writes the manifest. Processes can also
  run as independent jobs (`process_index`/`process_count` given, e.g. a SLURM
  array); then whichever finishes last and finds every shard present writes it.
- Resume: a shard that exists (with its checksum record) is verified (sha256) and
  skipped; a corrupt one is re-encoded. Shards appear only by rename, so a job
  killed at any point and rerun produces the same bytes as one that never stopped.
- Quantization=pq: process 0 trains the quantizer first (m3jax.memory.pq_training).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from data_pipeline import prepared
from data_pipeline import references as references_lib
from m3jax.core import artifacts
from m3jax.core.config import ConfigError, model_config
from m3jax.core.errors import InputError
from m3jax.core.progress import Progress, format_duration
from m3jax.memory import bank_format
from m3jax.memory import bank_shards
from m3jax.memory import codecs
from m3jax.memory import pq as pq_lib
from m3jax.memory import pq_training
from m3jax.memory.bank_storage import storage_report
from m3jax.memory.encoder import (ReferenceEncoder, batch_inputs, batch_records,
                                  encoder_mesh)
from m3jax.model import sharding as sharding_lib


@dataclasses.dataclass
class EncodeResult:
  out_dir: str
  num_references: int
  num_shards: int
  process_index: int
  process_count: int
  shards_encoded: list[int]
  shards_skipped: list[int]
  shards_reencoded: list[int]  # existing but corrupt: encoded again
  references_encoded: int
  tokens_encoded: int
  seconds: float
  manifest_written: bool
  complete: bool

  @property
  def references_per_s(self) -> float:
    return self.references_encoded / self.seconds if self.seconds > 0 else 0.0

  @property
  def tokens_per_s(self) -> float:
    return self.tokens_encoded / self.seconds if self.seconds > 0 else 0.0


@dataclasses.dataclass
class _ShardPlan:
  """This process's shards: already done (verified), to encode, found corrupt."""
  mine: list[int]
  todo: list[int]
  skipped: list[int]
  reencode: list[int]


# ------------------------------------------------------------------ steps of the job


def _check_inputs(encoder: ReferenceEncoder, references: Any,
                  settings: bank_format.BankSettings) -> None:
  config = encoder.config
  if encoder.batch_size != settings.encode_batch_size:
    raise ConfigError(f"config field `bank.encode_batch_size`: {settings.encode_batch_size} "
                      f"but the encoder was built for batches of {encoder.batch_size}")
  if references.reference_length > config.reference_length:
    raise ConfigError(f"config field `model.reference_length`: {config.reference_length} < "
                      f"the references' length {references.reference_length}")
  if len(references) == 0:
    raise InputError("encode-memory: the reference store is empty")


def _refuse_edited(root: str) -> None:
  """An edited bank (m3jax.memory.bank_update) is not re-finalised from its original shards."""
  path = os.path.join(root, bank_format.MANIFEST_FILE)
  if os.path.exists(path):
    version = bank_format.read_json(path).get("version", 0)
    if version:
      raise bank_format.BankError(
          f"{root}: this bank was edited by `m3jax bank update` (version {version}); "
          "encoding it again would drop the edits: encode into a new --out")


def _process_share(process_index: int | None, process_count: int | None
                   ) -> tuple[int, int, bool]:
  """(p, P, whether the P processes are jax processes that meet at barriers)."""
  p = jax.process_index() if process_index is None else int(process_index)
  n_proc = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= p < n_proc:
    raise InputError(f"process_index={p} is not in [0, process_count={n_proc})")
  return p, n_proc, process_count is None and n_proc > 1


def _plan_shards(root: str, n_shards: int, p: int, n_proc: int, verify_existing: bool,
                 printer: Callable[[str], None]) -> _ShardPlan:
  """Process p's shards; existing ones are verified and skipped, corrupt ones redone."""
  mine = [s for s in range(n_shards) if s % n_proc == p]
  bank_shards.remove_stale_temporaries(root, mine)
  plan = _ShardPlan(mine, [], [], [])
  for s in mine:
    info = bank_shards.shard_record(root, s)
    if info is not None:
      try:
        bank_shards.verify_shard(root, info, full=verify_existing)
        plan.skipped.append(s)
        continue
      except bank_format.CorruptShardError as e:
        printer(f"encode-memory[p{p}]: {e}; encoding it again")
        plan.reencode.append(s)
    plan.todo.append(s)
  return plan


def _encode_shard(shard: int, root: str, encoder: ReferenceEncoder, references: Any,
                  codec: codecs.MemoryCodec, layout: dict[str, Any], n_refs: int
                  ) -> tuple[np.ndarray, int, int]:
  """(records [S], real references, real tokens) of one shard, two batches in flight."""
  config = encoder.config
  record_dtype = bank_format.record_dtype(codec, config)
  batches = bank_format.shard_batches(shard, layout, n_refs)
  parts: list[np.ndarray | None] = [None] * len(batches)
  tokens_total = 0
  in_flight = None  # (slot, ids, device outputs)
  for b, ids in enumerate(batches):
    if (ids < 0).all():
      parts[b] = bank_format.empty_records(codec, config, len(ids))
      continue
    tokens, lengths = batch_inputs(references, ids)
    tokens_total += int(lengths.sum())
    pending = os.path.join(root, bank_format.pending_file(shard, b))
    if os.path.exists(pending):  # encoded by a cold-start bank: same batch, same bytes
      recs = np.load(pending, allow_pickle=False)
      if recs.dtype == record_dtype and recs.shape == ids.shape:
        parts[b] = recs
        continue
    out = encoder(tokens, lengths)
    if in_flight is not None:
      parts[in_flight[0]] = batch_records(codec, config, *in_flight[1:])
    in_flight = (b, ids, out)
  if in_flight is not None:
    parts[in_flight[0]] = batch_records(codec, config, *in_flight[1:])
  ids = np.concatenate(batches)
  return np.concatenate(parts), int((ids >= 0).sum()), tokens_total


def _write_and_clean(root: str, shard: int, records: np.ndarray, n_refs: int, tokens: int
                     ) -> dict[str, Any]:
  info = bank_shards.write_shard(root, shard, records, n_refs=n_refs, tokens=tokens)
  bank_shards.remove_pending(root, shard)
  return info


def _encode_shards(todo: list[int], root: str, encoder: ReferenceEncoder, references: Any,
                   codec: codecs.MemoryCodec, layout: dict[str, Any], progress: Progress,
                   on_shard: Callable[[int, dict[str, Any]], None] | None
                   ) -> tuple[list[int], int, int]:
  """Encodes `todo`, writing each shard on a thread while the next one encodes.

  Returns (shards written, real references, real tokens).
  """
  n_refs = len(references)
  encoded, refs_count, tokens_count = [], 0, 0
  with concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                             thread_name_prefix="m3jax-shard-writer") as pool:
    writing: tuple[int, concurrent.futures.Future] | None = None

    def drain():
      nonlocal writing
      if writing is not None:
        s_w, fut = writing
        info = fut.result()
        writing = None
        encoded.append(s_w)
        progress.update(info["refs"])
        if on_shard is not None:
          on_shard(s_w, info)

    for s in todo:
      records, n_real, n_tok = _encode_shard(s, root, encoder, references, codec, layout,
                                             n_refs)
      refs_count += n_real
      tokens_count += n_tok
      drain()
      writing = (s, pool.submit(_write_and_clean, root, s, records, n_real, n_tok))
    drain()
  return encoded, refs_count, tokens_count


def _all_shards_present(root: str, n_shards: int) -> bool:
  return all(bank_shards.shard_record(root, s) is not None for s in range(n_shards))


def _wait_for_all_shards(root: str, n_shards: int, timeout_s: float) -> None:
  """Polls the shared bank directory until every shard exists.

  Processes may finish hours apart (a resumed job whose other hosts had little
  left), longer than a device collective should wait, so they wait here first.
  """
  deadline = time.monotonic() + timeout_s
  while not _all_shards_present(root, n_shards):
    if time.monotonic() > deadline:
      raise TimeoutError(f"{root}: the other processes' shards did not appear within "
                         f"{timeout_s:g}s")
    time.sleep(1.0)


def _barrier(name: str) -> None:
  """Waits until every jax process arrives (a small device collective)."""
  multihost_utils.sync_global_devices(name)


def _finish(root: str, n_shards: int, *, p: int, n_proc: int, use_barrier: bool,
            stopped_early: bool, wait_timeout_s: float, printer: Callable[[str], None],
            tag: str) -> bool:
  """Writes the manifest when the bank is complete; returns whether this process did."""
  if use_barrier:
    if not stopped_early:
      _wait_for_all_shards(root, n_shards, wait_timeout_s)
    _barrier("m3jax_encode_shards_done")
    written = p == 0 and not stopped_early
    if written:
      bank_shards.finalize(root)
    _barrier("m3jax_encode_manifest")
    return written
  if _all_shards_present(root, n_shards):
    bank_shards.finalize(root)
    return True
  if not stopped_early and n_proc > 1:
    printer(f"{tag}: my shards are done; the last process to finish writes the manifest")
  return False


# ------------------------------------------------------------------ the job


def encode_bank(out_dir: str, *, encoder: ReferenceEncoder, references: Any,
                settings: bank_format.BankSettings, checkpoint: dict[str, Any] | None = None,
                quantizer: pq_lib.ProductQuantizer | None = None,
                references_source: str = "", process_index: int | None = None,
                process_count: int | None = None, max_shards: int | None = None,
                verify_existing: bool = True,
                on_shard: Callable[[int, dict[str, Any]], None] | None = None,
                progress_every_s: float = 30.0, printer: Callable[[str], None] = print,
                wait_timeout_s: float = 24 * 3600.0) -> EncodeResult:
  """Encodes (this process's share of) every reference into the bank at `out_dir`.

  Args:
    encoder: a `ReferenceEncoder` with batch size `settings.encode_batch_size`.
    references: tokens_by_ids / __len__ / tokenizer_hash / reference_length (e.g.
      data_pipeline.references.ReferenceStore).
    checkpoint: `bank_format.checkpoint_info(...)` of the parameters (recorded in the bank).
    quantizer: a trained PQ quantizer to use (default: trained here, or the one
      already in `out_dir`).
    process_index, process_count: run as shard-set p of P independent jobs (no
      jax.distributed); default: jax.process_index()/process_count() with barriers.
    max_shards: encode at most this many shards in this run (then stop; rerun to go on).
    verify_existing: sha256-check shards that already exist before skipping them.
    on_shard: called as on_shard(shard, checksum record) after each shard is written.
  """
  root = os.path.abspath(out_dir)
  os.makedirs(root, exist_ok=True)
  config = encoder.config
  _check_inputs(encoder, references, settings)
  p, n_proc, use_barrier = _process_share(process_index, process_count)
  n_refs = len(references)

  q_sha = None
  if settings.quantization == "pq":  # before the spec, which records the quantizer's hash
    quantizer, q_sha = pq_training.bank_quantizer(
        root, encoder=encoder, references=references, settings=settings, quantizer=quantizer,
        process_index=p, printer=printer, wait_timeout_s=wait_timeout_s)
  codec = codecs.make_codec(settings.quantization, config.memory_shape, quantizer)
  spec = bank_format.make_spec(
      config=config, tokenizer_hash=references.tokenizer_hash, n_references=n_refs,
      reference_length=references.reference_length, settings=settings, codec=codec,
      checkpoint=checkpoint,
      references_source=references_source or getattr(references, "path", ""),
      quantizer_sha256=q_sha)
  bank_format.check_or_write_spec(root, spec)
  _refuse_edited(root)
  layout = spec["layout"]
  total_shards = layout["num_shards"]

  plan = _plan_shards(root, total_shards, p, n_proc, verify_existing, printer)
  size = layout["shard_size"]
  refs_in = lambda s: max(0, min(n_refs, (s + 1) * size) - s * size)
  tag = f"encode-memory[p{p}/{n_proc}]" if n_proc > 1 else "encode-memory"
  printer(f"{tag}: {n_refs:,} references in {total_shards} shards of "
          f"{size}; this process owns {len(plan.mine)} shards, {len(plan.skipped)} "
          f"already done, {len(plan.todo)} to encode ({settings.quantization}, "
          f"{encoder.data_parallel} data-parallel devices)")
  todo = plan.todo if max_shards is None else plan.todo[:max(0, int(max_shards))]
  progress = Progress(sum(refs_in(s) for s in plan.mine), desc=tag, unit="refs",
                      every_s=progress_every_s,
                      initial=sum(refs_in(s) for s in plan.skipped), printer=printer)
  t_encode = time.monotonic()
  encoded, refs_count, tokens_count = _encode_shards(todo, root, encoder, references, codec,
                                                     layout, progress, on_shard)
  encode_s = time.monotonic() - t_encode
  progress.close()

  manifest_written = _finish(root, total_shards, p=p, n_proc=n_proc, use_barrier=use_barrier,
                             stopped_early=max_shards is not None,
                             wait_timeout_s=wait_timeout_s, printer=printer, tag=tag)
  complete = os.path.exists(os.path.join(root, bank_format.MANIFEST_FILE))
  result = EncodeResult(root, n_refs, total_shards, p, n_proc, encoded, plan.skipped,
                        plan.reencode, refs_count, tokens_count, encode_s, manifest_written,
                        complete)
  printer(f"{tag}: encoded {len(encoded)} shards, {refs_count:,} references, "
          f"{tokens_count:,} tokens in {format_duration(encode_s)} "
          f"({result.references_per_s:,.1f} refs/s, {result.tokens_per_s:,.0f} tokens/s)"
          f"{'; bank complete' if complete else ''}")
  if complete and p == 0:
    printer(storage_report(root, config))
  return result


# ------------------------------------------------------------------ from a config + paths


def open_reference_store(path: str) -> Any:
  """A ReferenceStore from a prepare-data directory (its manifest.json) or a dataset dir."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"--references: {path} does not exist")
  manifest = os.path.join(path, prepared.MANIFEST)
  if os.path.exists(manifest):
    fmt = bank_format.read_json(manifest).get("format")
    if fmt == bank_format.FORMAT:
      raise InputError(f"--references: {path} is a memory bank, not references")
    return prepared.open_references(path)
  return references_lib.ReferenceStore(path)


def run(cfg: Any, *, checkpoint: str, checkpoint_config: Any, params: Any, step: int | None,
        references: str, out: str, quantizer_path: str | None = None,
        **kwargs) -> EncodeResult:
  """`m3jax encode-memory` on loaded parameters: check them, open the references, `encode_bank`.

  `checkpoint_config`, `params`, `step` are what
  `m3jax.model.params_io.load_for_inference(checkpoint)` returns (loaded by the
  caller: this layer does not import training). The model section of `cfg` must
  describe the checkpoint's model (compute dtype may differ); `cfg.bank` and
  `cfg.mesh.tensor` set the job. kwargs go to `encode_bank` (process_index,
  process_count, max_shards, progress_every_s, ...).
  """
  config = model_config(cfg)
  ckpt_model = model_config(checkpoint_config)
  if ckpt_model.fingerprint() != config.fingerprint():
    diffs = artifacts.dict_diff(bank_format.model_identity(ckpt_model),
                                bank_format.model_identity(config))
    raise ConfigError(f"--checkpoint {checkpoint} holds another model than --config: "
                      + "; ".join("model." + d for d in diffs[:6]))
  store = open_reference_store(references)
  settings = bank_format.bank_settings(cfg)
  quantizer = pq_lib.ProductQuantizer.load(quantizer_path) if quantizer_path else None
  encoder = ReferenceEncoder(config, params, settings.encode_batch_size,
                             mesh=encoder_mesh(cfg), rules=sharding_lib.axis_rules(cfg))
  return encode_bank(out, encoder=encoder, references=store, settings=settings,
                     checkpoint=bank_format.checkpoint_info(checkpoint, step, params),
                     quantizer=quantizer, references_source=getattr(store, "path", references),
                     **kwargs)
