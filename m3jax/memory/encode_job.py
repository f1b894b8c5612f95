"""The offline memory-encoding job: every reference -> its sparse memory -> bank shards.

    encode_bank(out_dir, encoder=ReferenceEncoder(config, params, batch_size),
                references=store, settings=bank_settings(cfg), checkpoint=...)

Work is split into fixed shards (shard s = ref_ids [s*S, (s+1)*S), see m3jax.memory.bank)
and each shard into fixed encode batches of B references (the last padded with id
-1), so the bytes of a shard depend only on the model, the references and (S, B),
never on which process encoded it, when, or after how many restarts.

- Devices: `ReferenceEncoder` jits `Transformer.encode_references` over a mesh of
  this process's local devices; the batch axis is sharded over (data, fsdp) by the
  config's logical-axis rules, parameters are replicated (or split over `tensor`
  when cfg.mesh.tensor > 1, for models that do not fit one device).
- Hosts: process p of P owns the shards s with s % P == p and needs nothing from
  the others until the end. Under `jax.distributed` (P = jax.process_count()), all
  processes meet at a barrier and process 0 writes the manifest. Processes can also
  run as independent jobs (`process_index`/`process_count` given, e.g. a SLURM
  array); then whichever finishes last and finds every shard present writes it.
- Resume: a shard that exists (with its checksum record) is verified (sha256) and
  skipped; a corrupt one is re-encoded. Shards appear only by rename, so a job
  killed at any point and rerun produces the same bytes as one that never stopped.
- Quantization=pq: before any shard, process 0 encodes a seeded uniform sample of
  `pq_train_references` references, trains the codebooks (m3jax.memory.quantize) and
  saves `quantizer.npz`; the other processes wait for it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m3jax.memory import bank as bank_lib
from m3jax.model import costs
from m3jax.memory import quantize as quant_lib
from m3jax.model import sharding as sharding_lib
from m3jax.core.config import ConfigError, ModelConfig
from m3jax.model.transformer import Transformer
from m3jax.core.progress import Progress, format_duration
from data_pipeline import prepare
from data_pipeline import references as references_lib
from m3jax.core.config import model_config
from m3jax.model import params_io

# Used when no config rules are given: batch over (data, fsdp), the rest replicated
# except heads over `tensor` (a no-op for tensor = 1).
DEFAULT_RULES = (("batch", ("data", "fsdp")), ("heads", "tensor"), ("kv_heads", "tensor"),
                 ("mlp", "tensor"), ("vocab", "tensor"))


def encoder_mesh(cfg: Any = None, devices: Sequence[jax.Device] | None = None
                 ) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh over this process's devices: tensor from cfg.mesh, data = rest.

  The encoding job is data-parallel per host, so the mesh never spans hosts;
  cfg.mesh.tensor > 1 splits each replica of a large model over that many devices.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  tensor = 1
  if cfg is not None and "mesh" in cfg and cfg.mesh.get("tensor", 1) not in (-1, None):
    tensor = int(cfg.mesh.tensor)
  if len(devices) % tensor:
    raise ConfigError(f"config field `mesh.tensor`: {tensor} does not divide the "
                      f"{len(devices)} local devices of this process")
  auto = (jax.sharding.AxisType.Auto,) * 3
  return jax.make_mesh((len(devices) // tensor, 1, tensor), sharding_lib.MESH_AXES,
                       axis_types=auto, devices=devices)


class ReferenceEncoder:
  """Jitted, device-parallel `encode_references` on fixed-size batches.

  Call with tokens [B, R] int32 and lengths [B]; returns (memories [B, L_mem, 2,
  H_mem, k, d_h] bfloat16, positions [B, L_mem, H_mem, k] int32) as device arrays
  (dispatch is asynchronous, so the next batch can be prepared meanwhile).
  """

  def __init__(self, config: ModelConfig, params: Any, batch_size: int, *,
               mesh: jax.sharding.Mesh | None = None, rules: Any = None):
    if config.n_memory_layers == 0:
      raise ConfigError("config field `model.memory_layers`: empty, nothing to encode")
    self.config = config
    self.batch_size = int(batch_size)
    self.mesh = encoder_mesh() if mesh is None else mesh
    self.rules = tuple(DEFAULT_RULES if rules is None else rules)
    batch_axes = nn.logical_to_mesh_axes(("batch",), self.rules)[0]
    names = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
    self.data_parallel = int(np.prod([self.mesh.shape[a] for a in names], dtype=np.int64))
    if self.batch_size % self.data_parallel:
      raise ConfigError(f"config field `bank.encode_batch_size`: {self.batch_size} is not a "
                        f"multiple of the {self.data_parallel} data-parallel devices")
    with sharding_lib.use_mesh(self.mesh, self.rules):
      p_shard = sharding_lib.param_shardings(config, self.mesh, self.rules)
      self.params = jax.device_put(params, p_shard)
    sh = lambda *axes: sharding_lib.logical_sharding(self.mesh, self.rules, axes)
    self._tok_sharding = sh("batch", "length")
    self._len_sharding = sh("batch")
    model = Transformer(config)

    def encode(p, tokens, lengths):
      mem, pos = model.apply({"params": p}, tokens, lengths, method="encode_references")
      return mem.astype(jnp.bfloat16), pos

    self._fn = jax.jit(encode, in_shardings=(p_shard, self._tok_sharding, self._len_sharding),
                       out_shardings=(sh("batch", None, None, None, None, None),
                                      sh("batch", None, None, None)))

  def __call__(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[jax.Array, jax.Array]:
    tokens = np.asarray(tokens, np.int32)
    lengths = np.asarray(lengths, np.int32)
    if tokens.shape[0] != self.batch_size:
      raise ValueError(f"ReferenceEncoder: batch of {tokens.shape[0]} references, built for "
                       f"{self.batch_size} (pad with length-0 rows)")
    with sharding_lib.use_mesh(self.mesh, self.rules):
      return self._fn(self.params, jax.device_put(tokens, self._tok_sharding),
                      jax.device_put(lengths, self._len_sharding))


def checkpoint_info(path: str | None, step: int | None, params: Any) -> dict[str, Any]:
  """What a bank records about the parameters that encoded it."""
  return dict(path=os.path.abspath(path) if path else "", step=step,
              params_fingerprint=bank_lib.params_fingerprint(params))


# ------------------------------------------------------------------ quantizer training


def encode_ids(encoder: ReferenceEncoder, references: Any, ids: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
  """(memories [n, ...] float32 of bfloat16 values, kept positions [n, L_mem, H_mem, k])
  of references `ids`, encoded in padded batches."""
  b = encoder.batch_size
  mems, poss = [], []
  for lo in range(0, len(ids), b):
    chunk = np.full(b, -1, np.int64)
    part = ids[lo:lo + b]
    chunk[:len(part)] = part
    tokens, lengths = references.tokens_by_ids(chunk)
    mem, pos = jax.device_get(encoder(tokens, np.where(chunk >= 0, lengths, 0)))
    mems.append(np.asarray(mem, np.float32)[:len(part)])
    poss.append(np.asarray(pos)[:len(part)])
  return np.concatenate(mems), np.concatenate(poss)


def sample_memories(encoder: ReferenceEncoder, references: Any, ids: np.ndarray
                    ) -> np.ndarray:
  """bfloat16-rounded memories [n, ...] (float32) of `ids`, encoded in padded batches."""
  return encode_ids(encoder, references, ids)[0]


def train_quantizer(encoder: ReferenceEncoder, references: Any,
                    settings: bank_lib.BankSettings, printer: Callable[[str], None] = print
                    ) -> quant_lib.ProductQuantizer:
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
  quantizer = quant_lib.train_pq(
      train, grouping=settings.pq_groups, subvectors=settings.pq_subvectors,
      iterations=settings.pq_iterations, opq_iterations=settings.pq_opq_iterations,
      seed=settings.pq_seed, train_info=dict(train_references=int(n_train)))
  info = dict(train_relative_mse=quant_lib.quantization_report(quantizer, train).relative_mse)
  if len(held_ids):
    held = sample_memories(encoder, references, held_ids)
    rep = quant_lib.quantization_report(quantizer, held)
    info.update(heldout_references=int(len(held_ids)), heldout_relative_mse=rep.relative_mse,
                heldout_relative_mse_keys=rep.relative_mse_keys,
                heldout_relative_mse_values=rep.relative_mse_values)
  quantizer.train_info.update({k: (round(v, 6) if isinstance(v, float) else v)
                               for k, v in info.items()})
  printer(f"encode-memory: PQ trained in {format_duration(time.monotonic() - t0)}: "
          + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in info.items()))
  return quantizer


def _wait_for(path: str, timeout_s: float, what: str) -> None:
  deadline = time.monotonic() + timeout_s
  while not os.path.exists(path):
    if time.monotonic() > deadline:
      raise TimeoutError(f"{path}: {what} did not appear within {timeout_s:g}s")
    time.sleep(1.0)


def _barrier(name: str, timeout_s: float) -> None:
  """Waits until every process arrives (coordination-service barrier, long timeout).

  Processes may reach it hours apart (a resumed job whose other hosts had little
  left), longer than a device collective should wait, so the coordination
  service's barrier is used where available.
  """
  try:
    from jax._src import distributed as jax_distributed
    client = jax_distributed.global_state.client
  except ImportError:  # pragma: no cover - depends on the JAX version
    client = None
  if client is not None:
    client.wait_at_barrier(name, int(timeout_s * 1000))
  else:  # pragma: no cover
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------ the job


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


def _encode_shard(shard: int, root: str, encoder: ReferenceEncoder, references: Any,
                  codec: quant_lib.MemoryCodec, layout: dict[str, Any], n_refs: int
                  ) -> tuple[np.ndarray, int, int]:
  """(records [S], real references, real tokens) of one shard, two batches in flight."""
  config = encoder.config
  parts: list[np.ndarray | None] = []
  tokens_total = 0
  in_flight = None  # (slot, ids, lengths, device outputs)

  def finish(item):
    slot, ids, out = item
    recs = bank_lib.make_records(codec, config, *out)
    pad = ids < 0
    if pad.any():
      recs[pad] = bank_lib.empty_records(codec, config, int(pad.sum()))
    parts[slot] = recs

  for b, ids in enumerate(bank_lib.shard_batches(shard, layout, n_refs)):
    parts.append(None)
    pending = os.path.join(root, bank_lib.pending_file(shard, b))
    if (ids < 0).all():
      parts[b] = bank_lib.empty_records(codec, config, len(ids))
      continue
    tokens, lengths = references.tokens_by_ids(ids)
    lengths = np.where(ids >= 0, lengths, 0)
    tokens_total += int(lengths.sum())
    if os.path.exists(pending):  # encoded by a cold-start bank: same batch, same bytes
      recs = np.load(pending, allow_pickle=False)
      if recs.dtype == bank_lib.record_dtype(codec, config) and recs.shape == ids.shape:
        parts[b] = recs
        continue
    out = encoder(tokens, lengths)
    if in_flight is not None:
      finish(in_flight)
    in_flight = (b, ids, out)
  if in_flight is not None:
    finish(in_flight)
  ids = np.concatenate(bank_lib.shard_batches(shard, layout, n_refs))
  return np.concatenate(parts), int((ids >= 0).sum()), tokens_total


def encode_bank(out_dir: str, *, encoder: ReferenceEncoder, references: Any,
                settings: bank_lib.BankSettings, checkpoint: dict[str, Any] | None = None,
                quantizer: quant_lib.ProductQuantizer | None = None,
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
    checkpoint: `checkpoint_info(...)` of the parameters (recorded in the bank).
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
  if encoder.batch_size != settings.encode_batch_size:
    raise ConfigError(f"config field `bank.encode_batch_size`: {settings.encode_batch_size} "
                      f"but the encoder was built for batches of {encoder.batch_size}")
  if references.reference_length > config.reference_length:
    raise ConfigError(f"config field `model.reference_length`: {config.reference_length} < "
                      f"the references' length {references.reference_length}")
  independent = process_count is not None
  p = jax.process_index() if process_index is None else int(process_index)
  n_proc = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= p < n_proc:
    raise ValueError(f"process_index={p} is not in [0, process_count={n_proc})")
  use_barrier = not independent and n_proc > 1
  n_refs = len(references)
  if n_refs == 0:
    raise ValueError("encode-memory: the reference store is empty")

  # Quantizer (pq): trained once, by process 0, before the spec that records its hash.
  q_sha = None
  if settings.quantization == "pq":
    q_path = os.path.join(root, bank_lib.QUANTIZER_FILE)
    if quantizer is None and os.path.exists(q_path):
      quantizer = quant_lib.ProductQuantizer.load(q_path)
      want = (settings.pq_groups, tuple(settings.pq_subvectors))
      have = (quantizer.grouping, quantizer.subvectors)
      if want != have:
        raise bank_lib.BankMismatchError(
            f"{q_path}: quantizer has (groups, subvectors) {have}, the config asks for {want}")
    if quantizer is None:
      if p == 0:
        quantizer = train_quantizer(encoder, references, settings, printer)
        bank_lib.store_quantizer(root, quantizer)
      if p != 0:  # the bank directory is shared: wait for process 0's file
        printer(f"encode-memory[p{p}]: waiting for process 0 to train {q_path}")
        _wait_for(q_path, wait_timeout_s, "the PQ quantizer")
      if quantizer is None:
        quantizer = quant_lib.ProductQuantizer.load(q_path)
    q_sha = bank_lib.store_quantizer(root, quantizer)  # identical bytes from every process
  codec = quant_lib.make_codec(settings.quantization, config.memory_shape, quantizer)

  spec = bank_lib.make_spec(
      config=config, tokenizer_hash=references.tokenizer_hash, n_references=n_refs,
      reference_length=references.reference_length, settings=settings, codec=codec,
      checkpoint=checkpoint, references_source=references_source or getattr(references,
                                                                             "path", ""),
      quantizer_sha256=q_sha)
  bank_lib.check_or_write_spec(root, spec)
  layout = spec["layout"]
  total_shards = layout["num_shards"]
  mine = [s for s in range(total_shards) if s % n_proc == p]
  bank_lib.remove_stale_temporaries(root, mine)

  # Which of my shards are already done (verified)?
  todo, skipped, reencode = [], [], []
  for s in mine:
    info = bank_lib.shard_record(root, s)
    if info is not None:
      try:
        bank_lib.verify_shard(root, info, full=verify_existing)
        skipped.append(s)
        continue
      except bank_lib.CorruptShardError as e:
        printer(f"encode-memory[p{p}]: {e}; encoding it again")
        reencode.append(s)
    todo.append(s)
  refs_in = lambda s: max(0, min(n_refs, (s + 1) * layout["shard_size"]) -
                          s * layout["shard_size"])
  done_refs = sum(refs_in(s) for s in skipped)
  total_mine = sum(refs_in(s) for s in mine)
  tag = f"encode-memory[p{p}/{n_proc}]" if n_proc > 1 else "encode-memory"
  printer(f"{tag}: {n_refs:,} references in {total_shards} shards of "
          f"{layout['shard_size']}; this process owns {len(mine)} shards, {len(skipped)} "
          f"already done, {len(todo)} to encode ({settings.quantization}, "
          f"{encoder.data_parallel} data-parallel devices)")
  if max_shards is not None:
    todo = todo[:max(0, int(max_shards))]
  progress = Progress(total_mine, desc=tag, unit="refs", every_s=progress_every_s,
                      initial=done_refs, printer=printer)

  encoded, refs_count, tokens_count = [], 0, 0
  t_encode = time.monotonic()
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
  encode_s = time.monotonic() - t_encode
  progress.close()

  manifest_written = False
  if use_barrier:
    _barrier("m3jax_encode_shards_done", wait_timeout_s)
    if p == 0 and max_shards is None:
      bank_lib.finalize(root)
      manifest_written = True
    _barrier("m3jax_encode_manifest", wait_timeout_s)
  elif all(bank_lib.shard_record(root, s) is not None for s in range(total_shards)):
    bank_lib.finalize(root)
    manifest_written = True
  elif max_shards is None and n_proc > 1:
    printer(f"{tag}: my shards are done; the last process to finish writes the manifest")
  complete = os.path.exists(os.path.join(root, bank_lib.MANIFEST_FILE))
  result = EncodeResult(root, n_refs, total_shards, p, n_proc, encoded, skipped, reencode,
                        refs_count, tokens_count, encode_s, manifest_written, complete)
  printer(f"{tag}: encoded {len(encoded)} shards, {refs_count:,} references, "
          f"{tokens_count:,} tokens in {format_duration(encode_s)} "
          f"({result.references_per_s:,.1f} refs/s, {result.tokens_per_s:,.0f} tokens/s)"
          f"{'; bank complete' if complete else ''}")
  if complete and p == 0:
    printer(storage_report(root, config))
  return result


def _write_and_clean(root: str, shard: int, records: np.ndarray, n_refs: int, tokens: int
                     ) -> dict[str, Any]:
  info = bank_lib.write_shard(root, shard, records, n_refs=n_refs, tokens=tokens)
  pending = os.path.join(root, bank_lib.PENDING_DIR, f"shard-{shard:06d}")
  if os.path.isdir(pending):
    for name in os.listdir(pending):
      os.remove(os.path.join(pending, name))
    os.rmdir(pending)
  return info


# ------------------------------------------------------------------ storage accounting


def storage_summary(root: str, config: ModelConfig) -> dict[str, Any]:
  """Bytes of a finished bank next to the m3jax.model.costs formulas (which they must match)."""
  manifest = bank_lib.read_json(os.path.join(root, bank_lib.MANIFEST_FILE))
  storage = manifest["storage"]
  method = storage["method"]
  record = manifest["layout"]["record_bytes"]
  kv = storage["bytes_per_memory"]
  if method == "none":
    expected_kv = costs.memory_bytes_per_reference(config)
  else:
    expected_kv = costs.quantized_memory_bytes_per_reference(config,
                                                              storage["bytes_per_vector"])
  if expected_kv != kv:
    raise AssertionError(f"bank stores {kv} key/value bytes per memory, m3jax.model.costs says "
                         f"{expected_kv}")
  n = manifest["references"]["count"]
  bf16 = costs.memory_bytes_per_reference(config)
  dense = costs.dense_kv_bytes_per_reference(config)
  return dict(references=n, shards=manifest["totals"]["shards"],
              bank_bytes=manifest["totals"]["bytes"], record_bytes=record,
              kv_bytes_per_memory=kv, positions_bytes_per_memory=record - kv,
              bfloat16_kv_bytes_per_memory=bf16, dense_kv_bytes_per_reference=dense,
              compression_vs_dense=dense / kv, quantization=method,
              kv_bytes_total=kv * n,
              paper_scale_bytes=record * costs.PAPER_REFERENCES)


def storage_report(root: str, config: ModelConfig) -> str:
  s = storage_summary(root, config)
  fb = costs.format_bytes
  return "\n".join([
      f"storage: {s['references']:,} memories in {s['shards']} shards: "
      f"{fb(s['bank_bytes'])} on disk ({s['bank_bytes']:,} B)",
      f"  per memory: {s['record_bytes']:,} B = {s['kv_bytes_per_memory']:,} B keys/values "
      f"({s['quantization']}; m3jax.model.costs: "
      f"{'memory_bytes_per_reference' if s['quantization'] == 'none' else 'quantized_memory_bytes_per_reference'}"
      f") + {s['positions_bytes_per_memory']} B positions",
      f"  vs dense KV of a reference ({fb(s['dense_kv_bytes_per_reference'])}): "
      f"{s['compression_vs_dense']:,.0f}x smaller; bfloat16 sparse memory "
      f"{s['bfloat16_kv_bytes_per_memory']:,} B",
      f"  keys/values of all memories: {fb(s['kv_bytes_total'])}; at the paper's "
      f"{costs.PAPER_REFERENCES:.3g} references this record size would need "
      f"{fb(s['paper_scale_bytes'])}",
  ])


# ------------------------------------------------------------------ from a config + paths


def open_reference_store(path: str) -> Any:
  """A ReferenceStore from a prepare-data directory (its manifest.json) or a dataset dir."""
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"--references: {path} does not exist")
  manifest = os.path.join(path, prepare.MANIFEST)
  if os.path.exists(manifest):
    fmt = bank_lib.read_json(manifest).get("format")
    if fmt == bank_lib.FORMAT:
      raise ValueError(f"--references: {path} is a memory bank, not references")
    return prepare.open_references(path)
  return references_lib.ReferenceStore(path)


def run(cfg: Any, *, checkpoint: str, references: str, out: str,
        quantizer_path: str | None = None, **kwargs) -> EncodeResult:
  """`m3jax encode-memory`: load the checkpoint and references, then `encode_bank`.

  The model section of `cfg` must describe the checkpoint's model (compute dtype
  may differ); `cfg.bank` and `cfg.mesh.tensor` set the job. kwargs go to
  `encode_bank` (process_index, process_count, max_shards, progress_every_s, ...).
  """
  config = model_config(cfg)
  ckpt_cfg, params, step = params_io.load_for_inference(checkpoint)
  ckpt_model = model_config(ckpt_cfg)
  if ckpt_model.fingerprint() != config.fingerprint():
    diffs = bank_lib.diff_dicts(bank_lib.model_identity(ckpt_model),
                                bank_lib.model_identity(config))
    raise ConfigError(f"--checkpoint {checkpoint} holds another model than --config: "
                      + "; ".join("model." + d for d in diffs[:6]))
  store = open_reference_store(references)
  settings = bank_lib.bank_settings(cfg)
  quantizer = quant_lib.ProductQuantizer.load(quantizer_path) if quantizer_path else None
  encoder = ReferenceEncoder(config, params, settings.encode_batch_size,
                             mesh=encoder_mesh(cfg), rules=sharding_lib.axis_rules(cfg))
  return encode_bank(out, encoder=encoder, references=store, settings=settings,
                     checkpoint=checkpoint_info(checkpoint, step, params),
                     quantizer=quantizer, references_source=getattr(store, "path", references),
                     **kwargs)
