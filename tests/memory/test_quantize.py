"""Vector quantization of memory vectors: int8, product quantization, reports."""

import numpy as np
import pytest

from m3jax.memory import codecs
from m3jax.memory import pq as pq_lib
from m3jax.memory import quantization_quality as quality
from m3jax.memory.source import MemorySource

SHAPE = (2, 2, 2, 4, 16)  # (L_mem, 2, H_mem, k, d_h)


def clustered(n, seed=0, clusters=12, noise=0.01):
  """Memories whose vectors lie near a few centres per (layer, K/V, head)."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=SHAPE[:3] + (clusters, SHAPE[-1])) * 2.0
  which = rng.integers(0, clusters, size=(n,) + SHAPE[:4])
  c = np.broadcast_to(centres[None, :, :, :, None], (n,) + SHAPE[:3] + (SHAPE[3], clusters,
                                                                          SHAPE[-1]))
  x = np.take_along_axis(c, which[..., None, None], axis=-2)[..., 0, :]
  return (x + noise * rng.normal(size=x.shape)).astype(np.float32)


def test_bfloat16_codec_is_exact_on_bfloat16_values():
  import jax.numpy as jnp
  x = np.asarray(np.random.default_rng(0).normal(size=(5,) + SHAPE).astype(jnp.bfloat16),
                 np.float32)
  codec = codecs.BFloat16Codec(SHAPE)
  assert codec.bytes_per_vector == 2 * SHAPE[-1]
  np.testing.assert_array_equal(codec.round_trip(x), x)


def test_int8_round_trip_error_is_within_half_a_step():
  import jax.numpy as jnp
  # Banks hold bfloat16 values; int8 quantizes exactly those.
  x = np.asarray((np.random.default_rng(1).normal(size=(20,) + SHAPE) * 3).astype(jnp.bfloat16),
                 np.float32)
  x[0, 0, 0, 0, 0] = 0.0  # an all-zero vector (empty slot) stays zero
  codec = codecs.Int8Codec(SHAPE)
  fields = codec.encode(x)
  assert fields["kv_int8"].dtype == np.int8 and fields["kv_scale"].dtype == np.float16
  y = codec.round_trip(x)
  step = np.abs(x).max(-1, keepdims=True) / 127
  # Half a step, plus the float16 rounding of the scale (127 * 2^-11 of a step).
  assert np.all(np.abs(x - y) <= step * (0.5 + 127 * 2.0**-11) + 1e-7)
  np.testing.assert_array_equal(y[0, 0, 0, 0, 0], 0.0)
  assert codecs.relative_mse(x, y) < 2e-4
  assert codec.bytes_per_vector == SHAPE[-1] + 2


def test_pq_reconstructs_clustered_vectors_closely():
  x = clustered(200)
  pq = pq_lib.train_pq(x, grouping="layer_kv", subvectors=(4, 2), iterations=8, seed=0)
  rep = quality.quantization_report(pq, x)
  assert rep.bytes_per_vector == 6 and rep.compression == pytest.approx(32 / 6)
  assert rep.relative_mse < 1e-3, rep.line()
  # Unstructured data of the same size is much harder: the bound above means something.
  g = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
  assert quality.quantization_report(pq, g).relative_mse > 0.1


def test_pq_training_is_deterministic_and_the_file_round_trips(tmp_path):
  x = clustered(120, seed=2)
  a = pq_lib.train_pq(x, subvectors=(4,), iterations=4, seed=5, opq_iterations=1)
  b = pq_lib.train_pq(x, subvectors=(4,), iterations=4, seed=5, opq_iterations=1)
  assert a.to_bytes() == b.to_bytes()
  sha = a.save(str(tmp_path / "q.npz"))
  c = pq_lib.ProductQuantizer.load(str(tmp_path / "q.npz"))
  assert c.to_bytes() == a.to_bytes()
  assert len(sha) == 64
  np.testing.assert_array_equal(c.encode(x)["kv_codes"], a.encode(x)["kv_codes"])
  # The OPQ rotation is orthogonal.
  r = c.rotation[0]
  np.testing.assert_allclose(r @ r.T, np.eye(r.shape[0]), atol=1e-4)


@pytest.mark.parametrize("grouping", codecs.GROUPINGS)
def test_groupings_round_trip_layouts(grouping):
  x = np.arange(3 * np.prod(SHAPE), dtype=np.float32).reshape((3,) + SHAPE)
  g = pq_lib.to_groups(x, grouping)
  assert g.shape[0] == pq_lib.group_count(SHAPE, grouping)
  np.testing.assert_array_equal(pq_lib.from_groups(g, grouping, x.shape), x)


def test_pq_rejects_too_few_training_vectors():
  x = clustered(2)
  with pytest.raises(codecs.QuantizerError, match="pq_train_references"):
    pq_lib.train_pq(x, subvectors=(4,), iterations=2)


class _Fixed(MemorySource):
  memory_shape = SHAPE

  def __init__(self, x):
    self.x = x

  def lookup(self, ref_ids):
    return self.x[np.asarray(ref_ids)], np.ones((len(ref_ids),) + SHAPE[:1] + SHAPE[2:4], bool)


def test_evaluate_quantization_runs_the_loss_on_both_sources():
  x = clustered(64, seed=4)
  pq = pq_lib.train_pq(x, subvectors=(2,), iterations=4)
  ids = np.arange(64)

  def loss(source):
    mem, _ = source.lookup(ids)
    return float(np.mean((np.asarray(mem, np.float32) - x) ** 2))

  out = quality.evaluate_quantization(loss, _Fixed(x), pq, sample_ids=ids[:16])
  assert out["loss_bfloat16"] == 0.0
  assert out["loss_quantized"] > 0.0
  assert out["loss_delta"] == out["loss_quantized"]
  assert out["bytes_per_vector"] == 2 and out["relative_mse"] > 0
