"""`m3jax bench retrieval`: m3jax's index vs exact search and FAISS (m3jax.bench.retrieval).

  m3jax bench retrieval [--n=1000000] [--dim=256] [--queries=2000] [--seed=0]
      [--clusters=1000] [--spread=0.35] [--nofaiss] [--json=FILE]

Synthetic clustered unit vectors; m3jax's index is built with `m3jax build-index`'s
settings unless --target_recall / --num_leaves say otherwise. FAISS runs beside it
when installed (`pip install 'm3jax[faiss]'`). Also runnable as
`python -m m3jax.commands.bench_retrieval`.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from absl import app
from absl import flags

from m3jax import cli
from m3jax import commands
from m3jax.bench import retrieval as bench_retrieval
from m3jax.retrieval import index as index_lib

_DEFAULT = bench_retrieval.BenchSettings()
_INDEX = index_lib.IndexSettings()
_N = flags.DEFINE_integer("n", _DEFAULT.n, "Vectors indexed.")
_DIM = flags.DEFINE_integer("dim", _DEFAULT.dim, "Vector width.")
_QUERIES = flags.DEFINE_integer("queries", _DEFAULT.queries,
                                "New queries from the same mixture (recall and queries/s).")
_K = flags.DEFINE_integer("k", _DEFAULT.k, "Neighbours per query (recall@k).")
_CLUSTERS = flags.DEFINE_integer("clusters", _DEFAULT.clusters, "Gaussian centres of the data.")
_SPREAD = flags.DEFINE_float("spread", _DEFAULT.spread,
                             "Noise around a centre, relative to the centre's scale.")
_SEED = flags.DEFINE_integer("seed", _DEFAULT.seed,
                             "Seed of the data and of FAISS's training sample.")
_REPEATS = flags.DEFINE_integer("repeats", _DEFAULT.repeats,
                                "Timed batched searches per index (median reported).")
_FAISS = flags.DEFINE_bool("faiss", True, "Measure FAISS IVF-PQ + re-ranking beside m3jax "
                           "(skipped with a note when faiss is not installed).")
_THREADS = flags.DEFINE_integer("build_threads", _DEFAULT.build_threads,
                                "Threads each index is built with (searches use one).")
_NLIST = flags.DEFINE_integer("faiss_nlist", _DEFAULT.faiss_nlist,
                              "FAISS inverted lists (0 = 4 * sqrt(n)).")
_PQ = flags.DEFINE_integer("faiss_pq_bytes", _DEFAULT.faiss_pq_bytes,
                           "FAISS PQ sub-quantizers, bytes per vector (0 = dim / 4).")
_TARGET = flags.DEFINE_float("target_recall", _INDEX.target_recall,
                             "m3jax index: recall its build tunes for (0 = fixed settings).")
_LEAVES = flags.DEFINE_integer("num_leaves", _INDEX.num_leaves,
                               "m3jax index: tree leaves (0 = ~sqrt(n)).")
_JSON = flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")


def main(argv: list[str]) -> None:
  commands.check_args(argv)
  bench = dataclasses.replace(
      _DEFAULT, n=_N.value, dim=_DIM.value, queries=_QUERIES.value, k=_K.value,
      clusters=_CLUSTERS.value, spread=_SPREAD.value, seed=_SEED.value, repeats=_REPEATS.value,
      faiss=_FAISS.value, build_threads=_THREADS.value, faiss_nlist=_NLIST.value, faiss_pq_bytes=_PQ.value)
  settings = dataclasses.replace(_INDEX, target_recall=_TARGET.value, num_leaves=_LEAVES.value)
  try:
    result = bench_retrieval.run(bench, settings)
  except ValueError as e:  # the library's checks of the flag values
    raise app.UsageError(str(e)) from None
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  sys.exit(cli.run_module(sys.modules[__name__], sys.argv[1:]))
