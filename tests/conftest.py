"""Every test sees 8 fake CPU devices (set before JAX initialises a backend)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pathlib  # noqa: E402

import pytest  # noqa: E402

from support import REPO, TINY_WORLD  # noqa: E402


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
  return REPO


@pytest.fixture(scope="session")
def tiny_config():
  from m3jax.core.config import load_config
  return load_config(str(REPO / "configs" / "tiny.py"))




@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory):
  """A workdir whose data/ holds a prepared tiny knowledge world (tokenizer, refs, packed).

  Tests copy what they write into their own directories; this one is read-only.
  """
  from data_pipeline import prepare
  from m3jax.core.config import load_config
  cfg = load_config(str(REPO / "configs" / "tiny.py"), list(TINY_WORLD))
  workdir = tmp_path_factory.mktemp("tiny_prepared")
  prepare.prepare_data(cfg, str(workdir))
  return cfg, workdir
