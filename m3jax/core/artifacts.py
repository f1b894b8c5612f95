"""What every job that writes artifacts shares: atomic writes, hashes, manifest diffs.

Every artifact is written under a unique temporary name beside its final path,
flushed to disk and renamed into place, so a killed job never leaves a file that
looks complete. JSON is written with sorted keys, so reruns give identical bytes.
Manifests identify their inputs by hashes computed here, once:
  sha256_file          a file's bytes
  settings_hash        a JSON-able settings object (stage records, demo stages)
  content_digest       several parts (bytes or JSON-able), e.g. an embedder's state
  params_fingerprint   a parameter tree, from strided samples (cheap for GB trees)
Every path a manifest names is opened through `confined_path`, so an edited or foreign
manifest can never make a job read (or overwrite) a file outside the artifact's directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from m3jax.core.errors import InputError

_HASH_BLOCK = 1 << 22


def tmp_name(path: str) -> str:
  """A temporary name beside `path`, unique per host, process and thread."""
  return f"{path}.tmp-{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"


def write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically (temporary file, fsync, rename); makes parent dirs."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = tmp_name(path)
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def check_writable_dir(path: str, what: str) -> None:
  """Creates `path` if needed and writes (then deletes) a probe file in it, so a job
  refuses a read-only, full or foreign directory before it computes anything.

  `what` names the setting the path came from (e.g. "--workdir"); the error says so.
  """
  probe = tmp_name(os.path.join(os.path.abspath(path), ".write-probe"))
  try:
    os.makedirs(path, exist_ok=True)
    with open(probe, "wb"):
      pass
    os.remove(probe)
  except OSError as e:
    reason = (e.strerror or str(e)).lower()
    raise InputError(f"{what}: {path} is not a writable directory ({reason}); choose a "
                     "writable directory or fix its permissions") from e


def json_bytes(obj: Any, indent: int = 2) -> bytes:
  """Deterministic JSON: sorted keys, trailing newline."""
  return (json.dumps(obj, indent=indent, sort_keys=True) + "\n").encode()


def write_json(path: str, obj: Any, indent: int = 2) -> None:
  write_bytes(path, json_bytes(obj, indent))


def save_npy(path: str, array: np.ndarray) -> None:
  """An .npy file (never pickled objects), atomically."""
  buf = io.BytesIO()
  np.save(buf, np.asarray(array), allow_pickle=False)
  write_bytes(path, buf.getvalue())


def save_npz(path: str, **arrays: np.ndarray) -> None:
  """A compressed .npz of plain arrays, atomically."""
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  write_bytes(path, buf.getvalue())


def dict_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
  """Fields that differ between two nested dicts, as 'a.b: old -> new' lines."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += dict_diff(old.get(k), new.get(k), f"{prefix}{k}.")
    return out
  return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def read_json(path: str) -> Any:
  """Parsed JSON of `path`; a damaged file raises ValueError naming it."""
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise InputError(f"{path} is not valid JSON ({e}); delete it to rebuild") from e


class UnsafePathError(InputError):
  """A manifest names a path outside its own directory (absolute, `..`, or a symlink out)."""


def confined_path(root: str, rel: Any, what: str) -> str:
  """`root/rel`, refused unless `rel` is a relative path that stays inside `root`.

  `rel` comes from a manifest (`what` names the manifest and field for the error): it
  must be a non-empty string, not absolute, without a `..` component, and its real
  path (symlinks resolved) must lie inside the real path of `root`. Returns the joined
  (not resolved) path; the file need not exist.
  """
  if not isinstance(rel, str) or not rel or "\x00" in rel:
    raise UnsafePathError(f"{what}: path {rel!r} is not a file name; rebuild the artifact")
  parts = rel.replace(os.sep, "/").split("/")
  if os.path.isabs(rel) or ".." in parts:
    raise UnsafePathError(
        f"{what}: path {rel!r} points outside {root} (absolute or with `..`); a manifest may "
        "only name files inside its own directory: rebuild the artifact")
  path = os.path.join(root, rel)
  real_root = os.path.realpath(root)
  real = os.path.realpath(path)
  if real != real_root and os.path.commonpath([real_root, real]) != real_root:
    raise UnsafePathError(
        f"{what}: path {rel!r} resolves to {real}, outside {real_root} (a symlink out); a "
        "manifest may only name files inside its own directory: rebuild the artifact")
  return path


def sha256_file(path: str) -> str:
  """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_HASH_BLOCK), b""):
      h.update(block)
  return h.hexdigest()


def settings_hash(settings: Any) -> str:
  """16 hex digits of the sha256 of `settings` as sorted-key JSON (non-JSON values as str)."""
  return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()
                        ).hexdigest()[:16]


def content_digest(*parts: Any) -> str:
  """16 hex digits identifying a sequence of parts (bytes as is, others as sorted JSON)."""
  h = hashlib.sha256()
  for p in parts:
    h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True).encode())
    h.update(b"\x00")
  return h.hexdigest()[:16]


def params_fingerprint(params: Any, samples_per_leaf: int = 4096) -> str:
  """16 hex digits identifying a parameter tree (which checkpoint made an artifact).

  Hashes paths, shapes and an evenly strided float32 sample of each leaf, so it costs a
  few KB of transfers even for a sharded multi-GB tree, and changes with any training
  step. Multi-host sharded leaves are gathered (a collective: call on every process).
  """
  h = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves_with_path(params)
  for path, x in sorted(leaves, key=lambda e: jax.tree_util.keystr(e[0])):
    size = int(np.prod(x.shape))
    stride = max(1, size // samples_per_leaf)
    sample = jnp.asarray(x).reshape(-1)[::stride].astype(jnp.float32)
    try:
      host = np.asarray(jax.device_get(sample))
    except RuntimeError:  # not fully addressable (multi-host sharded)
      host = np.asarray(multihost_utils.process_allgather(sample, tiled=True))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(repr(tuple(x.shape)).encode())
    h.update(host.tobytes())
  return h.hexdigest()[:16]
