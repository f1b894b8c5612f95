"""Hugging Face Llama `config.json` <-> m3jax config, and the sink prefix of an import.

`config_from_hf` maps a LlamaForCausalLM config onto configs/base.py defaults (memory
settings have no HF counterpart and get their defaults); `hf_config_from_model` writes
the config.json of an m3jax architecture. `ConversionError` is the error of every
step of a conversion (see m3jax.model.hf_convert).

The sink prefix `<s>Reference:` of an imported model is [bos] + the tokenizer's ids
of "Reference:" (docs/model.md). It comes from, in this order: the
`reference_prefix_ids` argument; `tokenizer.model` (sentencepiece) in the
checkpoint directory; `tokenizer.json` in it, when the optional `tokenizers`
package is installed. Without any of these, import fails and says so.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import ml_collections
import sentencepiece as spm

from configs import base
from m3jax.core import config as config_lib
from m3jax.core import errors
from m3jax.core.config import ModelConfig

HF_CONFIG = "config.json"
REFERENCE_WORD = "Reference:"


class ConversionError(errors.UserError, ValueError):
  """A checkpoint cannot be converted; the message names the file, field or tensor."""


def read_hf_json(path: str) -> dict[str, Any]:
  """Parsed JSON file of a checkpoint; a missing or damaged one names its path."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ConversionError(f"{path}: not valid JSON ({e})") from e


