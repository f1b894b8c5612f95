"""Import and export Hugging Face Llama checkpoints (config.json + safetensors).

`from_hf(dir)` reads a `LlamaForCausalLM` directory into an m3jax model and its
float32 parameter tree; `to_hf(params, cfg, out_dir)` writes one that
`transformers.LlamaForCausalLM.from_pretrained` loads. Neither uses torch or
transformers: weights go through safetensors files as numpy arrays.

Layouts (HF `nn.Linear.weight` is [out, in]; our kernels are [in, ...]):
  model.embed_tokens.weight [V, D]            -> embed/embedding [V, D]
  layers.i.self_attn.q_proj.weight [H·dh, D]  -> layers_i/attn/q/kernel [D, H, dh]
  layers.i.self_attn.{k,v}_proj [Hkv·dh, D]   -> layers_i/attn/{k,v}/kernel [D, Hkv, dh]
  layers.i.self_attn.o_proj.weight [D, H·dh]  -> layers_i/attn/o/kernel [H, dh, D]
  layers.i.mlp.{gate,up}_proj [F, D]          -> layers_i/mlp/{gate,up}/kernel [D, F]
  layers.i.mlp.down_proj.weight [D, F]        -> layers_i/mlp/down/kernel [F, D]
  layers.i.input_layernorm.weight             -> layers_i/attn_norm/scale
  layers.i.post_attention_layernorm.weight    -> layers_i/mlp_norm/scale
  model.norm.weight                           -> final_norm/scale
  lm_head.weight [V, D]                       -> lm_head/kernel [D, V] (absent when tied)
HF applies rotate-half RoPE to these weights as they are, as m3jax does, so no
permutation of the Q/K rows is needed.

The sink prefix `<s>Reference:` of an imported model is [bos] + the tokenizer's ids
of "Reference:" (CONTRACT.md). It comes from, in this order: the
`reference_prefix_ids` argument; `tokenizer.model` (sentencepiece) in the
checkpoint directory; `tokenizer.json` in it, when the optional `tokenizers`
package is installed. Without any of these, import fails and says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from m3jax.core import config as config_lib
from m3jax.core.config import ModelConfig
from configs import base
from m3jax.model.transformer import Transformer

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
REFERENCE_WORD = "Reference:"

# HF keys that carry no parameters of ours (older checkpoints saved RoPE buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
  """A checkpoint cannot be converted; the message names the file, field or tensor."""


# ------------------------------------------------------------------ config


def _read_json(path: str) -> dict[str, Any]:
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
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=sp_path)
    return (bos_id, *sp.encode(REFERENCE_WORD))
  tok_path = os.path.join(path, "tokenizer.json")
  if os.path.isfile(tok_path):
    try:
      import tokenizers
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
    hf = _read_json(where)

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


# ------------------------------------------------------------------ safetensors I/O

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_raw_tensor(path: str, name: str) -> np.ndarray:
  """Reads one tensor numpy cannot name (BF16) straight from the safetensors layout."""
  import ml_dtypes  # a JAX dependency
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    info = header[name]
    dtype = {"BF16": ml_dtypes.bfloat16, **_ST_DTYPES}.get(info["dtype"])
    if dtype is None:
      raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
    begin, end = info["data_offsets"]
    f.seek(8 + n + begin)
    data = f.read(end - begin)
  return np.frombuffer(data, dtype=dtype).reshape(info["shape"])


def _weight_files(path: str) -> dict[str, str]:
  """Tensor name -> safetensors file, for a single file or a sharded index."""
  from safetensors import safe_open

  single = os.path.join(path, HF_WEIGHTS)
  index = os.path.join(path, HF_INDEX)
  if os.path.isfile(single):
    with safe_open(single, framework="np") as f:
      return {k: single for k in f.keys()}
  if os.path.isfile(index):
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ConversionError(f"{index}: no `weight_map`")
    out = {}
    for name, fname in weight_map.items():
      shard = os.path.join(path, fname)
      if not os.path.isfile(shard):
        raise FileNotFoundError(f"{shard} not found (listed for {name!r} in {index})")
      out[name] = shard
    return out
  if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
    raise FileNotFoundError(
        f"{single} not found: only PyTorch pickle weights are there; re-save them with "
        "safe_serialization=True (m3jax reads safetensors only)")
  raise FileNotFoundError(f"{single} (or {index}) not found in {path}")


def read_hf_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a HF checkpoint directory as float32 numpy arrays."""
  from safetensors import safe_open

  files = _weight_files(path)
  by_file: dict[str, list[str]] = {}
  for name, fname in files.items():
    by_file.setdefault(fname, []).append(name)
  out = {}
  for fname, names in by_file.items():
    with safe_open(fname, framework="np") as f:
      present = set(f.keys())
      for name in names:
        if name not in present:
          raise ConversionError(f"{fname}: tensor {name!r} listed in the index is missing")
        try:
          arr = f.get_tensor(name)
        except TypeError:  # bfloat16: numpy has no name for it
          arr = _read_raw_tensor(fname, name)
        out[name] = np.asarray(arr, dtype=np.float32)
  return out


