"""A tiny model, its params, a random reference store and its on-the-fly memories."""

import dataclasses

import jax
import pytest

from eval_fakes import N_REFS
from m3jax.core.config import load_config, model_config
from m3jax.memory.source import ArrayReferenceStore, EncodeOnTheFly
from m3jax.model.transformer import Transformer, init_params


@pytest.fixture(scope="module")
def cfg(repo_root):
  return dataclasses.replace(model_config(load_config(str(repo_root / "configs" / "tiny.py"))),
                             init_std=0.1)


@pytest.fixture(scope="module")
def params(cfg):
  return init_params(cfg, jax.random.key(1))


@pytest.fixture(scope="module")
def store(cfg):
  return ArrayReferenceStore.random(N_REFS, cfg.reference_length, cfg.vocab_size, seed=2,
                                    min_length=4)


@pytest.fixture(scope="module")
def source(cfg, params, store):
  return EncodeOnTheFly(Transformer(cfg), params, store)
