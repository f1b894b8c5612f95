"""Decoding throughput with explicit memory, without memory and with text RAG (Table 21).

The paper's local-server protocol: batch 32, 128 tokens in, 128 out, throughput
= 32 x 128 / wall time of a run; each mode runs N times, the first run is
dropped (here it also compiles) and the rest are averaged. Explicit memory makes
3 retrievals per row and run (chunks 0 and 1 of the prompt, then chunk 3 with
the first 64 generated tokens; chunk 2 reuses chunk 1's memories), each 5
references, read from a memory bank ON DISK (warm start) with the RAM cache off,
and the retrieved ids are replaced by ids never read before (the paper's worst
case: "reference ids are made unique after search"). RAG retrieves once per row
with a 64-token query (the prompt's last chunk) and prepends the 5 references'
tokens (128 each) to the prompt. The `<s>` opening the context counts as one of
the input tokens. Time to first token (TTFT) is measured in the same runs: from
the start of a run (before any retrieval) until every row's first generated
token is on the host.

What is real here: the model (random parameters of the configured size: speed
does not depend on the weights), the jitted prefill + segmented decode loop of
m3jax.inference.generate, the bank (m3jax.memory.bank_reader.MemoryBank, written by
m3jax.memory.encode_job from random 128-token references, opened with cache_memories=0), the lexical
embedder and ScaNN index (m3jax.retrieval.embedder, m3jax.retrieval.index) over those references,
and the retrieval schedule. Query texts are the token ids written as words.
The bank files were just written, so the OS page cache may hold them: "disk"
here is at best the page cache.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.core import errors
from m3jax.core.errors import InputError
from m3jax.inference import generate as gen_lib
from m3jax.retrieval import rag as rag_lib
from m3jax.retrieval import schedule
from m3jax.core.config import model_config
from m3jax.model import kv_cache
from m3jax.model.transformer import Transformer, init_params
from m3jax.retrieval.retriever import Retrieval, Retriever
from m3jax.memory import bank_format
from m3jax.memory import encode_job
from m3jax.memory.bank_reader import MemoryBank
from m3jax.memory.encoder import ReferenceEncoder, encoder_mesh
from m3jax.memory.source import ArrayReferenceStore
from m3jax.retrieval.lexical_embedder import LexicalEmbedder
from m3jax.retrieval import index as index_lib

MODES = ("none", "explicit", "rag")


def _words(ids: Sequence[int]) -> str:
  return " ".join(f"t{int(i)}" for i in ids)



class BankTooSmallError(errors.UserError, RuntimeError):
  """A reused --bank_dir holds too few references for the requested runs."""

class _Timed:
  """Accumulates the seconds spent in one method of a wrapped object."""

  def __init__(self, inner: Any, method: str):
    self.inner, self.method, self.seconds, self.calls = inner, method, 0.0, 0

  def __getattr__(self, name: str) -> Any:
    attr = getattr(self.inner, name)
    if name != self.method:
      return attr

    def timed(*args, **kwargs):
      t0 = time.perf_counter()
      try:
        return attr(*args, **kwargs)
      finally:
        self.seconds += time.perf_counter() - t0
        self.calls += 1
    return timed


class UniqueIds:
  """Wraps a retriever; replaces every returned id by one never handed out before."""

  def __init__(self, retriever: Any, n_references: int):
    self.retriever, self.k = retriever, retriever.k
    self.n_references, self.next_id = n_references, 0

  def retrieve(self, queries, filter_texts=None) -> Retrieval:
    got = self.retriever.retrieve(queries, filter_texts)
    n = got.ids.size
    if self.next_id + n > self.n_references:
      raise BankTooSmallError(f"bench decode: the bank holds {self.n_references} references, "
                              "too few for unique ids in every run (raise --bank_references)")
    ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64).reshape(got.ids.shape)
    self.next_id += n
    return got._replace(ids=ids)


def references_needed(batch: int, prompt_len: int, new_tokens: int, runs: int,
                      chunk_length: int, memories_per_chunk: int) -> int:
  """Distinct references for unique ids in every explicit-memory run."""
  per_row = schedule.retrieval_count(prompt_len, prompt_len + new_tokens - 1, chunk_length)
  return runs * batch * per_row * memories_per_chunk


def decode_step_cost(mc: Any, params: Any, batch: int, context_tokens: int, new_tokens: int,
                     *, with_memory: bool) -> dict[str, float]:
  """FLOPs and bytes accessed of one compiled decode step (XLA's cost analysis).

  The cache is sized as the generator sizes it for `context_tokens` prompt
  tokens and `new_tokens` new ones (with the prefix and memory slots when
  `with_memory`), and donated as in the decode loop. Counted, not timed: the
  share of the step that reads the KV cache, whatever the load on the machine.
  """
  L = mc.chunk_length
  max_length = -(-context_tokens // L) * L + -(-new_tokens // L) * L
  model = Transformer(mc)
  cache = jax.eval_shape(lambda: kv_cache.init_cache(mc, batch, max_length,
                                                     with_prefix=with_memory,
                                                     with_memory=with_memory))
  step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, method=Transformer.decode_step),
                 donate_argnums=(2,))
  cost = step.lower(params, jax.ShapeDtypeStruct((batch,), jnp.int32), cache).compile()
  cost = cost.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((cache.k, cache.v)))
  return dict(flops=float(cost.get("flops", 0.0)), bytes=float(cost.get("bytes accessed", 0.0)),
              cache_bytes=float(cache_bytes))


def build_bank(cfg: Any, params: Any, store: Any, path: str, printer=print) -> None:
  """Encodes `store` into a bank at `path` (m3jax.memory.encode_job) unless one is there."""
  mc = model_config(cfg)
  settings = bank_format.bank_settings(cfg)
  encoder = ReferenceEncoder(mc, params, settings.encode_batch_size, mesh=encoder_mesh(cfg))
  encode_job.encode_bank(path, encoder=encoder, references=store, settings=settings,
                         checkpoint=bank_format.checkpoint_info(None, None, params),
                         references_source="bench-decode random references",
                         printer=lambda msg: None)
  if printer:
    printer(f"bench decode: encoded {len(store)} references into {path}")


def run(cfg: Any, *, batch: int = 32, prompt_len: int = 128, new_tokens: int = 128,
        runs: int = 9, modes: Sequence[str] = MODES, seed: int = 0, bank_dir: str | None = None,
        bank_references: int | None = None,
        printer: Callable[[str], None] | None = print) -> dict[str, Any]:
  """Runs the protocol (module docstring); returns the figures as a dict."""
  mc = model_config(cfg)
  if runs < 2:
    raise InputError("bench decode: --runs must be >= 2 (the first run is discarded)")
  if batch < 1 or prompt_len < 1 or new_tokens < 1:
    raise InputError("bench decode: --batch, --prompt_len and --new_tokens must be >= 1")
  for m in modes:
    if m not in MODES:
      raise InputError(f"bench decode: unknown mode {m!r}; expected {MODES}")
  say = printer or (lambda msg: None)
  L, M = mc.chunk_length, mc.memories_per_chunk
  params = init_params(mc, jax.random.key(seed))
  rng = np.random.default_rng(seed)

  n_refs = bank_references or references_needed(batch, prompt_len, new_tokens, runs, L, M)
  n_refs = max(n_refs, M)
  store = ArrayReferenceStore.random(n_refs, mc.reference_length, mc.vocab_size, seed=seed,
                                     min_length=mc.reference_length)
  texts = [_words(t) for t in store.tokens]
  embedder = LexicalEmbedder(dim=int(cfg.data.embed_dim)).fit(texts)
  index = index_lib.build_index(embedder.embed(texts), fingerprint=embedder.fingerprint())
  retriever = Retriever(embedder, index, k=M, overlap_threshold=None)

  prompts = [[mc.bos_id] + rng.integers(5, mc.vocab_size, prompt_len - 1).tolist()
             for _ in range(batch)]
  generator = gen_lib.Generator(mc, params)
  result: dict[str, Any] = dict(
      config=cfg.get("name", ""), device=jax.devices()[0].device_kind,
      platform=jax.devices()[0].platform, batch=batch, prompt_len=prompt_len,
      new_tokens=new_tokens, runs=runs, memory_shape=list(mc.memory_shape),
      memories_per_chunk=M, chunk_length=L, modes={})

  with contextlib.ExitStack() as stack:
    bank = None
    if "explicit" in modes:
      path = bank_dir
      if path is None:
        path = stack.enter_context(tempfile.TemporaryDirectory(prefix="m3jax-bench-bank-"))
      if not os.path.exists(os.path.join(path, bank_format.MANIFEST_FILE)):
        t0 = time.perf_counter()
        build_bank(cfg, params, store, path, printer=say)
        result["bank_build_seconds"] = time.perf_counter() - t0
      bank = MemoryBank.open(path, model_config=mc, tokenizer_hash=None,
                             params=params, cache_memories=0, verify="size")
      stack.callback(bank.close)
      result["bank"] = dict(path=path if bank_dir else "(temporary)", references=n_refs,
                            bytes_per_memory=bank.bytes_per_memory)

    unique = UniqueIds(retriever, n_refs)
    log = {m: dict(times=[], ttft=[], retrieve=[], lookup=[], retrievals=0, context=0)
           for m in modes}

    def one_run(mode: str, r: int) -> None:
      timed_ret = _Timed(unique if mode == "explicit" else retriever, "retrieve")
      timed_bank = _Timed(bank, "lookup") if mode == "explicit" else None
      first: list[float] = []
      first_token = lambda _tokens: first.append(time.perf_counter())
      t0 = time.perf_counter()
      if mode == "none":
        out = generator.generate(prompts, max_new_tokens=new_tokens, stop_at_eos=False,
                                 on_first_token=first_token)
      elif mode == "explicit":
        mem = schedule.MemoryRetrieval.for_model(mc, timed_ret, timed_bank, _words)
        out = generator.generate(prompts, max_new_tokens=new_tokens, stop_at_eos=False,
                                 memory=mem, on_first_token=first_token)
      else:
        got = rag_lib.rag_contexts(timed_ret, store, prompts, [_words(p[-L:]) for p in prompts],
                                   bos_id=mc.bos_id)
        log[mode]["context"] = int(np.mean([len(c) for c in got.contexts]))
        out = generator.generate(got.contexts, max_new_tokens=new_tokens, stop_at_eos=False,
                                 on_first_token=first_token)
      seconds = time.perf_counter() - t0
      if out.lengths.min() != new_tokens:
        raise RuntimeError(f"bench decode: {mode} run {r} generated "
                           f"{int(out.lengths.min())} < {new_tokens} tokens in some row")
      entry = log[mode]
      entry["times"].append(seconds)
      entry["ttft"].append(first[0] - t0)
      entry["retrieve"].append(timed_ret.seconds)
      entry["lookup"].append(timed_bank.seconds if timed_bank is not None else 0.0)
      entry["retrievals"] = out.retrievals if mode == "explicit" else (
          batch if mode == "rag" else 0)
      say(f"bench decode: run {r} {mode:8s} {seconds:7.3f} s "
          f"({batch * new_tokens / seconds:8.1f} tok/s, first token {entry['ttft'][-1]:.3f} s)"
          f"{' (discarded)' if r == 0 else ''}")

    # Rounds interleave the modes, so that load from other processes (a shared
    # machine) drifts over all of them alike; each mode's first run is discarded.
    for r in range(runs):
      for mode in modes:
        one_run(mode, r)
    for mode in modes:
      e = log[mode]
      mean = statistics.mean(e["times"][1:])
      result["modes"][mode] = dict(
          tokens_per_s=batch * new_tokens / mean, mean_seconds=mean,
          first_run_seconds=e["times"][0], run_seconds=e["times"],
          ttft_seconds=statistics.mean(e["ttft"][1:]), run_ttft_seconds=e["ttft"],
          retrievals_per_run=e["retrievals"],
          retrieve_seconds_mean=statistics.mean(e["retrieve"][1:]),
          bank_lookup_seconds_mean=statistics.mean(e["lookup"][1:]))
      if mode == "rag":
        result["modes"][mode]["context_tokens"] = e["context"]

  for mode in modes:  # where a decode step's time goes: the KV cache it reads
    context = log["rag"]["context"] if mode == "rag" else prompt_len
    result["modes"][mode]["decode_step"] = decode_step_cost(
        mc, params, batch, context, new_tokens, with_memory=mode == "explicit")
  tps = {m: v["tokens_per_s"] for m, v in result["modes"].items()}
  if "explicit" in tps and "none" in tps:
    result["explicit_over_none"] = tps["explicit"] / tps["none"]
  if "explicit" in tps and "rag" in tps:
    result["explicit_over_rag"] = tps["explicit"] / tps["rag"]
  ttft = {m: v["ttft_seconds"] for m, v in result["modes"].items()}
  if "explicit" in ttft and "none" in ttft:
    result["ttft_explicit_over_none"] = ttft["explicit"] / ttft["none"]
  if "explicit" in ttft and "rag" in ttft:
    result["ttft_explicit_over_rag"] = ttft["explicit"] / ttft["rag"]
  say(format_result(result))
  return result


def format_result(r: dict[str, Any]) -> str:
  lines = [f"bench decode: {r['config']} on {r['device']} ({r['platform']}), batch {r['batch']}, "
           f"{r['prompt_len']} in / {r['new_tokens']} out, mean of runs 2..{r['runs']}"]
  for mode, v in r["modes"].items():
    extra = ""
    if mode == "explicit":
      extra = (f"  [{v['retrievals_per_run']} retrievals/run; retrieval "
               f"{v['retrieve_seconds_mean'] * 1e3:.0f} ms, bank reads "
               f"{v['bank_lookup_seconds_mean'] * 1e3:.0f} ms per run]")
    elif mode == "rag":
      extra = (f"  [{v['context_tokens']} context tokens; retrieval "
               f"{v['retrieve_seconds_mean'] * 1e3:.0f} ms per run]")
    lines.append(f"  {mode:9s} {v['tokens_per_s']:9.1f} tokens/s  ({v['mean_seconds']:.3f} s/run, "
                 f"first token {v['ttft_seconds'] * 1e3:.0f} ms)" + extra)
    if "decode_step" in v:
      c = v["decode_step"]
      lines.append(f"            one decode step, compiled: {c['flops'] / 1e9:.2f} GFLOP, "
                   f"{c['bytes'] / 1e6:.0f} MB accessed, KV cache {c['cache_bytes'] / 1e6:.0f} MB")
  if "explicit_over_none" in r:
    lines.append(f"  explicit / none = {r['explicit_over_none']:.2f}x   (paper, A800: 0.65x)")
  if "explicit_over_rag" in r:
    lines.append(f"  explicit / rag  = {r['explicit_over_rag']:.2f}x   (paper, A800: 1.46x "
                 "vs MiniCPM-2B + RAG)")
  if "ttft_explicit_over_none" in r:
    lines.append(f"  time to first token, explicit / none = {r['ttft_explicit_over_none']:.2f}x")
  if "ttft_explicit_over_rag" in r:
    lines.append(f"  time to first token, explicit / rag  = {r['ttft_explicit_over_rag']:.2f}x")
  return "\n".join(lines)
