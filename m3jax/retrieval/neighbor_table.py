"""The neighbor table on disk: its format, the settings it records, and its reader.

Neighbor mining (m3jax.retrieval.neighbors) writes, for every packed training
sequence, one retrieved reference per chunk: int32 [n_sequences, C] (or
[n, C, K] for K > 1 neighbors), -1 = none. On disk (a directory, by default
`<data>/neighbors/<split>/`, m3jax.core.workspace.neighbors_dir):

    manifest.json          format, version, n_sequences, seq_len, chunks per sequence,
                           neighbors per chunk, shard_size, n_shards, the mining
                           settings and the identity of every input (corpus,
                           references, index, embedder fingerprint, tokenizer hash)
    neighbors-00000.npy    int32 rows [shard_size * i, shard_size * (i + 1)) ...

`NeighborTable` reads a finished table and refuses one whose manifest does not
match what the reader expects; `open_neighbor_table` checks it against a data
root and config (what training does).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np

from data_pipeline import prepared
from m3jax.core import artifacts as atomic_io
from m3jax.core import errors
from m3jax.core import workspace
from m3jax.core.errors import InputError

FORMAT = "m3jax-neighbors"
VERSION = 1
MANIFEST = "manifest.json"


class NeighborTableError(errors.UserError, ValueError):
  """A missing, incomplete or mismatched neighbor table; the message names it."""


def shard_name(i: int) -> str:
  return f"neighbors-{i:05d}.npy"


@dataclasses.dataclass(frozen=True)
class MiningSettings:
  """What decides the table's contents (recorded in and checked against the manifest)."""
  chunk_length: int
  candidates: int = 10
  neighbors_per_chunk: int = 1
  overlap_threshold: float = 0.9
  exclude_same_doc: bool = False
  shard_size: int = 1024
  skip_ids: tuple[int, ...] = (0, 2, 3)  # pad, bos, eos: a chunk of only these is empty
  pad_id: int = 0

  def check(self) -> None:
    for name in ("chunk_length", "candidates", "neighbors_per_chunk", "shard_size"):
      if getattr(self, name) <= 0:
        raise InputError(f"neighbor mining: {name} must be positive, got {getattr(self, name)}")
    if self.neighbors_per_chunk > self.candidates:
      raise InputError(f"data.neighbors_per_chunk={self.neighbors_per_chunk} exceeds "
                       f"data.neighbor_candidates={self.candidates}")
    if not 0.0 <= self.overlap_threshold <= 1.0:
      raise InputError(f"data.train_overlap_threshold={self.overlap_threshold} is not in [0, 1]")

  @classmethod
  def from_config(cls, cfg: Any, shard_size: int = 1024) -> "MiningSettings":
    m, d = cfg.model, cfg.data
    return cls(chunk_length=int(m.chunk_length), candidates=int(d.neighbor_candidates),
               neighbors_per_chunk=int(d.neighbors_per_chunk),
               overlap_threshold=float(d.train_overlap_threshold),
               exclude_same_doc=bool(d.exclude_same_doc), shard_size=int(shard_size),
               skip_ids=tuple(sorted({int(m.pad_id), int(m.bos_id), int(m.eos_id)})),
               pad_id=int(m.pad_id))

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["skip_ids"] = list(self.skip_ids)
    return d


