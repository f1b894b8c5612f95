"""m3jax's data pipeline: text in, tokenized datasets, references and batches out.

Modules (one concept each):
  tokenizer        SentencePiece training, `Tokenizer`, compatibility checks.
  corpus           reading local .txt/.jsonl(.gz) files and TFDS datasets.
  knowledge_world  the embedded fictional world (train text, knowledge base, eval QA).
  tfds_builders    TFDS builders (array_record, no TensorFlow) for every dataset we write.
  references       cutting knowledge-base documents into references; `ReferenceStore`.
  packing          packing tokenized documents into fixed-length training sequences.
  documents        prepare-data's documents stage: the corpus sources and their datasets.
  prepare          the `m3jax prepare-data` stages, their reuse and the manifest.
  prepared         opening what prepare-data wrote: manifest, tokenizer, datasets, questions.
  loader           the grain loader: deterministic, sharded, checkpointable batches.
"""
