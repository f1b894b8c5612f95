"""The text-RAG reader's training records (train.reader = "rag")."""

import numpy as np
import pytest

from m3jax.core.config import ConfigError
from m3jax.retrieval import rag as rag_lib
from m3jax.training import loop as train_lib
from m3jax.training import rag_reader

BOS, PAD, SEP = 2, 0, [5]


def _record(tokens, neighbors, refs, next_token=9):
  """A continual-stage record as the loader delivers it (AddTargets + AddReferences)."""
  tokens = np.asarray(tokens, np.int32)
  targets = np.concatenate([tokens[1:], [next_token]]).astype(np.int32)
  R = max([len(r) for r in refs.values()] + [1])
  ref_tokens = np.zeros((len(neighbors), R), np.int32)
  ref_lengths = np.zeros(len(neighbors), np.int32)
  for c, rid in enumerate(neighbors):
    if rid >= 0:
      ref_tokens[c, :len(refs[rid])] = refs[rid]
      ref_lengths[c] = len(refs[rid])
  return dict(tokens=tokens, targets=targets, loss_mask=(targets != PAD).astype(np.float32),
              seq_index=np.int32(3), neighbors=np.asarray(neighbors, np.int32),
              ref_tokens=ref_tokens, ref_lengths=ref_lengths)


def _transform(length):
  return rag_reader.RagContexts(bos_id=BOS, pad_id=PAD, separator=SEP, length=length)


def test_context_is_the_eval_layout_and_the_loss_is_the_sequences():
  refs = {7: [40, 41, 42], 8: [50, 51]}
  rec = _record([BOS, 11, 12, 13, 14, 15], [7, 8, 7], refs)  # ref 7 twice: read once
  out = _transform(30).map(dict(rec))
  ctx = rag_lib.build_context([refs[7], refs[8]], rec["tokens"].tolist(), bos_id=BOS,
                              separator=SEP)
  assert out["tokens"][:len(ctx)].tolist() == ctx
  assert (out["tokens"][len(ctx):] == PAD).all()
  assert set(out) == {"tokens", "targets", "loss_mask", "seq_index"}
  # Exactly the sequence's targets carry a loss, in order: what the memory model learns.
  m = out["loss_mask"] > 0
  assert out["targets"][m].tolist() == rec["targets"][rec["loss_mask"] > 0].tolist()
  # Every position predicts the next context token (the reader sees no future token).
  assert out["targets"][:len(ctx) - 1].tolist() == ctx[1:]
  # The position of the sequence's <s> (the last separator) predicts its first token.
  first = int(np.argmax(m))
  assert out["tokens"][first] == SEP[0] and out["targets"][first] == 11


def test_sequence_without_leading_bos_keeps_every_token():
  refs = {1: [40, 41]}
  rec = _record([11, 12, 13, 14], [1, -1], refs)
  out = _transform(20).map(dict(rec))
  assert out["tokens"][:8].tolist() == [BOS, 40, 41, SEP[0], 11, 12, 13, 14]
  assert out["loss_mask"].sum() == rec["loss_mask"].sum() == 4
  assert out["targets"][4:8].tolist() == [12, 13, 14, 9]


def test_no_reference_is_the_plain_sequence():
  rec = _record([BOS, 11, 12, 13], [-1, -1], {})
  out = _transform(8).map(dict(rec))
  assert out["tokens"][:4].tolist() == rec["tokens"].tolist()
  assert out["targets"][:4].tolist() == rec["targets"].tolist()
  assert out["loss_mask"][:4].tolist() == rec["loss_mask"].tolist()
  assert out["loss_mask"][4:].sum() == 0


def test_record_length_bounds_every_context():
  # One reference of R tokens + SEP per chunk, the sequence and <s>: never more.
  R, C, T = 4, 2, 6
  length = rag_reader.context_length(T, C, R, len(SEP))
  refs = {1: [40] * R, 2: [50] * R}
  out = _transform(length).map(_record([11] * T, [1, 2], refs))
  assert out["tokens"][-1] != PAD  # filled exactly
  with pytest.raises(ValueError, match="exceeds"):
    _transform(length - 1).map(_record([11] * T, [1, 2], refs))


def test_reader_setting_is_checked(tiny_config):
  c = tiny_config.copy_and_resolve_references()
  c.train.reader = "rag"
  with pytest.raises(ConfigError, match="train.reader"):
    train_lib.config_lib.validate(c)  # warmup stage
  c.train.stage = "continual"
  train_lib.config_lib.validate(c)
  assert not train_lib.uses_memory(c) and train_lib.is_rag_reader(c)
  c.train.reader = "text"
  with pytest.raises(ConfigError, match="memory or rag"):
    train_lib.config_lib.validate(c)


@pytest.mark.slow
def test_rag_reader_trains_on_the_continual_data(tiny_prepared, tmp_path):
  """Same batches as the continual stage (same sequences, same loss tokens), the
  references as text in front; the model runs without memory."""
  import shutil
  from m3jax.retrieval import neighbors as neighbors_lib
  from m3jax.retrieval import reference_index
  cfg, src = tiny_prepared
  wd = tmp_path / "wd"
  shutil.copytree(src / "data", wd / "data")
  reference_index.build_reference_index(cfg, str(wd))
  for split in ("train", "validation"):
    neighbors_lib.mine_workdir(cfg, str(wd), split=split, progress_every_s=None)
  mem = cfg.copy_and_resolve_references()
  mem.train.update(stage="continual", steps=2, log_every=1, eval_every=2, checkpoint_every=2)
  root = str(wd / "data")
  rag = mem.copy_and_resolve_references()
  rag.train.reader = "rag"
  rag.data.workdir_data = root
  mem_batch = next(train_lib.make_train_loader(train_lib.build_context(mem), root))
  rag_batch = next(train_lib.make_train_loader(train_lib.build_context(rag), root))
  np.testing.assert_array_equal(np.asarray(mem_batch["seq_index"]),
                                np.asarray(rag_batch["seq_index"]))
  assert float(np.asarray(rag_batch["loss_mask"]).sum()) == \
      float(np.asarray(mem_batch["loss_mask"]).sum())
  assert "ref_tokens" not in rag_batch
  assert rag_batch["tokens"].shape[1] == train_lib.tokens_per_step_of(rag, root) // \
      rag.data.batch_size
  out = train_lib.train(rag, str(wd / "rag"))
  assert np.isfinite(out["train/loss"]) and "train/memory_chunk_share" not in out
  assert "eval/no_memory/loss" in out and "eval/memory/loss" not in out
