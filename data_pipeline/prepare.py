"""`m3jax prepare-data`: text in, tokenizer + references + packed sequences out.

Stages, each written into `<data>/.tmp-<stage>-*` and renamed into place when done
(so a killed run never leaves a stage that looks finished), each recording its
settings in `<stage>/stage.json`:

1. documents:  local files / the knowledge world -> `m3jax_documents` (splits
               train, kb) and, for the knowledge world, `m3jax_qa` (train, eval).
               A TFDS corpus is read in place and needs no copy.
2. tokenizer:  `tokenizer.model` + `tokenizer.json`, trained on an evenly spaced
               sample of train + KB text, or copied from `data.tokenizer`.
               (It runs after the documents stage so that it can sample the whole
               corpus by random access instead of reading its head.)
3. references: KB documents -> `m3jax_references`.
4. packed:     training text -> `m3jax_packed` (train, validation).

A re-run reuses every finished stage whose settings match and refuses one whose
settings differ (naming the fields), as well as a tokenizer that differs from the
one the workdir was prepared with or that does not fit the model config
(`m3jax.core.stages` runs and records the stages). Settings
of later stages include the settings hash of the stages they read, so a rebuilt
input never silently pairs with stale outputs. `manifest.json` sums it all up.

The documents stage's sources and builder live in `data_pipeline.documents`; the
readers of a finished data root (manifest, tokenizer, datasets) in `data_pipeline.prepared`.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from typing import Any, Callable

from data_pipeline import chat
from data_pipeline import corpus as corpus_lib
from data_pipeline import documents as documents_lib
from data_pipeline import packing
from data_pipeline import prepared
from data_pipeline import references as references_lib
from data_pipeline import tokenizer as tok_lib
from m3jax.core import artifacts as atomic_io
from m3jax.core import config as config_lib
from m3jax.core import stages
from m3jax.core import workspace
from m3jax.core.config import ConfigError
from m3jax.core.progress import Progress

# A finished stage made with other settings; the name callers (m3jax prepare-data) catch.
StageMismatchError = stages.StageChangedError


def _say(msg: str, *args: Any) -> None:
  print("prepare-data: " + (msg % args if args else msg), flush=True)


def _config_error(field: str, msg: str) -> Exception:
  return ConfigError(f"config field `{field}`: {msg}")


def validate_data_config(cfg: Any) -> None:
  """Checks the data fields prepare-data uses; errors name the field."""
  d = cfg.data
  if d.corpus == "files" and not d.files:
    raise _config_error("data.files", "data.corpus='files' needs a list of files or patterns")
  if d.corpus == "tfds" and not d.tfds_name:
    raise _config_error("data.tfds_name", "data.corpus='tfds' needs a dataset name")
  if d.get("bad_records", "error") not in documents_lib.BAD_RECORDS:
    raise _config_error("data.bad_records", f"must be one of {documents_lib.BAD_RECORDS}")
  if d.corpus == "hf" and not d.hf_path:
    raise _config_error("data.hf_path", "data.corpus='hf' needs a save_to_disk directory, "
                        "data files or a Hub dataset name")
  if d.txt_docs not in corpus_lib.TXT_DOCS:
    raise _config_error("data.txt_docs", f"must be one of {corpus_lib.TXT_DOCS}")
  if d.tokenizer_model_type not in tok_lib.MODEL_TYPES:
    raise _config_error("data.tokenizer_model_type", f"must be one of {tok_lib.MODEL_TYPES}")
  if not 0.0 <= d.eval_fraction < 1.0:
    raise _config_error("data.eval_fraction", "must be in [0, 1)")
  for name in ("shard_docs", "max_split_bytes", "tokenizer_sample_chars",
               "tokenizer_max_sentences"):
    if d[name] <= 0:
      raise _config_error(f"data.{name}", "must be positive")
  if not d.tokenizer and d.vocab_size != cfg.model.vocab_size:
    raise _config_error("data.vocab_size", f"{d.vocab_size} differs from model.vocab_size="
                        f"{cfg.model.vocab_size}; the trained tokenizer would not fit the model")


# ------------------------------------------------------------------ stages


def _refuse_changed(name: str, where: str, record: dict[str, Any], settings: Any) -> None:
  diffs = "; ".join(atomic_io.dict_diff(record.get("settings"), settings)[:8])
  raise StageMismatchError(
      f"stage {name!r} in {where} was prepared with other settings ({diffs}). Use another "
      f"workdir (or data.workdir_data), or remove {where} to rebuild it")


def _runner() -> stages.StageRunner:
  return stages.StageRunner(fmt=stages.DIRECTORY_STAGE, on_change=_refuse_changed,
                            log=_say, owner="prepare-data")


def run_stage(root: str, name: str, settings: dict[str, Any],
              build: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
  """Reuses `<root>/<name>` if its settings match (else refuses); builds it atomically if absent.

  `build(tmp_dir)` writes the stage's files into tmp_dir and returns info (paths
  in it relative to tmp_dir). Returns the stage record (settings, info, seconds).
  """
  return _runner().run(name, settings, build, output_dir=os.path.join(root, name))


# ------------------------------------------------------------------ tokenizer


def _tokenizer_stage(cfg: Any, root: str, specs: list[dict[str, Any]],
                     upstream: str) -> tuple[tok_lib.Tokenizer, dict[str, Any]]:
  d = cfg.data
  prefix = os.path.join(root, "tokenizer")
  model, sidecar = prefix + ".model", prefix + ".json"
  if os.path.isfile(model) and not os.path.isfile(sidecar):
    os.remove(model)  # a run was killed between the two writes; redo
  if d.tokenizer:
    given = tok_lib.Tokenizer.load(d.tokenizer)
    settings = dict(kind="given", hash=given.hash)
  else:
    settings = dict(kind="trained", vocab_size=d.vocab_size, model_type=d.tokenizer_model_type,
                    sample_chars=d.tokenizer_sample_chars,
                    max_sentences=d.tokenizer_max_sentences, documents=upstream)
    if d.get("chat_tokens", False):  # recorded only when on: older workdirs stay reusable
      settings["chat_tokens"] = True
  if os.path.isfile(sidecar):
    tok = tok_lib.Tokenizer.load(model)
    with open(sidecar) as f:
      recorded = json.load(f).get("prepare_settings")
    if d.tokenizer and tok.hash != settings["hash"]:
      raise tok_lib.TokenizerMismatchError(
          f"{root} was prepared with tokenizer {model} (hash {tok.hash[:12]}), but "
          f"data.tokenizer={d.tokenizer} has hash {settings['hash'][:12]}; use another workdir")
    want = stages.normalise(settings)
    if not d.tokenizer and recorded != want:
      diffs = "; ".join(atomic_io.dict_diff(recorded, want)) if recorded else \
          "tokenizer was given, not trained"
      raise StageMismatchError(f"tokenizer {model} was prepared with other settings ({diffs}); "
                               "use another workdir or remove it (and every later stage)")
    _say("reusing tokenizer %s (hash %s)", model, tok.hash[:12])
    return tok, settings
  t0 = time.time()
  if d.tokenizer:
    tok = given
    meta = given.metadata()
    meta["copied_from"] = os.path.abspath(given.path)
    atomic_io.write_bytes(model, given.model_proto)
  else:
    sources = [references_lib.open_documents(s) for s in _unique(specs)]
    texts = corpus_lib.sample_evenly(sources, d.tokenizer_sample_chars)
    tok = tok_lib.train_tokenizer(texts, prefix + ".training", vocab_size=d.vocab_size,
                                  model_type=d.tokenizer_model_type,
                                  max_sentences=d.tokenizer_max_sentences,
                                  description=json.dumps(settings, sort_keys=True),
                                  control_symbols=(chat.CONTROL_PIECES
                                                   if settings.get("chat_tokens") else ()))
    with open(prefix + ".training.json") as f:
      meta = json.load(f)
    os.replace(prefix + ".training.model", model)
    os.remove(prefix + ".training.json")
  meta["prepare_settings"] = stages.normalise(settings)
  meta["seconds"] = round(time.time() - t0, 2)
  atomic_io.write_json(sidecar, meta)
  return tok_lib.Tokenizer.load(model), settings


def _describe_train(source: dict[str, Any], spec: dict[str, Any]) -> str:
  """The user's name for the training text: data.files, else the TFDS source."""
  if source.get("kind") == "files":
    return "data.files (" + ", ".join(f for f, _ in source["files"]) + ")"
  return references_lib.describe_spec(spec)