def _rope_theta(hf: Mapping[str, Any], where: str) -> float:
  """RoPE base from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
  params = hf.get("rope_parameters")
  scaling = hf.get("rope_scaling")
  theta = hf.get("rope_theta")
  for field, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
    if spec is None:
      continue
    if not isinstance(spec, Mapping):
      raise ConversionError(f"{where}: `{field}` must be an object, got {spec!r}")
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind != "default":
      raise ConversionError(
          f"{where}: `{field}` asks for rope type {kind!r}; only plain RoPE ('default') is "
          "supported (m3jax has no RoPE scaling)")
    if spec.get("partial_rotary_factor", 1.0) != 1.0:
      raise ConversionError(f"{where}: `{field}.partial_rotary_factor` must be 1.0")
    if "rope_theta" in spec:
      theta = spec["rope_theta"]
  return float(10000.0 if theta is None else theta)


def _first_id(value: Any, default: int | None) -> int | None:
  if isinstance(value, (list, tuple)):
    return int(value[0]) if value else default
  return default if value is None else int(value)


def reference_prefix_from_tokenizer(path: str, bos_id: int) -> tuple[int, ...] | None:
  """[bos] + ids of "Reference:" from a tokenizer in checkpoint dir `path`, or None.

  Uses `tokenizer.model` (sentencepiece) if present, else `tokenizer.json` via the
  optional `tokenizers` package.
  """
  sp_path = os.path.join(path, "tokenizer.model")
  if os.path.isfile(sp_path):
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    return (bos_id, *sp.encode(REFERENCE_WORD))
  tok_path = os.path.join(path, "tokenizer.json")
  if os.path.isfile(tok_path):
    try:
      import tokenizers  # optional dependency, only for checkpoints with tokenizer.json
    except ImportError as e:
      raise ConversionError(
          f"{tok_path}: reading it needs the `tokenizers` package; install it or pass "
          "reference_prefix_ids (--reference_prefix_ids)") from e
    tok = tokenizers.Tokenizer.from_file(tok_path)
    return (bos_id, *tok.encode(REFERENCE_WORD, add_special_tokens=False).ids)
  return None


def config_from_hf(path_or_config: str | Mapping[str, Any], *,
                   reference_prefix_ids: Sequence[int] | None = None,
                   overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """An m3jax config (configs/base.py defaults) for a HF Llama `config.json`.

  `path_or_config` is a checkpoint directory, a config.json path, or its parsed dict.
  Memory layers default to the first half, memory heads to all KV heads;
  `max_seq_len` becomes `max_position_embeddings` rounded down to a multiple of
  `chunk_length`. `overrides` are `a.b=v` strings applied last (then validated).
  """

  if isinstance(path_or_config, Mapping):
    hf, where, ckpt_dir = dict(path_or_config), HF_CONFIG, None
  else:
    path = str(path_or_config)
    ckpt_dir = path if os.path.isdir(path) else os.path.dirname(path)
    where = os.path.join(path, HF_CONFIG) if os.path.isdir(path) else path
    hf = read_hf_json(where)

  def need(field: str) -> Any:
    if hf.get(field) is None:
      raise ConversionError(f"{where}: required field `{field}` is missing")
    return hf[field]

  model_type = hf.get("model_type", "llama")
  if model_type != "llama":
    raise ConversionError(f"{where}: `model_type` is {model_type!r}; only 'llama' is supported")
  for field in ("attention_bias", "mlp_bias"):
    if hf.get(field, False):
      raise ConversionError(f"{where}: `{field}` is true; m3jax Llama layers have no biases")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise ConversionError(f"{where}: `hidden_act` is {act!r}; only 'silu' (SwiGLU) is supported")
  heads = int(need("num_attention_heads"))
  d_model = int(need("hidden_size"))
  kv_heads = hf.get("num_key_value_heads")
  kv_heads = heads if kv_heads is None else int(kv_heads)
  head_dim = hf.get("head_dim")
  head_dim = d_model // heads if head_dim is None else int(head_dim)
  bos = _first_id(hf.get("bos_token_id"), 1)
  eos = _first_id(hf.get("eos_token_id"), 2)
  pad = _first_id(hf.get("pad_token_id"), 0)

  if reference_prefix_ids is None and ckpt_dir is not None:
    reference_prefix_ids = reference_prefix_from_tokenizer(ckpt_dir, bos)
  if reference_prefix_ids is None:
    raise ConversionError(
        f"{where}: no tokenizer.model or tokenizer.json beside it to tokenize "
        f"{REFERENCE_WORD!r}; pass reference_prefix_ids (--reference_prefix_ids=BOS,ID,...)")

  cfg = base.get_config()
  cfg.name = "hf_import"
  m = cfg.model
  m.vocab_size = int(need("vocab_size"))
  m.d_model = d_model
  m.n_layers = int(need("num_hidden_layers"))
  m.n_heads = heads
  m.n_kv_heads = kv_heads
  m.head_dim = head_dim
  m.mlp_dim = int(need("intermediate_size"))
  m.rope_theta = _rope_theta(hf, where)
  m.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
  m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
  m.init_std = float(hf.get("initializer_range", m.init_std))
  max_pos = int(hf.get("max_position_embeddings", m.max_seq_len))
  m.max_seq_len = max(m.chunk_length, max_pos // m.chunk_length * m.chunk_length)
  m.memory_layers = None
  m.memory_heads = None
  m.reference_prefix_ids = tuple(int(t) for t in reference_prefix_ids)
  m.bos_id, m.eos_id, m.pad_id = bos, eos, pad
  cfg.data.vocab_size = m.vocab_size
  for item in overrides:
    key, _, raw = item.partition("=")
    config_lib.apply_override(cfg, key.removeprefix("config."), raw)
  try:
    return config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    raise ConversionError(f"{where}: {e}") from e


def hf_config_from_model(m: ModelConfig) -> dict[str, Any]:
  """The `config.json` of a LlamaForCausalLM with the architecture of `m`."""
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": m.vocab_size,
      "hidden_size": m.d_model,
      "intermediate_size": m.mlp_dim,
      "num_hidden_layers": m.n_layers,
      "num_attention_heads": m.n_heads,
      "num_key_value_heads": m.n_kv_heads,
      "head_dim": m.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": m.max_seq_len,
      "initializer_range": m.init_std,
      "rms_norm_eps": m.norm_eps,
      "rope_theta": m.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "tie_word_embeddings": m.tie_embeddings,
      "bos_token_id": m.bos_id,
      "eos_token_id": m.eos_id,
      "pad_token_id": m.pad_id,
      "use_cache": True,
      "torch_dtype": "float32",
  }
