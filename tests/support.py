"""Constants shared by tests in several packages (importable; conftest.py is not, once
test folders have their own conftest.py)."""

import pathlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent

TINY_WORLD = ("data.knowledge_world.n_seen=40", "data.knowledge_world.n_memory_taught=40",
              "data.knowledge_world.n_unseen=20")


def clustered(n, n_queries, dim=32, n_clusters=60, seed=0):
  """Database and queries drawn around the same centres (iid data makes recall meaningless)."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(n_clusters, dim))

  def draw(m):
    x = centres[rng.integers(0, n_clusters, m)] + 0.35 * rng.normal(size=(m, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

  return draw(n), draw(n_queries)
