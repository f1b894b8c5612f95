"""Hugging Face Llama import/export against transformers as the numerical reference."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

from m3jax.core import config as config_lib  # noqa: E402
from m3jax.model import hf_convert as convert  # noqa: E402
from m3jax.model import hf_weights  # noqa: E402
from m3jax.model import params_io  # noqa: E402

PREFIX = (1, 7)  # stands in for [bos] + ids of "Reference:" when no tokenizer is saved

# H=4 with 2 and 1 KV heads; untied / tied; head_dim 24 != 64 / 4 in the tied one.
HF_CONFIGS = {
    "gqa2_untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "mqa_tied_head24": dict(num_key_value_heads=1, tie_word_embeddings=True, head_dim=24),
}


def _hf_model(seed=0, **kw):
  args = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=128, rope_theta=500.0, rms_norm_eps=1e-5, max_position_embeddings=256,
              initializer_range=0.1)
  args.update(kw)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args)).float().eval()
  with torch.no_grad():  # norm scales of 1 would hide a swapped or missing norm
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  return model


def _save(model, path, **kw):
  model.save_pretrained(str(path), safe_serialization=True, **kw)
  return str(path)


def _tokens(vocab=128, shape=(2, 16), seed=0):
  return np.random.RandomState(seed).randint(0, vocab, shape)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _m3_logits(model, params, tokens):
  return np.asarray(model.apply({"params": params}, jnp.asarray(tokens, jnp.int32)))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_import_matches_transformers_logits(tmp_path, name):
  hf = _hf_model(**HF_CONFIGS[name])
  model, params = convert.from_hf(_save(hf, tmp_path / "hf"), reference_prefix_ids=PREFIX)
  tokens = _tokens()
  diff = np.abs(_m3_logits(model, params, tokens) - _hf_logits(hf, tokens)).max()
  assert diff <= 1e-4


@pytest.mark.slow
def test_imported_config_fields(tmp_path):
  hf = _hf_model(**HF_CONFIGS["mqa_tied_head24"])
  cfg, params = convert.load_hf(_save(hf, tmp_path / "hf"), reference_prefix_ids=PREFIX)
  m = config_lib.model_config(cfg)
  assert (m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim) == (64, 4, 1, 24, 96)
  assert (m.rope_theta, m.norm_eps, m.tie_embeddings) == (500.0, 1e-5, True)
  assert m.memory_layers == (0,) and m.memory_heads == (0,)  # first half, all KV heads
  assert m.reference_prefix_ids == PREFIX and m.bos_id == 1 and m.eos_id == 2
  assert "lm_head" not in params
  assert params["layers_0"]["attn"]["q"]["kernel"].shape == (64, 4, 24)
  assert params["layers_0"]["attn"]["o"]["kernel"].shape == (4, 24, 64)


def test_param_tree_matches_model_init(tmp_path):
  from m3jax.model.transformer import init_params
  for kw in HF_CONFIGS.values():
    cfg = convert.config_from_hf(_hf_model(**kw).config.to_dict(), reference_prefix_ids=PREFIX)
    m = config_lib.model_config(cfg)
    shapes = jax.eval_shape(lambda key: init_params(m, key), jax.random.key(0))
    flat = {"/".join(k.key for k in path): tuple(x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    assert flat == hf_weights.expected_param_shapes(m)


@pytest.mark.slow
def test_export_loads_in_transformers(tmp_path, tiny_config):
  from m3jax.model.transformer import Transformer
  m = config_lib.model_config(tiny_config)
  model = Transformer(m)
  tokens = _tokens(m.vocab_size)
  params = model.init(jax.random.key(1), jnp.asarray(tokens, jnp.int32))["params"]
  # Random norm scales, so that a misplaced norm changes the logits.
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x * (1 + 0.5 * jax.random.uniform(jax.random.key(len(str(p))), x.shape))
      if "norm" in str(p) else x, params)
  convert.to_hf(params, tiny_config, str(tmp_path / "hf"))
  hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).float().eval()
  assert hf.config.num_key_value_heads == m.n_kv_heads
  diff = np.abs(_hf_logits(hf, tokens) - _m3_logits(model, params, tokens)).max()
  assert diff <= 1e-4


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_hf_round_trip_tensors_identical(tmp_path, name):
  hf = _hf_model(**HF_CONFIGS[name])
  src = _save(hf, tmp_path / "hf")
  cfg, params = convert.load_hf(src, reference_prefix_ids=PREFIX)
  convert.to_hf(params, cfg, str(tmp_path / "back"))
  before = load_file(os.path.join(src, "model.safetensors"))
  after = load_file(str(tmp_path / "back" / "model.safetensors"))
  assert sorted(after) == sorted(before)
  for k in before:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  exported = json.loads((tmp_path / "back" / "config.json").read_text())
  original = json.loads((tmp_path / "hf" / "config.json").read_text())
  for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "vocab_size",
                "tie_word_embeddings"):
    assert exported[field] == original[field], field


def test_sharded_checkpoint_imports(tmp_path):
  hf = _hf_model(**HF_CONFIGS["gqa2_untied"])
  sharded = _save(hf, tmp_path / "sharded", max_shard_size="50KB")
  assert os.path.isfile(os.path.join(sharded, "model.safetensors.index.json"))
  assert not os.path.exists(os.path.join(sharded, "model.safetensors"))
  _, params = convert.load_hf(sharded, reference_prefix_ids=PREFIX)
  _, whole = convert.load_hf(_save(hf, tmp_path / "whole"), reference_prefix_ids=PREFIX)
  jax.tree.map(np.testing.assert_array_equal, params, whole)


def test_bfloat16_checkpoint_imports(tmp_path):
  hf = _hf_model(**HF_CONFIGS["gqa2_untied"])
  src = _save(hf.to(torch.bfloat16), tmp_path / "bf16")
  _, params = convert.load_hf(src, reference_prefix_ids=PREFIX)
  q = hf.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()
  assert params["layers_1"]["attn"]["q"]["kernel"].dtype == np.float32
  np.testing.assert_array_equal(params["layers_1"]["attn"]["q"]["kernel"],
                                q.T.reshape(64, 4, 16))


def test_reference_prefix_from_sentencepiece_tokenizer(tmp_path):
  import sentencepiece as spm
  text = tmp_path / "corpus.txt"
  text.write_text("\n".join(["Reference: the cat sat on the mat.", "A reference text.",
                             "Dogs and cats: friends or foes?"] * 50))
  spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=60, model_type="bpe", bos_id=1, eos_id=2,
                                 unk_id=0, pad_id=-1, minloglevel=2)
  src = _save(_hf_model(**HF_CONFIGS["gqa2_untied"]), tmp_path / "hf")
  os.replace(tmp_path / "sp.model", os.path.join(src, "tokenizer.model"))
  cfg = convert.config_from_hf(src)
  sp = spm.SentencePieceProcessor(model_file=os.path.join(src, "tokenizer.model"))
  expected = (1, *sp.encode("Reference:"))
  assert len(expected) > 1
  assert tuple(cfg.model.reference_prefix_ids) == expected


def test_missing_tokenizer_and_prefix_is_an_error(tmp_path):
  src = _save(_hf_model(**HF_CONFIGS["gqa2_untied"]), tmp_path / "hf")
  with pytest.raises(convert.ConversionError, match="reference_prefix_ids"):
    convert.load_hf(src)


def test_missing_config_json_names_it(tmp_path):
  src = _save(_hf_model(**HF_CONFIGS["gqa2_untied"]), tmp_path / "hf")
  os.remove(os.path.join(src, "config.json"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    convert.load_hf(src, reference_prefix_ids=PREFIX)


def test_missing_weights_name_the_file(tmp_path):
  src = _save(_hf_model(**HF_CONFIGS["gqa2_untied"]), tmp_path / "hf")
  os.remove(os.path.join(src, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    convert.load_hf(src, reference_prefix_ids=PREFIX)


def test_missing_shard_names_the_file(tmp_path):
  src = _save(_hf_model(**HF_CONFIGS["gqa2_untied"]), tmp_path / "hf", max_shard_size="50KB")
  index = json.loads(open(os.path.join(src, "model.safetensors.index.json")).read())
  shard = sorted(set(index["weight_map"].values()))[-1]
  os.remove(os.path.join(src, shard))
  with pytest.raises(FileNotFoundError, match=shard):
    convert.load_hf(src, reference_prefix_ids=PREFIX)


def _edit_config(src, **fields):
  path = os.path.join(src, "config.json")
  cfg = json.loads(open(path).read())
  cfg.update(fields)
  with open(path, "w") as f:
    json.dump(cfg, f)


@pytest.mark.parametrize("fields,match", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "rope_parameters.*llama3"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling.*linear"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(model_type="mistral"), "model_type"),
])
def test_unsupported_fields_are_refused(tmp_path, fields, match):
  src = _save(_hf_model(**HF_CONFIGS["gqa2_untied"]), tmp_path / "hf")
  _edit_config(src, **fields)
  with pytest.raises(convert.ConversionError, match=match):
    convert.load_hf(src, reference_prefix_ids=PREFIX)


def test_legacy_rope_theta_field(tmp_path):
  src = _save(_hf_model(**HF_CONFIGS["gqa2_untied"]), tmp_path / "hf")
  cfg = json.loads(open(os.path.join(src, "config.json")).read())
  cfg.pop("rope_parameters")
  cfg.update(rope_theta=1234.0, rope_scaling=None)
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump(cfg, f)
  m = config_lib.model_config(convert.load_hf(src, reference_prefix_ids=PREFIX)[0])
  assert m.rope_theta == 1234.0


def test_bias_tensor_is_refused(tmp_path):
  from safetensors.numpy import save_file
  src = _save(_hf_model(**HF_CONFIGS["gqa2_untied"]), tmp_path / "hf")
  path = os.path.join(src, "model.safetensors")
  tensors = load_file(path)
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
  save_file(tensors, path, metadata={"format": "pt"})
  with pytest.raises(convert.ConversionError, match="q_proj.bias"):
    convert.load_hf(src, reference_prefix_ids=PREFIX)


def test_export_refuses_to_overwrite(tmp_path):
  hf = _hf_model(**HF_CONFIGS["gqa2_untied"])
  cfg, params = convert.load_hf(_save(hf, tmp_path / "hf"), reference_prefix_ids=PREFIX)
  with pytest.raises(FileExistsError, match="config.json"):
    convert.to_hf(params, cfg, str(tmp_path / "hf"))


def _cli(repo_root, *args):
  return subprocess.run([sys.executable, "-m", "m3jax.commands.convert", *args], cwd=repo_root,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_convert_command_round_trip(tmp_path, repo_root):
  hf = _hf_model(**HF_CONFIGS["mqa_tied_head24"])
  src = _save(hf, tmp_path / "hf")
  out = _cli(repo_root, f"--from_hf={src}", f"--out={tmp_path / 'm3'}",
             "--reference_prefix_ids=1,7", "--override=model.memory_layers=[1]")
  assert out.returncode == 0, out.stderr
  cfg, params = params_io.load_params(str(tmp_path / "m3"))
  m = config_lib.model_config(cfg)
  assert m.memory_layers == (1,) and m.reference_prefix_ids == (1, 7)
  np.testing.assert_array_equal(params["embed"]["embedding"],
                                hf.model.embed_tokens.weight.detach().numpy())

  again = _cli(repo_root, f"--from_hf={src}", f"--out={tmp_path / 'm3'}",
               "--reference_prefix_ids=1,7")
  assert again.returncode != 0 and "refusing to overwrite" in again.stderr

  out = _cli(repo_root, "--to_hf", f"--checkpoint={tmp_path / 'm3'}", f"--out={tmp_path / 'back'}")
  assert out.returncode == 0, out.stderr
  before = load_file(os.path.join(src, "model.safetensors"))
  after = load_file(str(tmp_path / "back" / "model.safetensors"))
  assert sorted(after) == sorted(before)
  for k in before:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
