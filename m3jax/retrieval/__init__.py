"""Finding references for text: embedders, the ScaNN index, the overlap filter, the
retriever, the retrieval schedule, text RAG contexts and offline neighbor mining."""
