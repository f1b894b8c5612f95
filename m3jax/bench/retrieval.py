"""`m3jax bench retrieval`: m3jax's index against exact search and FAISS, on one thread.

The data are synthetic clustered unit vectors (`clustered_vectors`): `clusters`
Gaussian centres, each vector a centre plus `spread` times Gaussian noise,
normalised; the queries are new draws from the same mixture (none of them is
indexed). iid vectors would make every approximate index look bad (no vector has
a meaningfully near neighbour), which is why the index tests use the same kind of
mixture.

m3jax's side is `m3jax.retrieval.index.Index.build` with the settings `m3jax
build-index` uses (so the search settings it reports are the ones it chose for its
target recall on its own held-out sample). FAISS's side, when the `faiss` package
is installed, is IVF-PQ (8-bit codes, 4 dimensions per code) with exact float32
re-ranking (`IndexRefineFlat`), the usual FAISS set-up for this size; its nprobe
and re-ranking depth are swept on the benchmark's own queries and the fastest
setting that reaches m3jax's recall is reported, which favours FAISS.

Throughput is queries per CPU-second of this process with one search thread, so a
machine shared with other jobs gives the figures it would give alone (up to cache
effects). Both indexes are built with `build_threads` threads (default 1: on a
machine with more jobs than cores, OpenMP's spinning barriers make FAISS's
multi-threaded training crawl); build times are wall-clock. Recall@k is against
exact search.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import numpy as np

from m3jax.retrieval import index as index_lib
from m3jax.retrieval import index_tuning

# FAISS search settings swept: probes (inverted lists scanned), re-ranking depth as a
# multiple of k. Both ascend; for each depth the probes rise until the recall is reached
# or more probes stop adding recall.
FAISS_NPROBE = (1, 2, 4, 8, 16, 32, 64, 128)
FAISS_K_FACTOR = (1, 2, 4, 8, 16, 32, 64)


def clustered_vectors(n: int, n_queries: int, dim: int, *, clusters: int, spread: float,
                      seed: int, block: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
  """(database [n, dim], queries [n_queries, dim]): float32 unit vectors around shared centres."""
  if min(n, n_queries, dim, clusters) < 1 or spread <= 0:
    raise ValueError("bench retrieval: n, queries, dim and clusters must be >= 1 and spread > 0")
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((clusters, dim), dtype=np.float32)

  def draw(m: int) -> np.ndarray:
    out = np.empty((m, dim), np.float32)
    for lo in range(0, m, block):
      hi = min(m, lo + block)
      x = centres[rng.integers(0, clusters, hi - lo)]
      x += spread * rng.standard_normal((hi - lo, dim), dtype=np.float32)
      out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out

  return draw(n), draw(n_queries)


def cpu_seconds(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, float, Any]:
  """(median CPU seconds of this process, median wall seconds, last result) of `fn`."""
  cpu, wall, out = [], [], None
  for _ in range(max(1, repeats)):
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    cpu.append(time.process_time() - c0)
    wall.append(time.perf_counter() - w0)
  return statistics.median(cpu), statistics.median(wall), out


def _rate(n: int, seconds: float) -> float:
  return n / seconds if seconds > 0 else float("inf")


def one_at_a_time(search: Callable[[np.ndarray], Any], queries: np.ndarray) -> float:
  """Queries per CPU-second searching the rows of `queries` one call each."""
  c0 = time.process_time()
  for i in range(len(queries)):
    search(queries[i:i + 1])
  return _rate(len(queries), time.process_time() - c0)


def bench_m3jax(database: np.ndarray, queries: np.ndarray, exact: np.ndarray, k: int, *,
                settings: index_lib.IndexSettings, repeats: int,
                build_threads: int) -> dict[str, Any]:
  """Builds m3jax's index over `database` and measures recall@k and throughput."""
  settings = dataclasses.replace(settings, training_threads=build_threads)
  t0 = time.perf_counter()
  index = index_lib.Index.build(database, fingerprint="bench-retrieval", settings=settings)
  build_s = time.perf_counter() - t0
  cpu, wall, (got, _) = cpu_seconds(lambda: index.search(queries, k), repeats)
  s = index.settings
  return dict(
      name="m3jax", build_seconds=build_s,
      recall=index_tuning.recall_at_k(got, exact, k),
      qps_batched=_rate(len(queries), cpu), qps_batched_wall=_rate(len(queries), wall),
      qps_single=one_at_a_time(lambda q: index.search(q, k), queries),
      settings={key: s[key] for key in ("mode", "num_leaves", "leaves_to_search", "reorder",
                                        "dims_per_block", "tuning") if key in s})


