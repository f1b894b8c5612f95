"""Finding references for text.

  embedder, lexical_embedder, model_embedder, embedder_factory   texts -> vectors
  index, sharded_index, reference_index    ScaNN search; a workdir's reference index
  index_tuning                             recall@k; search settings chosen for a target recall
  overlap                                  the eq.-6 overlap (leakage / copy filter)
  search                                   the retrieval core: embed, search, filter, top-k
  retriever                                query-time retrieval (evaluation, generation, RAG)
  schedule, rag                            when to retrieve; text RAG contexts
  neighbors, neighbor_table                offline neighbor mining and its table
"""
