"""The weights of a Hugging Face Llama checkpoint: safetensors reading and the tensor layout.

`read_hf_tensors` reads the safetensors file(s) of a checkpoint directory (single or
sharded, bfloat16 included) as float32 numpy arrays, without torch or transformers;
`params_from_hf_tensors` / `hf_tensors_from_params` map them to and from the m3jax
parameter tree, checking every name and shape.

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
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping

import jax
import ml_dtypes  # a JAX dependency: numpy's name for bfloat16
import numpy as np
from flax.core import meta
from safetensors import safe_open

from m3jax.core import artifacts
from m3jax.core.config import ModelConfig
from m3jax.model.hf_config import ConversionError, read_hf_json

HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"

# HF keys that carry no parameters of ours (older checkpoints saved RoPE buffers).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _read_raw_tensor(path: str, name: str) -> np.ndarray:
  """Reads one tensor numpy cannot name (BF16) straight from the safetensors layout."""
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
  single = os.path.join(path, HF_WEIGHTS)
  index = os.path.join(path, HF_INDEX)
  if os.path.isfile(single):
    with safe_open(single, framework="np") as f:
      return {k: single for k in f.keys()}
  if os.path.isfile(index):
    weight_map = read_hf_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ConversionError(f"{index}: no `weight_map`")
    out = {}
    for name, fname in weight_map.items():
      shard = artifacts.confined_path(path, fname, f"{index} weight_map[{name!r}]")
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


# ------------------------------------------------------------------ parameter tree


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
  """'a/b/c' path -> shape of every leaf of the m3jax parameter tree (docs/architecture.md)."""
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
