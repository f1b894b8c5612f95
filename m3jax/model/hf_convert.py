"""Import and export Hugging Face Llama checkpoints (config.json + safetensors).

`from_hf(dir)` reads a `LlamaForCausalLM` directory into an m3jax model and its
float32 parameter tree; `to_hf(params, cfg, out_dir)` writes one that
`transformers.LlamaForCausalLM.from_pretrained` loads. Neither uses torch or
transformers: weights go through safetensors files as numpy arrays.

The steps live beside this module: the config mapping and the sink prefix in
`m3jax.model.hf_config`, the safetensors reading and the tensor layout in
`m3jax.model.hf_weights`. Every failure is a `ConversionError` (or a
FileNotFoundError / FileExistsError) naming the file, field or tensor.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import ml_collections
from safetensors import numpy as safetensors_numpy

from m3jax.core import artifacts
from m3jax.core import config as config_lib
from m3jax.core.config import ModelConfig
from m3jax.model.hf_config import (  # ConversionError: the error type of this API
    HF_CONFIG,
    ConversionError,
    config_from_hf,
    hf_config_from_model,
)
from m3jax.model.hf_weights import (
    HF_INDEX,
    HF_WEIGHTS,
    hf_tensors_from_params,
    params_from_hf_tensors,
    read_hf_tensors,
)
from m3jax.model.transformer import Transformer

__all__ = ["ConversionError", "config_from_hf", "from_hf", "load_hf", "model_config_summary",
           "to_hf"]


def load_hf(path: str, *, reference_prefix_ids: Sequence[int] | None = None,
            overrides: Sequence[str] = ()) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
  """Reads HF checkpoint dir `path`; returns (m3jax config, float32 parameter tree)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} is not a directory (expected a Hugging Face checkpoint)")
  cfg = config_from_hf(path, reference_prefix_ids=reference_prefix_ids, overrides=overrides)
  m = config_lib.model_config(cfg)
  params = params_from_hf_tensors(read_hf_tensors(path), m, where=path)
  return cfg, params


def from_hf(path: str, *, reference_prefix_ids: Sequence[int] | None = None,
            overrides: Sequence[str] = ()) -> tuple[Any, dict[str, Any]]:
  """Reads HF checkpoint dir `path`; returns (m3jax `Transformer`, parameter tree).

  `model.apply({"params": params}, tokens)` then gives the HF model's logits. The
  model's config (with memory settings) is `model.config`; see `load_hf` for the
  ConfigDict.
  """

  cfg, params = load_hf(path, reference_prefix_ids=reference_prefix_ids, overrides=overrides)
  return Transformer(config_lib.model_config(cfg)), params


def to_hf(params: Mapping[str, Any], cfg: ml_collections.ConfigDict | ModelConfig,
          out_dir: str) -> None:
  """Writes `config.json` + `model.safetensors` (float32) of a LlamaForCausalLM.

  Memory settings have no HF counterpart and are not written. Refuses to overwrite
  an existing config.json or weights in `out_dir`.
  """
  m = cfg if isinstance(cfg, ModelConfig) else config_lib.model_config(cfg)
  for name in (HF_CONFIG, HF_WEIGHTS, HF_INDEX):
    target = os.path.join(out_dir, name)
    if os.path.exists(target):
      raise FileExistsError(f"{target} already exists; refusing to overwrite")
  tensors = hf_tensors_from_params(params, m)
  os.makedirs(out_dir, exist_ok=True)
  artifacts.write_bytes(os.path.join(out_dir, HF_WEIGHTS),
                        safetensors_numpy.save(tensors, metadata={"format": "pt"}))
  artifacts.write_json(os.path.join(out_dir, HF_CONFIG), hf_config_from_model(m))


def model_config_summary(m: ModelConfig) -> str:
  """One line naming the architecture (for the convert command's log)."""
  d = dataclasses.asdict(m)
  keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
          "tie_embeddings", "memory_layers", "reference_prefix_ids")
  return ", ".join(f"{k}={d[k]}" for k in keys)
