"""The text-RAG competitor's training data: each sequence behind its references' text.

A RAG reader is trained like the continual stage (same warmup checkpoint, same
packed sequences, same mined neighbors, same steps), but reads the references as
text instead of as memories: `train.reader = "rag"`. Each training record becomes

    <s> ref_1 SEP ref_2 SEP ... ref_k SEP sequence

the layout `m3jax.retrieval.rag.build_context` gives at evaluation, where ref_1..k are
the distinct references mined for the sequence's chunks, in chunk order (the
explicit-memory model reads the same references: chunk c those of chunks c-4..c).
Only the sequence's own tokens carry a loss, with the targets and loss mask the
explicit model gets; the record is right-padded to a fixed length (`context_length`)
so batches have one shape. The model runs without memory and without the
`<s>Reference:` sink, as the RAG evaluation runs it.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain.python as grain
import numpy as np

from m3jax.retrieval import rag as rag_lib

READERS = ("memory", "rag")  # train.reader
MEMORY_FIELDS = ("neighbors", "ref_tokens", "ref_lengths")


def context_length(seq_len: int, n_chunks: int, reference_length: int, separator_len: int) -> int:
  """Tokens of a RAG training record: <s>, one reference + SEP per chunk, the sequence."""
  return 1 + n_chunks * (reference_length + separator_len) + seq_len


class RagContexts(grain.MapTransform):
  """A continual-stage record (tokens, targets, loss_mask, neighbors, ref_tokens,
  ref_lengths) -> the RAG reader's record (tokens, targets, loss_mask of `length`)."""

  def __init__(self, *, bos_id: int, pad_id: int, separator: Sequence[int], length: int):
    self.bos_id, self.pad_id = int(bos_id), int(pad_id)
    self.separator = [int(t) for t in separator]
    self.length = int(length)

  def map(self, rec: dict[str, Any]) -> dict[str, Any]:
    ids = np.asarray(rec["neighbors"]).reshape(-1)
    toks, lens = rec["ref_tokens"], rec["ref_lengths"]
    refs, seen = [], set()
    for c, rid in enumerate(ids.tolist()):
      if rid >= 0 and rid not in seen:
        seen.add(rid)
        refs.append(np.asarray(toks[c, :int(lens[c])]).tolist())
    seq = np.asarray(rec["tokens"])
    ctx = rag_lib.build_context(refs, seq.tolist(), bos_id=self.bos_id,
                                separator=self.separator)
    # Sequence position j sits at context position off + j (a leading <s> is shared).
    off = len(ctx) - len(seq)
    if len(ctx) > self.length:
      raise ValueError(f"RAG context of {len(ctx)} tokens exceeds its {self.length}-token record")
    out = {k: v for k, v in rec.items() if k not in MEMORY_FIELDS}
    tokens = np.full(self.length, self.pad_id, np.int32)
    targets = np.full(self.length, self.pad_id, np.int32)
    mask = np.zeros(self.length, np.float32)
    tokens[:len(ctx)] = ctx
    # Positions before the sequence predict the context's next token, without loss.
    targets[:off] = ctx[1:off + 1] if off else []
    targets[off:off + len(seq)] = rec["targets"]
    mask[off:off + len(seq)] = rec["loss_mask"]
    out.update(tokens=tokens, targets=targets, loss_mask=mask)
    return out
