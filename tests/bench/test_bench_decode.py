"""`m3jax bench decode` runs the paper's protocol end to end on the tiny config."""

import pytest

from m3jax.bench import decode as bench_decode
from m3jax.core.config import load_config


@pytest.mark.slow
def test_bench_decode_protocol_on_tiny(repo_root, tmp_path):
  cfg = load_config(str(repo_root / "configs" / "tiny.py"))
  lines = []
  # tiny: chunk_length 16, so 32 in / 32 out is the paper's 2-chunk / 2-chunk shape.
  r = bench_decode.run(cfg, batch=2, prompt_len=32, new_tokens=32, runs=2,
                       bank_dir=str(tmp_path / "bank"), printer=lines.append)
  assert set(r["modes"]) == {"none", "explicit", "rag"}
  # 3 retrievals per row (chunks 0, 1 and 3), as in the paper's 128/128 run.
  assert r["modes"]["explicit"]["retrievals_per_run"] == 3 * 2
  assert r["modes"]["rag"]["retrievals_per_run"] == 2
  # RAG context: <s> + 3 references of 24 tokens (tiny) + the 31 prompt tokens after <s>.
  assert r["modes"]["rag"]["context_tokens"] == 1 + 3 * 24 + 31
  for v in r["modes"].values():
    assert v["tokens_per_s"] > 0 and len(v["run_seconds"]) == 2
    # The first token arrives within its run.
    assert all(0 < f < t for f, t in zip(v["run_ttft_seconds"], v["run_seconds"]))
  # Decode-step costs, counted: the memory slots and RAG's longer context are read.
  steps = {m: v["decode_step"] for m, v in r["modes"].items()}
  cache = [steps[m]["cache_bytes"] for m in ("none", "explicit", "rag")]
  assert cache[0] < cache[1] < cache[2]
  assert steps["none"]["bytes"] < steps["rag"]["bytes"] and steps["none"]["flops"] > 0
  assert r["ttft_explicit_over_rag"] == pytest.approx(
      r["modes"]["explicit"]["ttft_seconds"] / r["modes"]["rag"]["ttft_seconds"])
  assert r["explicit_over_none"] == pytest.approx(
      r["modes"]["explicit"]["tokens_per_s"] / r["modes"]["none"]["tokens_per_s"])
  assert r["bank"]["references"] == bench_decode.references_needed(2, 32, 32, 2, 16, 3)
  assert "explicit / rag" in lines[-1]
  # The bank built into bank_dir is reused by the next invocation.
  again = bench_decode.run(cfg, batch=2, prompt_len=32, new_tokens=32, runs=2,
                           modes=["explicit"], bank_dir=str(tmp_path / "bank"), printer=None)
  assert "bank_build_seconds" not in again and "bank_build_seconds" in r


def test_unique_ids_never_repeat_and_run_out_loudly():
  import numpy as np
  from m3jax.retrieval.retriever import Retrieval

  class R:
    k = 2

    def retrieve(self, queries, filter_texts=None):
      ids = np.zeros((len(queries), 2), np.int64)
      return Retrieval(ids, np.zeros(ids.shape, np.float32), np.zeros(len(queries), np.int64))

  u = bench_decode.UniqueIds(R(), 6)
  assert u.retrieve(["a", "b"]).ids.tolist() == [[0, 1], [2, 3]]
  assert u.retrieve(["c"]).ids.tolist() == [[4, 5]]
  with pytest.raises(RuntimeError, match="too few"):
    u.retrieve(["d"])
