"""Atomic file writes and manifest comparison, shared by every job that writes artifacts.

Every artifact is written under a unique temporary name beside its final path,
flushed to disk and renamed into place, so a killed job never leaves a file that
looks complete. JSON is written with sorted keys, so reruns give identical bytes.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
from typing import Any

import numpy as np


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