def table_manifest(*, n_sequences: int, seq_len: int, settings: MiningSettings,
                   inputs: Mapping[str, Any]) -> dict[str, Any]:
  """The manifest a table with these inputs and settings carries (deterministic)."""
  C = seq_len // settings.chunk_length
  n_shards = -(-n_sequences // settings.shard_size)
  return dict(format=FORMAT, version=VERSION, n_sequences=int(n_sequences),
              seq_len=int(seq_len), chunks_per_sequence=C,
              neighbors_per_chunk=settings.neighbors_per_chunk,
              shard_size=settings.shard_size, n_shards=n_shards, dtype="int32",
              settings=settings.to_json(), inputs=json.loads(json.dumps(dict(inputs))))


def _mismatches(manifest: Any, expect: Mapping[str, Any]) -> list[str]:
  """Fields of `expect` (nested) whose values differ in `manifest`, as
  'a.b: table value -> expected value' lines."""

  def plain(want: Any) -> Any:
    return {k: plain(v) for k, v in want.items()} if isinstance(want, Mapping) else want

  def only_expected(got: Any, want: Any) -> Any:
    if not isinstance(want, Mapping):
      return got
    got = got if isinstance(got, Mapping) else {}
    return {k: only_expected(got.get(k), v) for k, v in want.items()}

  return atomic_io.dict_diff(only_expected(manifest, expect), plain(expect))


class NeighborTable:
  """Read access to a finished neighbor table: `table[seq_index] -> int32 [C]` ([C, K]).

  `expect` is a (nested) dict of manifest fields that must match, e.g.
  `{"n_sequences": 1000, "inputs": {"corpus": {...}}, "settings": {...}}`.
  Pickles by path (grain workers).
  """

  def __init__(self, path: str, expect: Mapping[str, Any] | None = None):
    self.path = os.path.abspath(path)
    self._expect = dict(expect or {})
    mpath = os.path.join(self.path, MANIFEST)
    if not os.path.isfile(mpath):
      raise NeighborTableError(f"{mpath} not found: {self.path} holds no neighbor table "
                               "(run `m3jax mine-neighbors`)")
    try:
      with open(mpath) as f:
        self.manifest = json.load(f)
    except (OSError, ValueError) as e:
      raise NeighborTableError(f"{mpath} is not valid JSON: {e}") from e
    if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
      raise NeighborTableError(f"{mpath}: not a {FORMAT} v{VERSION} manifest")
    bad = _mismatches(self.manifest, self._expect)
    if bad:
      raise NeighborTableError(f"neighbor table {self.path} does not match this run "
                               "(table -> expected): " + "; ".join(bad[:8]))
    m = self.manifest
    self._n, self._size = int(m["n_sequences"]), int(m["shard_size"])
    K = int(m["neighbors_per_chunk"])
    self.row_shape = (int(m["chunks_per_sequence"]),) + ((K,) if K > 1 else ())
    missing = [shard_name(i) for i in range(int(m["n_shards"]))
               if not os.path.isfile(os.path.join(self.path, shard_name(i)))]
    if missing:
      raise NeighborTableError(
          f"neighbor table {self.path} is incomplete: {len(missing)} of {m['n_shards']} "
          f"shards missing ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}); "
          "rerun `m3jax mine-neighbors` to finish it")
    self._shards: dict[int, np.ndarray] = {}

  def __getstate__(self):
    return dict(path=self.path, expect=self._expect)

  def __setstate__(self, state):
    self.__init__(state["path"], state["expect"])

  def __len__(self) -> int:
    return self._n

  def _shard(self, i: int) -> np.ndarray:
    arr = self._shards.get(i)
    if arr is None:
      path = os.path.join(self.path, shard_name(i))
      arr = np.load(path, mmap_mode="r", allow_pickle=False)
      rows = min(self._n, (i + 1) * self._size) - i * self._size
      if arr.dtype != np.int32 or arr.shape != (rows,) + self.row_shape:
        raise NeighborTableError(f"{path}: array {arr.dtype}{list(arr.shape)}, expected "
                                 f"int32{[rows, *self.row_shape]}")
      self._shards[i] = arr
    return arr

  def __getitem__(self, seq_index: int) -> np.ndarray:
    i = int(seq_index)
    if not 0 <= i < self._n:
      raise IndexError(f"sequence {i} out of range [0, {self._n}) in {self.path}")
    return np.array(self._shard(i // self._size)[i % self._size])

  def rows(self, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) as one array."""
    lo, hi = max(0, lo), min(self._n, hi)
    parts = [np.zeros((0,) + self.row_shape, np.int32)]
    for i in range(lo // self._size, -(-hi // self._size)):
      base = i * self._size
      a, b = max(lo, base) - base, min(hi, base + self._size) - base
      parts.append(np.asarray(self._shard(i)[a:b]))
    return np.concatenate(parts)


class PrecedingNeighbors:
  """A neighbor table seen as held-out evaluation must see it: chunk c gets the
  neighbor mined for chunk c - 1 (retrieved with the text BEFORE chunk c), chunk 0
  none (-1). Generation retrieves a chunk's memories the same way; the table as
  mined (each chunk's neighbor retrieved with its own text) would score tokens
  with memories found by those very tokens."""

  def __init__(self, table: Any):
    self.table = table

  def __len__(self) -> int:
    return len(self.table)

  def __getitem__(self, seq_index: int) -> np.ndarray:
    row = np.asarray(self.table[seq_index])
    out = np.full_like(row, -1)
    out[1:] = row[:-1]
    return out


def expected_identity(cfg: Any, root: str, split: str = "train") -> dict[str, Any]:
  """Manifest fields a neighbor table of this data root, split and config must carry:
  everything a trainer can check without opening the index (`NeighborTable(expect=)`)."""
  manifest = prepared.load_manifest(root)
  stages = manifest["stages"]
  settings = MiningSettings.from_config(cfg, int(cfg.data.get("neighbor_shard_size", 1024)))
  return dict(
      inputs=dict(
          corpus=dict(dataset=manifest["datasets"]["packed"]["path"], split=split,
                      settings_hash=stages["packed"]["settings_hash"]),
          references=dict(settings_hash=stages["references"]["settings_hash"]),
          tokenizer=manifest["tokenizer"]["hash"]),
      settings={k: v for k, v in settings.to_json().items() if k != "shard_size"})


def open_neighbor_table(cfg: Any, root: str, split: str = "train",
                        path: str | None = None) -> NeighborTable:
  """The finished neighbor table of a data root (`workspace.data_root`), checked against
  its corpus, references, tokenizer and the config's mining settings."""
  return NeighborTable(path or workspace.neighbors_dir(root, split),
                       expect=expected_identity(cfg, root, split))
