"""TFDS builders for every dataset m3jax writes: array_record files, no TensorFlow.

All builders are `tfds.core.ShardBasedBuilder`s: the caller hands over, per split,
a list of shard generators (picklable callables yielding `(key, example)`), and each
becomes one array_record shard written as it streams. Nothing is shuffled: record
i of a split is the i-th example generated, which is what makes reference ids and
sequence indices stable. Memory while writing is bounded by one shard (TFDS keeps
a shard's examples until it has counted them), so shards are kept to a few
hundred MB by the callers.

Written datasets are read back with `open_split(version_dir, split)` (or any
`tfds.builder_from_directory(...).as_data_source(split)`), which needs only the
directory: `dataset_info.json` + `features.json` describe it.

Building one is quiet and leaves nothing behind: TFDS's "Downloading and preparing
dataset" / "downloaded and prepared" lines (meant for downloads) are not printed, and
the builder's info is never looked up in TFDS's GCS bucket (a lookup that leaves an
empty `tmp*tfds` directory in the temporary directory each time).

  m3jax_documents   splits train, kb: text, source
  m3jax_qa          splits train, eval: question, prompt, answer, distractors, group,
                    entity_id, entity_name, attribute
  m3jax_references  split train: ref_id, doc_id, doc_key, piece, tokens [None] int32, text
  m3jax_packed      splits train, validation: tokens [T] int32, next_token int32,
                    chunk_doc_keys [C] int64
  m3jax_chat        splits train, validation: tokens, targets [T] int32, loss_mask [T]
                    float32, neighbors [C] int32 (post-training, m3jax.training.chat_data)
  m3jax_preferences splits train, validation: chosen_/rejected_ tokens, targets, loss_mask,
                    neighbors [C] int32
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

VERSION = "1.0.0"
ShardFn = Callable[[], Iterable[tuple[Any, dict[str, Any]]]]

DOCUMENT_FEATURES = dict(text=tfds.features.Text(), source=tfds.features.Text())

QA_FEATURES = dict(
    question=tfds.features.Text(), prompt=tfds.features.Text(), answer=tfds.features.Text(),
    distractors=tfds.features.Sequence(tfds.features.Text()), group=tfds.features.Text(),
    entity_id=np.int64, entity_name=tfds.features.Text(), attribute=tfds.features.Text())

REFERENCE_FEATURES = dict(
    ref_id=np.int64, doc_id=np.int64, doc_key=np.int64, piece=np.int32,
    tokens=tfds.features.Tensor(shape=(None,), dtype=np.int32), text=tfds.features.Text())


def packed_features(seq_len: int, chunk_length: int) -> dict[str, Any]:
  return dict(tokens=tfds.features.Tensor(shape=(seq_len,), dtype=np.int32),
              next_token=np.int32,
              chunk_doc_keys=tfds.features.Tensor(shape=(seq_len // chunk_length,),
                                                  dtype=np.int64))


class _LocalDatasetInfo(tfds.core.DatasetInfo):
  """The info of a dataset built here from local text: never on TFDS's GCS bucket."""

  def initialize_from_bucket(self) -> None:
    pass  # TFDS makes a temporary directory before asking GCS and never removes it


class _ShardedBuilder(tfds.core.ShardBasedBuilder, skip_registration=True):
  """Writes given shard generators with given features.

  Write-only and unregistered: readers open the directory (`tfds.builder_from_directory`,
  or `tfds.builder(name, data_dir=...)`, which falls back to the files), so no code is
  needed to read an m3jax dataset.
  """

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, features: Mapping[str, Any], shards: Mapping[str, Sequence[ShardFn]],
               description: str = "", metadata: Mapping[str, Any] | None = None, **kwargs):
    self._features = dict(features)
    self._shards = {k: list(v) for k, v in shards.items()}
    self._description = description
    self._metadata = dict(metadata or {})
    super().__init__(file_format="array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return _LocalDatasetInfo(
        builder=self, description=self._description,
        features=tfds.features.FeaturesDict(self._features), disable_shuffling=True,
        metadata=tfds.core.MetadataDict(self._metadata))

  def _shard_iterators_per_split(self, dl_manager) -> dict[str, list[ShardFn]]:
    del dl_manager
    return self._shards

  def _log_download_bytes(self) -> None:
    pass  # "Downloading and preparing dataset Unknown size ...": nothing is downloaded

  def _log_download_done(self) -> None:
    pass  # "Dataset ... downloaded and prepared to ...": prepare-data reports its stages


class M3jaxDocuments(_ShardedBuilder, skip_registration=True):
  """Plain documents (training text or knowledge base), one record per document."""


class M3jaxQa(_ShardedBuilder, skip_registration=True):
  """Knowledge-world question/answer pairs (training QA and held-out eval questions)."""


class M3jaxReferences(_ShardedBuilder, skip_registration=True):
  """Knowledge-base references: record i has ref_id i."""


class M3jaxPacked(_ShardedBuilder, skip_registration=True):
  """Packed training sequences: record i is sequence i (the loader's seq_index)."""


class M3jaxChat(_ShardedBuilder, skip_registration=True):
  """Packed chat sequences: tokens, targets, loss_mask [T] and a reference id per chunk."""


class M3jaxPreferences(_ShardedBuilder, skip_registration=True):
  """Preference pairs: chosen_* and rejected_* sequences sharing reference ids per chunk."""


BUILDERS = {cls.name: cls for cls in (M3jaxDocuments, M3jaxQa, M3jaxReferences, M3jaxPacked,
                                      M3jaxChat, M3jaxPreferences)}


def write_dataset(builder_cls: type[_ShardedBuilder], data_dir: str, *,
                  features: Mapping[str, Any], shards: Mapping[str, Sequence[ShardFn]],
                  description: str = "", metadata: Mapping[str, Any] | None = None) -> str:
  """Writes the dataset under `data_dir`; returns its version directory.

  TFDS writes into a temporary `incomplete.*` directory and renames it when every
  split is done, so a killed run leaves no directory that looks complete.
  """
  tfds.disable_progress_bar()
  builder = builder_cls(features=features, shards=shards, description=description,
                        metadata=metadata, data_dir=data_dir)
  builder.download_and_prepare()
  return os.fspath(builder.data_dir)


def version_dir(data_dir: str, builder_cls: type[_ShardedBuilder]) -> str:
  """Where `write_dataset(builder_cls, data_dir, ...)` puts the dataset."""
  return os.path.join(data_dir, builder_cls.name, VERSION)


def open_split(path: str, split: str):
  """Random-access source (len, [i], __getitems__) for `split` of the dataset at `path`."""
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    raise ValueError(f"dataset {path} has no split {split!r}; splits: "
                     f"{sorted(builder.info.splits)}")
  if builder.info.splits[split].num_examples == 0:
    raise ValueError(f"dataset {path} split {split!r} is empty")
  return builder.as_data_source(split=split)


def split_sizes(path: str) -> dict[str, int]:
  builder = tfds.builder_from_directory(path)
  return {k: int(v.num_examples) for k, v in builder.info.splits.items()}


def metadata(path: str) -> dict[str, Any]:
  return dict(tfds.builder_from_directory(path).info.metadata or {})