def _unique(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
  out = []
  for s in specs:
    if s not in out:
      out.append(s)
  return out


# ------------------------------------------------------------------ main entry


class _Lock:
  """Exclusive lock on `<root>/.prepare.lock`: one prepare-data per data directory.

  The holder writes its pid and host into the file, and a refused run names them.
  (`filelock.FileLock` opens the file with O_TRUNC on every attempt, so a refused
  run would erase the holder's name before reading it.)
  """

  def __init__(self, root: str):
    self.path = os.path.join(root, ".prepare.lock")

  def __enter__(self):
    self._f = open(self.path, "a+")
    try:
      fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._f.seek(0)
      holder = self._f.read().strip() or "?"
      self._f.close()
      raise StageMismatchError(
          f"another prepare-data ({holder}) is working on {os.path.dirname(self.path)}; run "
          "it once (e.g. on process 0) and let other hosts wait") from None
    self._f.seek(0)
    self._f.truncate()
    self._f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    self._f.flush()
    return self

  def __exit__(self, *exc):
    self._f.close()


def prepare_data(cfg: Any, workdir: str) -> dict[str, Any]:
  """Runs (or reuses) every stage for `cfg` under `<workdir>/<data.workdir_data>`.

  Run it once per data directory (one process); a second concurrent run is refused.
  """
  validate_data_config(cfg)
  mc = config_lib.model_config(cfg)
  root = workspace.data_root(cfg, workdir)
  os.makedirs(root, exist_ok=True)
  with _Lock(root):
    return _prepare(cfg, mc, root)


def _prepare(cfg: Any, mc: Any, root: str) -> dict[str, Any]:
  t0 = time.time()
  stages.clean_tmp(root)
  d = cfg.data
  threads = d.prepare_threads or -1

  if d.tokenizer:  # fail before any work when the given tokenizer cannot serve the model
    tok_lib.check_compatible(tok_lib.Tokenizer.load(d.tokenizer), mc)
  sources = documents_lib.sources(cfg)
  docs = run_stage(root, "documents", sources,
                   lambda tmp: documents_lib.build_documents(cfg, sources, tmp, log=_say))
  train_spec = documents_lib.doc_spec(root, sources, docs, "train")
  kb_spec = documents_lib.doc_spec(root, sources, docs, "kb")
  packing.check_splittable(  # before the tokenizer and references: fail in seconds
      len(references_lib.open_documents(train_spec)), eval_fraction=d.eval_fraction,
      eval_max_docs=d.eval_max_docs, eval_seed=d.eval_seed,
      what=_describe_train(sources["train"], train_spec))

  tok, tok_settings = _tokenizer_stage(cfg, root, [train_spec, kb_spec],
                                       docs["settings_hash"])
  tok_lib.check_compatible(tok, mc)

  ref_settings = dict(tokenizer=tok.hash, reference_length=mc.reference_length,
                      documents=docs["settings_hash"], source=sources["kb"],
                      shard_docs=d.shard_docs)

  def build_refs(tmp: str) -> dict[str, Any]:
    n = len(references_lib.open_documents(kb_spec))
    prog = Progress(n, desc="references", unit="docs")
    path, stats = references_lib.write_references(
        tmp, kb_spec, tok, mc.reference_length, shard_docs=d.shard_docs, threads=threads,
        progress=prog)
    prog.close()
    return dict(path=os.path.relpath(path, tmp), **stats)

  refs = run_stage(root, "references", ref_settings, build_refs)

  packed_settings = dict(tokenizer=tok.hash, seq_len=mc.max_seq_len,
                         chunk_length=mc.chunk_length, documents=docs["settings_hash"],
                         source=sources["train"], eval_fraction=d.eval_fraction,
                         eval_max_docs=d.eval_max_docs, eval_seed=d.eval_seed,
                         shard_docs=d.shard_docs, align_chunks=bool(d.pack_align_chunks))

  def build_packed(tmp: str) -> dict[str, Any]:
    n = len(references_lib.open_documents(train_spec))
    prog = Progress(n, desc="packing", unit="docs")
    path, stats = packing.write_packed(
        tmp, train_spec, tok, seq_len=mc.max_seq_len, chunk_length=mc.chunk_length,
        eval_fraction=d.eval_fraction, eval_max_docs=d.eval_max_docs, eval_seed=d.eval_seed,
        shard_docs=d.shard_docs, align_chunks=bool(d.pack_align_chunks), threads=threads,
        progress=prog)
    prog.close()
    return dict(path=os.path.relpath(path, tmp), splits=stats)

  packed = run_stage(root, "packed", packed_settings, build_packed)

  manifest = dict(
      format=prepared.FORMAT,
      corpus=dict(train=sources["train"], kb=sources["kb"]),
      tokenizer=dict(path="tokenizer.model", settings=tok_settings, **tok.metadata()),
      model=dict(vocab_size=mc.vocab_size, max_seq_len=mc.max_seq_len,
                 chunk_length=mc.chunk_length, reference_length=mc.reference_length,
                 reference_prefix_ids=list(mc.reference_prefix_ids)),
      datasets=dict(
          references=dict(path=os.path.join("references", refs["info"]["path"]),
                          **{k: v for k, v in refs["info"].items() if k != "path"}),
          packed=dict(path=os.path.join("packed", packed["info"]["path"]),
                      seq_len=mc.max_seq_len, chunk_length=mc.chunk_length,
                      splits=packed["info"]["splits"])),
      stages={r["stage"]: dict(settings_hash=r["settings_hash"], seconds=r["seconds"],
                               finished=r["finished"]) for r in (docs, refs, packed)},
  )
  for key in ("documents", "qa"):
    if key in docs["info"]:
      item = dict(docs["info"][key])
      item["path"] = os.path.join("documents", item["path"])
      manifest["datasets"][key] = item
  if "knowledge_world" in docs["info"]:
    manifest["knowledge_world"] = docs["info"]["knowledge_world"]
  manifest["seconds_this_run"] = round(time.time() - t0, 2)
  atomic_io.write_json(os.path.join(root, prepared.MANIFEST), manifest)
  return manifest