def faiss_available() -> tuple[bool, str]:
  """(whether FAISS can be imported, why not)."""
  try:
    import faiss  # noqa: F401  # pylint: disable=import-outside-toplevel,unused-import  # optional extra
  except ImportError as e:
    return False, (f"faiss is not installed ({e}); `pip install 'm3jax[faiss]'` adds it")
  return True, ""


def bench_faiss(database: np.ndarray, queries: np.ndarray, exact: np.ndarray, k: int, *,
                recall_to_reach: float, nlist: int, pq_bytes: int, training_sample: int,
                seed: int, repeats: int, build_threads: int) -> dict[str, Any]:
  """FAISS IVF{nlist},PQ{pq_bytes} + exact re-ranking at the fastest swept setting that
  reaches `recall_to_reach` on these queries (the best recall when none does)."""
  import faiss  # pylint: disable=import-outside-toplevel  # optional extra, see faiss_available

  n, dim = database.shape
  nlist = nlist or int(4 * np.sqrt(n))
  pq_bytes = pq_bytes or max(1, dim // 4)
  if dim % pq_bytes:
    raise ValueError(f"bench retrieval: FAISS PQ needs dim ({dim}) divisible by pq_bytes "
                     f"({pq_bytes})")
  nlist = max(1, min(nlist, n // 39))  # FAISS wants >= 39 training points per list
  faiss.omp_set_num_threads(build_threads)
  t0 = time.perf_counter()
  base = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_bytes}", faiss.METRIC_INNER_PRODUCT)
  index = faiss.IndexRefineFlat(base)
  rows = np.random.default_rng(seed).choice(n, size=min(n, training_sample), replace=False)
  index.train(database[np.sort(rows)])
  index.add(database)
  build_s = time.perf_counter() - t0
  faiss.omp_set_num_threads(1)
  ivf = faiss.extract_index_ivf(base)
  sweep = []

  def measure(nprobe: int, k_factor: int, reps: int) -> dict[str, Any]:
    ivf.nprobe = nprobe
    index.k_factor = k_factor
    cpu, wall, (_, got) = cpu_seconds(lambda: index.search(queries, k), reps)
    return dict(nprobe=nprobe, k_factor=k_factor, recall=index_tuning.recall_at_k(got, exact, k),
                qps_batched=_rate(len(queries), cpu), qps_batched_wall=_rate(len(queries), wall))

  for k_factor in FAISS_K_FACTOR:
    previous = -1.0
    for nprobe in FAISS_NPROBE:
      if nprobe > nlist:
        break
      point = measure(nprobe, k_factor, 1)
      sweep.append(point)
      if point["recall"] >= recall_to_reach or point["recall"] - previous < 1e-3:
        break  # reached, or the re-ranking depth (not the probes) limits the recall
      previous = point["recall"]
  reaching = [p for p in sweep if p["recall"] >= recall_to_reach]
  best = (max(reaching, key=lambda p: p["qps_batched"]) if reaching
          else max(sweep, key=lambda p: (p["recall"], p["qps_batched"])))
  best = measure(best["nprobe"], best["k_factor"], repeats)  # re-timed like m3jax's side
  ivf.nprobe, index.k_factor = best["nprobe"], best["k_factor"]
  return dict(name=f"FAISS IVF{nlist},PQ{pq_bytes} + re-ranking", build_seconds=build_s,
              recall=best["recall"], qps_batched=best["qps_batched"],
              qps_batched_wall=best["qps_batched_wall"],
              qps_single=one_at_a_time(lambda q: index.search(q, k), queries),
              reached=bool(reaching), settings=dict(nlist=nlist, pq_bytes=pq_bytes,
                                                    nprobe=best["nprobe"],
                                                    k_factor=best["k_factor"]),
              sweep=sweep)


@dataclasses.dataclass(frozen=True)
class BenchSettings:
  """What `m3jax bench retrieval` measures (defaults: the issue's 1M x 256 set-up)."""
  n: int = 1_000_000
  dim: int = 256
  queries: int = 2000
  k: int = 5
  clusters: int = 1000
  spread: float = 0.35
  seed: int = 0
  repeats: int = 3
  faiss: bool = True
  build_threads: int = 1
  faiss_nlist: int = 0      # 0: 4 * sqrt(n) (4,000 at 1M), FAISS's own rule of thumb
  faiss_pq_bytes: int = 0   # 0: dim / 4, one byte per 4 dimensions (64 at dim 256)
  faiss_training_sample: int = 250_000


def run(bench: BenchSettings, index_settings: index_lib.IndexSettings | None = None, *,
        printer: Callable[[str], None] | None = print) -> dict[str, Any]:
  """Builds both indexes on the same data and returns (and prints) the figures."""
  say = printer or (lambda _: None)
  if min(bench.k, bench.repeats, bench.build_threads) < 1:
    raise ValueError("bench retrieval: k, repeats and build_threads must be >= 1")
  index_settings = index_settings or index_lib.IndexSettings()
  if not 0 <= index_settings.target_recall <= 1:
    raise ValueError(f"bench retrieval: target_recall {index_settings.target_recall} is not "
                     "in [0, 1]")
  t0 = time.perf_counter()
  database, queries = clustered_vectors(bench.n, bench.queries, bench.dim,
                                        clusters=bench.clusters, spread=bench.spread,
                                        seed=bench.seed)
  say(f"bench retrieval: {bench.n:,} x {bench.dim} vectors in {bench.clusters} clusters "
      f"(spread {bench.spread}), {bench.queries:,} new queries, "
      f"{time.perf_counter() - t0:.1f} s")
  cpu, _, (exact, _) = cpu_seconds(lambda: index_lib.brute_force_search(
      database, np.arange(bench.n, dtype=np.int64), queries, bench.k))
  result: dict[str, Any] = dict(settings=dataclasses.asdict(bench), k=bench.k,
                                exact_qps_batched=_rate(bench.queries, cpu), systems=[])
  say(f"bench retrieval: exact search {result['exact_qps_batched']:,.0f} queries/CPU-s; "
      "building m3jax's index")
  ours = bench_m3jax(database, queries, exact, bench.k, settings=index_settings,
                     repeats=bench.repeats, build_threads=bench.build_threads)
  result["systems"].append(ours)
  say(f"bench retrieval: m3jax {_summary(ours)}")
  ok, why = faiss_available() if bench.faiss else (False, "turned off (--nofaiss)")
  if ok:
    say("bench retrieval: building FAISS's index")
    theirs = bench_faiss(database, queries, exact, bench.k, recall_to_reach=ours["recall"],
                         nlist=bench.faiss_nlist, pq_bytes=bench.faiss_pq_bytes,
                         training_sample=bench.faiss_training_sample, seed=bench.seed,
                         repeats=bench.repeats, build_threads=bench.build_threads)
    result["systems"].append(theirs)
    say(f"bench retrieval: FAISS {_summary(theirs)}")
    result["m3jax_over_faiss_batched"] = ours["qps_batched"] / theirs["qps_batched"]
    result["m3jax_over_faiss_single"] = ours["qps_single"] / theirs["qps_single"]
  else:
    result["faiss_skipped"] = why
  for line in table(result):
    say(line)
  return result


def _summary(s: dict[str, Any]) -> str:
  return (f"build {s['build_seconds']:.1f} s, recall {s['recall']:.4f}, "
          f"{s['qps_batched']:,.0f} q/s batched, {s['qps_single']:,.0f} one at a time, "
          f"{s['settings']}")


def table(result: dict[str, Any]) -> list[str]:
  """The figures as a fixed-width table plus the ratio / skip lines."""
  k = result["k"]
  head = (f"{'index':<34} {'build s':>8} {f'recall@{k}':>9} {'q/s batched':>12} "
          f"{'q/s single':>11}  settings")
  lines = [head, "-" * len(head)]
  for s in result["systems"]:
    st = {key: v for key, v in s["settings"].items() if key != "tuning"}
    lines.append(f"{s['name']:<34} {s['build_seconds']:>8.1f} {s['recall']:>9.4f} "
                 f"{s['qps_batched']:>12,.0f} {s['qps_single']:>11,.0f}  "
                 + " ".join(f"{key}={v}" for key, v in st.items()))
  lines.append(f"exact search (numpy): {result['exact_qps_batched']:,.0f} queries/CPU-s")
  if "faiss_skipped" in result:
    lines.append(f"FAISS skipped: {result['faiss_skipped']}")
  else:
    faiss_side = result["systems"][1]
    note = "" if faiss_side["reached"] else " (FAISS never reached m3jax's recall in its sweep)"
    lines.append(f"m3jax / FAISS at equal recall: {result['m3jax_over_faiss_batched']:.2f}x "
                 f"batched, {result['m3jax_over_faiss_single']:.2f}x one at a time{note}")
  lines.append("queries/s are per CPU-second of one search thread; build s are wall-clock "
               f"with {result['settings']['build_threads']} thread(s)")
  return lines