# ------------------------------------------------------------------ weights


def _expected_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape for a LlamaForCausalLM of architecture `m`."""
  D, H, K, dh, F, V = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size
  shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
  if not m.tie_embeddings:
    shapes["lm_head.weight"] = (V, D)
  for i in range(m.n_layers):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (D,),
        p + "post_attention_layernorm.weight": (D,),
        p + "self_attn.q_proj.weight": (H * dh, D),
        p + "self_attn.k_proj.weight": (K * dh, D),
        p + "self_attn.v_proj.weight": (K * dh, D),
        p + "self_attn.o_proj.weight": (D, H * dh),
        p + "mlp.gate_proj.weight": (F, D),
        p + "mlp.up_proj.weight": (F, D),
        p + "mlp.down_proj.weight": (D, F),
    })
  return shapes


def params_from_hf_tensors(tensors: Mapping[str, np.ndarray], m: ModelConfig,
                           where: str = "checkpoint") -> dict[str, Any]:
  """HF LlamaForCausalLM tensors -> the m3jax parameter tree (float32 numpy arrays)."""
  expected = _expected_shapes(m)
  missing = sorted(set(expected) - set(tensors))
  if missing:
    raise ConversionError(f"{where}: missing tensor(s) {missing[:5]}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
  extra = sorted(k for k in set(tensors) - set(expected)
                 if not k.endswith(_IGNORED_SUFFIXES) and k != "lm_head.weight")
  if extra:
    raise ConversionError(
        f"{where}: unexpected tensor(s) {extra[:5]} (biases or a non-Llama architecture?)")
  for name, shape in expected.items():
    if tuple(tensors[name].shape) != shape:
      raise ConversionError(
          f"{where}: tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
  if m.tie_embeddings and "lm_head.weight" in tensors:
    if not np.array_equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
      raise ConversionError(
          f"{where}: tie_word_embeddings is true but lm_head.weight differs from "
          "model.embed_tokens.weight")

  D, H, K, dh = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim
  f32 = lambda x: np.ascontiguousarray(x, dtype=np.float32)
  params: dict[str, Any] = {"embed": {"embedding": f32(tensors["model.embed_tokens.weight"])}}
  for i in range(m.n_layers):
    t = lambda n: tensors[f"model.layers.{i}.{n}"]
    params[f"layers_{i}"] = {
        "attn_norm": {"scale": f32(t("input_layernorm.weight"))},
        "attn": {
            "q": {"kernel": f32(t("self_attn.q_proj.weight").T.reshape(D, H, dh))},
            "k": {"kernel": f32(t("self_attn.k_proj.weight").T.reshape(D, K, dh))},
            "v": {"kernel": f32(t("self_attn.v_proj.weight").T.reshape(D, K, dh))},
            "o": {"kernel": f32(t("self_attn.o_proj.weight").T.reshape(H, dh, D))},
        },
        "mlp_norm": {"scale": f32(t("post_attention_layernorm.weight"))},
        "mlp": {
            "gate": {"kernel": f32(t("mlp.gate_proj.weight").T)},
            "up": {"kernel": f32(t("mlp.up_proj.weight").T)},
            "down": {"kernel": f32(t("mlp.down_proj.weight").T)},
        },
    }
  params["final_norm"] = {"scale": f32(tensors["model.norm.weight"])}
  if not m.tie_embeddings:
    params["lm_head"] = {"kernel": f32(tensors["lm_head.weight"].T)}
  return params


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def expected_param_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
  """'a/b/c' path -> shape of every leaf of the m3jax parameter tree (CONTRACT.md)."""
  D, H, K, dh, F, V = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim, m.vocab_size
  shapes = {"embed/embedding": (V, D), "final_norm/scale": (D,)}
  if not m.tie_embeddings:
    shapes["lm_head/kernel"] = (D, V)
  for i in range(m.n_layers):
    p = f"layers_{i}/"
    shapes.update({
        p + "attn_norm/scale": (D,), p + "mlp_norm/scale": (D,),
        p + "attn/q/kernel": (D, H, dh), p + "attn/k/kernel": (D, K, dh),
        p + "attn/v/kernel": (D, K, dh), p + "attn/o/kernel": (H, dh, D),
        p + "mlp/gate/kernel": (D, F), p + "mlp/up/kernel": (D, F),
        p + "mlp/down/kernel": (F, D),
    })
  return shapes


def hf_tensors_from_params(params: Mapping[str, Any], m: ModelConfig) -> dict[str, np.ndarray]:
  """The m3jax parameter tree -> HF LlamaForCausalLM tensors (float32 numpy)."""
  import jax
  from flax.core import meta

  if "params" in params and "embed" not in params:
    params = params["params"]
  params = meta.unbox(params)  # logically partitioned leaves of a fresh `init`
  flat = {k: np.asarray(jax.device_get(v), dtype=np.float32) for k, v in _flatten(params).items()}
  expected = expected_param_shapes(m)
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  if missing or extra:
    raise ConversionError(f"parameter tree does not match the config: missing {missing[:5]}, "
                          f"unexpected {extra[:5]}")
  for k, shape in expected.items():
    if flat[k].shape != shape:
      raise ConversionError(f"parameter {k!r} has shape {flat[k].shape}, expected {shape}")

  D, H, K, dh = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim
  c = np.ascontiguousarray
  out = {"model.embed_tokens.weight": c(flat["embed/embedding"]),
         "model.norm.weight": c(flat["final_norm/scale"])}
  if not m.tie_embeddings:
    out["lm_head.weight"] = c(flat["lm_head/kernel"].T)
  for i in range(m.n_layers):
    p, q = f"model.layers.{i}.", f"layers_{i}/"
    out.update({
        p + "input_layernorm.weight": c(flat[q + "attn_norm/scale"]),
        p + "post_attention_layernorm.weight": c(flat[q + "mlp_norm/scale"]),
        p + "self_attn.q_proj.weight": c(flat[q + "attn/q/kernel"].reshape(D, H * dh).T),
        p + "self_attn.k_proj.weight": c(flat[q + "attn/k/kernel"].reshape(D, K * dh).T),
        p + "self_attn.v_proj.weight": c(flat[q + "attn/v/kernel"].reshape(D, K * dh).T),
        p + "self_attn.o_proj.weight": c(flat[q + "attn/o/kernel"].reshape(H * dh, D).T),
        p + "mlp.gate_proj.weight": c(flat[q + "mlp/gate/kernel"].T),
        p + "mlp.up_proj.weight": c(flat[q + "mlp/up/kernel"].T),
        p + "mlp.down_proj.weight": c(flat[q + "mlp/down/kernel"].T),
    })
  return out


# ------------------------------------------------------------------ public API


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
  from safetensors.numpy import save_file

  os.makedirs(out_dir, exist_ok=True)
  weights = os.path.join(out_dir, HF_WEIGHTS)
  save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
  os.replace(weights + ".tmp", weights)
  config_path = os.path.join(out_dir, HF_CONFIG)
  with open(config_path + ".tmp", "w") as f:
    json.dump(hf_config_from_model(m), f, indent=2, sort_keys=True)
  os.replace(config_path + ".tmp", config_path)


def model_config_summary(m: ModelConfig) -> str:
  """One line naming the architecture (for the convert command's log)."""
  d = dataclasses.asdict(m)
  keys = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
          "tie_embeddings", "memory_layers", "reference_prefix_ids")
  return ", ".join(f"{k}={d[k]}" for k in keys)
