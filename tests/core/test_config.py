"""Config loading and validation: every inconsistency names its field."""

import pytest

from m3jax.core import config as config_lib
from m3jax.core.config import ConfigError


def _load(repo_root, name, *overrides):
  return config_lib.load_config(str(repo_root / "configs" / f"{name}.py"), list(overrides))


@pytest.mark.parametrize("name", ["tiny", "demo", "memory3_2p4b", "memory3_0p9b"])
def test_shipped_configs_validate(repo_root, name):
  mc = config_lib.model_config(_load(repo_root, name))
  assert mc.n_heads % mc.n_kv_heads == 0


def test_paper_model_shape(repo_root):
  mc = config_lib.model_config(_load(repo_root, "memory3_2p4b"))
  assert (mc.n_layers, mc.n_heads, mc.n_kv_heads, mc.head_dim, mc.d_model) == (44, 40, 8, 80, 3200)
  assert mc.memory_layers == tuple(range(22))
  assert mc.memory_shape == (22, 2, 8, 8, 80)


def test_default_memory_layers_are_first_half(repo_root):
  mc = config_lib.model_config(_load(repo_root, "tiny", "model.memory_layers=None",
                                     "model.n_layers=6"))
  assert mc.memory_layers == (0, 1, 2)
  assert mc.memory_heads == (0, 1)


def test_override_changes_field(repo_root):
  cfg = _load(repo_root, "tiny", "model.n_layers=6", "train.lr=1e-3")
  assert cfg.model.n_layers == 6 and cfg.train.lr == 1e-3


@pytest.mark.parametrize("override,field", [
    ("model.n_kv_heads=3", "model.n_heads"),
    ("model.memory_layers=[0, 9]", "model.memory_layers"),
    ("model.memory_heads=[2]", "model.memory_heads"),
    ("model.max_seq_len=70", "model.max_seq_len"),
    ("model.memory_tokens_per_head=100", "model.memory_tokens_per_head"),
    ("model.dtype='float8'", "model.dtype"),
    ("train.stage='pretrain'", "train.stage"),
    ("mesh.data=0", "mesh.data"),
])
def test_inconsistent_field_is_named(repo_root, override, field):
  with pytest.raises(ConfigError, match=f"`{field}`"):
    _load(repo_root, "tiny", override)


def test_unknown_field_is_named(repo_root):
  with pytest.raises(ConfigError, match="model.n_layerz"):
    _load(repo_root, "tiny", "model.n_layerz=3")


def test_missing_config_file():
  with pytest.raises(ConfigError, match="does-not-exist.py"):
    config_lib.load_config("does-not-exist.py")


def test_fingerprint_ignores_compute_dtype(repo_root):
  a = config_lib.model_config(_load(repo_root, "tiny"))
  b = config_lib.model_config(_load(repo_root, "tiny", "model.dtype='bfloat16'"))
  c = config_lib.model_config(_load(repo_root, "tiny", "model.head_dim=8"))
  assert a.fingerprint() == b.fingerprint() != c.fingerprint()
