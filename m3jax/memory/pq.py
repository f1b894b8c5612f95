"""Product quantization of memory vectors: codebook groups, the PQ codec, its training.

`ProductQuantizer` ("pq"): an optional learned rotation (OPQ), then residual product
quantization: stage t splits the (rotated) vector into m_t contiguous sub-vectors
(np.array_split widths) and replaces each by the index of its nearest of 256
centroids (one byte); the next stage quantizes what is left. Bytes per vector =
sum(m_t). The paper's OPQ20x80-Residual2x14-PQ8x10 uses 14 bytes per 80-dim
vector (11.4x); `subvectors=(10, 4)` spends the same 14 bytes with 8-bit codes
(docs/model.md "Quantization", paper Appendix B).

Codebooks are trained per group of vectors with k-means (Lloyd, fixed iterations,
seeded initialisation, one-hot matmuls instead of scatter-adds so GPU runs are
deterministic too) on a uniform sample of references. Groups: "layer_kv" (default)
trains one codebook set per (memory layer, K/V): keys carry rotary phases and values
do not, and their scales differ by layer, so sharing across those mixes unlike
distributions; heads of one layer are alike enough to share (and sharing gives every
codebook H_mem times more training vectors). "layer_kv_head", "kv" and "shared" are
the finer and coarser alternatives. A codebook set costs 256·d_h·stages floats, so
even per (layer, K/V, head) the 2.4B model's codebooks are about 60 MB.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.core import artifacts as atomic_io
from m3jax.memory.codecs import GROUPINGS, MemoryCodec, QuantizerError, check_memories

CODEBOOK_SIZE = 256  # 8-bit codes
# Axes of a memory batch [n, L, 2, H, k, d] that index codebook groups.
_GROUP_AXES = {"shared": (), "kv": (2,), "layer_kv": (1, 2), "layer_kv_head": (1, 2, 3)}


# ------------------------------------------------------------------ groups


def group_count(memory_shape: Sequence[int], grouping: str) -> int:
  if grouping not in _GROUP_AXES:
    raise QuantizerError(f"bank.pq_groups: unknown grouping {grouping!r}; one of {GROUPINGS}")
  full = (0,) + tuple(memory_shape)
  return int(np.prod([full[a] for a in _GROUP_AXES[grouping]], dtype=np.int64))


def _group_perm(grouping: str) -> tuple[int, ...]:
  g = _GROUP_AXES[grouping]
  return g + tuple(a for a in range(5) if a not in g) + (5,)


def to_groups(x: Any, grouping: str) -> Any:
  """[n, L, 2, H, k, w] -> [G, V, w]: the vectors of each codebook group."""
  xp = jnp if isinstance(x, jax.Array) else np
  g_axes = _GROUP_AXES[grouping]
  g = int(np.prod([x.shape[a] for a in g_axes], dtype=np.int64))
  return xp.transpose(x, _group_perm(grouping)).reshape(g, -1, x.shape[-1])


def from_groups(y: Any, grouping: str, shape: Sequence[int]) -> Any:
  """Inverse of `to_groups` for a target shape [n, L, 2, H, k, w]."""
  xp = jnp if isinstance(y, jax.Array) else np
  perm = _group_perm(grouping)
  t_shape = [shape[a] for a in perm[:-1]] + [y.shape[-1]]
  return xp.transpose(y.reshape(t_shape), np.argsort(perm))


# ------------------------------------------------------------------ product quantization


def _splits(d: int, m: int) -> tuple[np.ndarray, np.ndarray]:
  """(idx [m, w] into a d+1 vector whose last entry is 0, inv [d] into the flat [m*w])."""
  if not 1 <= m <= d:
    raise QuantizerError(f"bank.pq_subvectors: {m} sub-vectors do not fit d_h={d}")
  parts = np.array_split(np.arange(d), m)
  w = max(len(p) for p in parts)
  idx = np.full((m, w), d, np.int32)
  inv = np.zeros(d, np.int32)
  for j, p in enumerate(parts):
    idx[j, :len(p)] = p
    inv[p] = j * w + np.arange(len(p))
  return idx, inv


def _subvectors(x, idx):
  """[..., d] -> [..., m, w] (padding lanes read a zero)."""
  xp = jnp if isinstance(x, jax.Array) else np
  pad = xp.concatenate([x, xp.zeros(x.shape[:-1] + (1,), x.dtype)], axis=-1)
  return pad[..., idx]


def _gather_centroids(cents, codes):
  """cents [G, m, 256, w], codes [G, V, m] -> [G, V, m, w]."""
  xp = jnp if isinstance(cents, jax.Array) else np
  c = xp.transpose(codes, (0, 2, 1))[..., None].astype(xp.int32)  # [G, m, V, 1]
  out = xp.take_along_axis(cents, c, axis=2)  # [G, m, V, w]
  return xp.transpose(out, (0, 2, 1, 3))


def _assign(xs, cents):
  """Nearest centroid: xs [G, V, m, w], cents [G, m, 256, w] -> codes [G, V, m] int32."""
  cross = jnp.einsum("gvmw,gmcw->gvmc", xs, cents, precision=jax.lax.Precision.HIGHEST)
  dist = jnp.sum(cents * cents, axis=-1)[:, None] - 2.0 * cross
  return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def _pq_encode(x, rotation, cents_list, idx_list, inv_list):
  """x [G, V, d] -> codes [G, V, sum m] uint8 (residual stages after the rotation)."""
  r = jnp.einsum("gvd,gde->gve", x, rotation, precision=jax.lax.Precision.HIGHEST)
  codes = []
  for cents, idx, inv in zip(cents_list, idx_list, inv_list):
    code = _assign(_subvectors(r, idx), cents)
    recon = _gather_centroids(cents, code)
    r = r - recon.reshape(recon.shape[:2] + (-1,))[..., inv]
    codes.append(code.astype(jnp.uint8))
  return jnp.concatenate(codes, axis=-1)


def _pq_decode(codes: np.ndarray, rotation: np.ndarray | None, cents_list, inv_list
               ) -> np.ndarray:
  """codes [G, V, sum m] -> vectors [G, V, d], in numpy on the CPU.

  Each stage is one flat gather from a [G * m * 256, w] table; rotation None skips
  the rotation (identity, no OPQ).
  """
  g, v, _ = codes.shape
  y, start = None, 0
  for cents, inv in zip(cents_list, inv_list):
    _, m, k, w = cents.shape
    base = (np.arange(g)[:, None, None] * m + np.arange(m)[None, None, :]) * k
    rows = base + codes[..., start:start + m].astype(np.int64)  # [G, V, m]
    recon = np.take(cents.reshape(-1, w), rows.reshape(-1), axis=0).reshape(g, v, m * w)
    part = recon[..., inv]
    y = part if y is None else y + part
    start += m
  if rotation is None:
    return y
  return np.matmul(y, np.transpose(rotation, (0, 2, 1)))


class ProductQuantizer(MemoryCodec):
  """Rotation + residual product quantization with 8-bit codes (field `kv_codes`)."""

  method = "pq"

  def __init__(self, memory_shape: Sequence[int], grouping: str, subvectors: Sequence[int],
               rotation: np.ndarray, centroids: Sequence[np.ndarray],
               train_info: dict[str, Any] | None = None):
    self.memory_shape = tuple(int(v) for v in memory_shape)
    self.grouping = grouping
    self.subvectors = tuple(int(m) for m in subvectors)
    d = self.memory_shape[-1]
    g = group_count(self.memory_shape, grouping)
    if not self.subvectors:
      raise QuantizerError("bank.pq_subvectors: needs at least one stage")
    self.rotation = np.asarray(rotation, np.float32)
    if self.rotation.shape != (g, d, d):
      raise QuantizerError(f"PQ rotation has shape {self.rotation.shape}, expected {(g, d, d)}")
    self.centroids = [np.asarray(c, np.float32) for c in centroids]
    self._idx, self._inv = zip(*[_splits(d, m) for m in self.subvectors])
    for t, (c, idx) in enumerate(zip(self.centroids, self._idx)):
      want = (g, idx.shape[0], CODEBOOK_SIZE, idx.shape[1])
      if c.shape != want:
        raise QuantizerError(f"PQ stage {t} centroids have shape {c.shape}, expected {want}")
    self.train_info = dict(train_info or {})
    identity = np.array_equal(self.rotation, np.broadcast_to(np.eye(d, dtype=np.float32),
                                                             self.rotation.shape))
    self._decode_rotation = None if identity else self.rotation
    self._encode_fn = jax.jit(self._encode_groups)

  @property
  def n_groups(self) -> int:
    return self.rotation.shape[0]

  @property
  def bytes_per_vector(self) -> int:
    return sum(self.subvectors)

  def fields(self):
    return [("kv_codes", "u1", self.memory_shape[:-1] + (self.bytes_per_vector,))]

  def _encode_groups(self, memories):
    x = memories.astype(jnp.bfloat16).astype(jnp.float32)  # what a bf16 bank holds
    codes = _pq_encode(to_groups(x, self.grouping), jnp.asarray(self.rotation),
                       [jnp.asarray(c) for c in self.centroids], self._idx, self._inv)
    return from_groups(codes, self.grouping, memories.shape[:-1] + (codes.shape[-1],))

  def encode(self, memories):
    check_memories(memories, self.memory_shape)
    return {"kv_codes": np.asarray(jax.device_get(self._encode_fn(jnp.asarray(memories))))}

  def decode(self, records):
    codes = np.asarray(records["kv_codes"])
    y = _pq_decode(to_groups(codes, self.grouping), self._decode_rotation, self.centroids,
                   self._inv)
    return from_groups(y.astype(np.float32), self.grouping, codes.shape[:-1] + (y.shape[-1],))

  def describe(self):
    out = super().describe()
    out.update(grouping=self.grouping, subvectors=list(self.subvectors), groups=self.n_groups,
               codebook_size=CODEBOOK_SIZE, train=self.train_info)
    return out

  # ---------------------------------------------------------------- files (npz, no pickle)

  def to_bytes(self) -> bytes:
    meta = dict(format="m3jax-pq", version=1, memory_shape=list(self.memory_shape),
                grouping=self.grouping, subvectors=list(self.subvectors),
                train_info=self.train_info)
    arrays = {"meta": np.asarray(json.dumps(meta, sort_keys=True)),
              "rotation": self.rotation}
    arrays.update({f"centroids_{t}": c for t, c in enumerate(self.centroids)})
    # np.savez stamps the current time into the zip; fixed dates give identical bytes
    # for identical codebooks (the bank records the file's sha256).
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
      for name, arr in arrays.items():
        with zf.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                     "w", force_zip64=True) as f:
          np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)
    return buf.getvalue()

  def save(self, path: str) -> str:
    """Writes the quantizer atomically; returns its sha256."""
    data = self.to_bytes()
    atomic_io.write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()

  @classmethod
  def load(cls, path: str) -> "ProductQuantizer":
    try:
      with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        if meta.get("format") != "m3jax-pq":
          raise QuantizerError(f"{path}: not an m3jax PQ quantizer (format "
                               f"{meta.get('format')!r})")
        n = len(meta["subvectors"])
        return cls(meta["memory_shape"], meta["grouping"], meta["subvectors"], z["rotation"],
                   [z[f"centroids_{t}"] for t in range(n)], meta.get("train_info"))
    except (OSError, KeyError, ValueError) as e:
      if isinstance(e, QuantizerError):
        raise
      raise QuantizerError(f"{path}: cannot read PQ quantizer ({e})") from e


# ------------------------------------------------------------------ training


@jax.jit
def _lloyd_step(x, cents):
  """One k-means step for a stack of problems: x [B, N, w], cents [B, K, w]."""

  def one(args):
    xb, cb = args
    cross = jnp.dot(xb, cb.T, precision=jax.lax.Precision.HIGHEST)
    assign = jnp.argmin(jnp.sum(cb * cb, -1)[None] - 2.0 * cross, axis=-1)
    onehot = jax.nn.one_hot(assign, cb.shape[0], dtype=jnp.float32)  # deterministic sums
    sums = jnp.dot(onehot.T, xb, precision=jax.lax.Precision.HIGHEST)
    counts = onehot.sum(0)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], cb)

  return jax.lax.map(one, (x, cents))


def kmeans(x: np.ndarray, k: int, iterations: int, seed: int) -> np.ndarray:
  """Centroids [B, k, w] of B independent problems x [B, N, w] (seeded, deterministic)."""
  b, n, _ = x.shape
  if n < k:
    raise QuantizerError(f"k-means needs at least {k} training vectors per codebook, got {n}; "
                         "raise bank.pq_train_references")
  rng = np.random.default_rng(seed)
  init = np.stack([x[i, rng.choice(n, size=k, replace=False)] for i in range(b)])
  cents = jnp.asarray(init, jnp.float32)
  xj = jnp.asarray(x, jnp.float32)
  for _ in range(iterations):
    cents = _lloyd_step(xj, cents)
  return np.asarray(cents)


def _train_stages(x: np.ndarray, subvectors: Sequence[int], iterations: int, seed: int
                  ) -> list[np.ndarray]:
  """Residual PQ codebooks for x [G, N, d] (already rotated)."""
  g, _, d = x.shape
  r = x.astype(np.float32)
  cents_list = []
  for t, m in enumerate(subvectors):
    idx, inv = _splits(d, m)
    xs = _subvectors(r, idx)  # [G, N, m, w]
    w = idx.shape[1]
    flat = np.transpose(xs, (0, 2, 1, 3)).reshape(g * m, -1, w)
    cents = kmeans(flat, CODEBOOK_SIZE, iterations, seed + 7919 * t).reshape(g, m,
                                                                             CODEBOOK_SIZE, w)
    cents = np.where((idx < d)[None, :, None, :], cents, 0.0).astype(np.float32)
    code = np.asarray(_assign(jnp.asarray(xs), jnp.asarray(cents)))
    recon = _gather_centroids(cents, code)
    r = r - recon.reshape(recon.shape[:2] + (-1,))[..., inv]
    cents_list.append(cents)
  return cents_list


def train_pq(memories: np.ndarray, *, grouping: str = "layer_kv",
             subvectors: Sequence[int] = (10, 4), iterations: int = 20,
             opq_iterations: int = 0, seed: int = 0, max_vectors_per_group: int = 65536,
             train_info: dict[str, Any] | None = None) -> ProductQuantizer:
  """Trains a `ProductQuantizer` on sample memories [n, L, 2, H, k, d].

  Slots that are exactly zero (empty slots of short references) are left out.
  `opq_iterations` > 0 alternates PQ training and the orthogonal Procrustes update
  of the rotation (OPQ, non-parametric), each round with `iterations // 2` k-means
  steps; 0 keeps the identity.
  """
  memories = np.asarray(jax.device_get(jnp.asarray(memories).astype(jnp.bfloat16)), np.float32)
  shape = memories.shape[1:]
  d = shape[-1]
  if grouping not in GROUPINGS:
    raise QuantizerError(f"bank.pq_groups: unknown grouping {grouping!r}; one of {GROUPINGS}")
  x = to_groups(memories, grouping)  # [G, V, d]
  keep = np.abs(x).sum(-1).min(0) > 0  # a vector slot is kept when no group has it empty
  x = x[:, keep]
  rng = np.random.default_rng(seed)
  if x.shape[1] > max_vectors_per_group:
    x = x[:, np.sort(rng.choice(x.shape[1], max_vectors_per_group, replace=False))]
  g = x.shape[0]
  rotation = np.broadcast_to(np.eye(d, dtype=np.float32), (g, d, d)).copy()
  for _ in range(opq_iterations):
    xr = np.einsum("gvd,gde->gve", x, rotation)
    cents = _train_stages(xr, subvectors, max(1, iterations // 2), seed)
    _, inv_list = zip(*[_splits(d, m) for m in subvectors])
    idx_list = [_splits(d, m)[0] for m in subvectors]
    codes = np.asarray(_pq_encode(jnp.asarray(x), jnp.asarray(rotation),
                                  [jnp.asarray(c) for c in cents], idx_list, inv_list))
    y = _pq_decode(codes, None, cents, inv_list)  # reconstruction in the rotated space
    u, _, vt = np.linalg.svd(np.einsum("gvd,gve->gde", x.astype(np.float64), y))
    rotation = np.einsum("gde,gef->gdf", u, vt).astype(np.float32)
  cents = _train_stages(np.einsum("gvd,gde->gve", x, rotation), subvectors, iterations, seed)
  info = dict(grouping=grouping, iterations=iterations, opq_iterations=opq_iterations,
              seed=seed, vectors_per_group=int(x.shape[1]))
  info.update(train_info or {})
  return ProductQuantizer(shape, grouping, subvectors, rotation, cents, info)
