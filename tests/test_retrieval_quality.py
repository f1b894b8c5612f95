"""The lexical retriever finds a question's entity in the knowledge base."""

import shutil

import numpy as np

from data_pipeline import prepare
from m3jax import index as index_lib


def test_question_entity_reference_in_top5_for_95_percent(tiny_prepared, tmp_path):
  cfg, src = tiny_prepared
  shutil.copytree(src / "data", tmp_path / "data")
  index_lib.build_reference_index(cfg, str(tmp_path))
  root = prepare.data_root(cfg, str(tmp_path))
  index, embedder = index_lib.load_reference_index(index_lib.index_dir(cfg, str(tmp_path)))
  refs = prepare.open_references(root)
  questions = prepare.read_questions(root, "eval")
  assert len(questions) >= 100
  ids, _ = index.search_texts(embedder, [q.question for q in questions], 5)
  # Knowledge-base document e is entity e's biography (one per entity, in entity order).
  docs = refs.doc_ids(ids.reshape(-1)).reshape(ids.shape)
  hits = np.array([q.entity_id in set(row.tolist()) for q, row in zip(questions, docs)])
  assert hits.mean() >= 0.95, hits.mean()
  # And the check can fail: a shuffled entity assignment is (almost) never in the top 5.
  shuffled = np.roll([q.entity_id for q in questions], len(questions) // 2)
  assert np.mean([e in set(r.tolist()) for e, r in zip(shuffled, docs)]) < 0.2
