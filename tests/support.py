"""Constants shared by tests in several packages (importable; conftest.py is not, once
test folders have their own conftest.py)."""

import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent

TINY_WORLD = ("data.knowledge_world.n_seen=40", "data.knowledge_world.n_memory_taught=40",
              "data.knowledge_world.n_unseen=20")
