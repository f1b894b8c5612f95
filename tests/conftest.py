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


@pytest.fixture(scope="session")
def tiny_knowledge_base(tiny_prepared, tmp_path_factory):
  """The tiny world's data root with a ScaNN index (exact), random parameters saved as a
  params directory and their memory bank (shards of 64): what inference opens. Read-only;
  tests that change the bank copy it."""
  import shutil
  import jax as jax_
  from m3jax.core.config import model_config
  from m3jax.memory import encode_job
  from m3jax.model import params_io
  from m3jax.model.transformer import init_params
  from m3jax.retrieval import reference_index
  from m3jax.retrieval.index import IndexSettings
  cfg, prepared_dir = tiny_prepared
  work = tmp_path_factory.mktemp("tiny_kb")
  shutil.copytree(os.path.join(prepared_dir, "data"), work / "data")
  cfg = cfg.copy_and_resolve_references()
  cfg.data.workdir_data = str(work / "data")
  cfg.bank.shard_size = 64
  cfg.bank.encode_batch_size = 16
  reference_index.build_reference_index(cfg, str(work), progress_every_s=None,
                                        settings=IndexSettings(force_brute_force=True))
  mc = model_config(cfg)
  params = init_params(mc, jax_.random.key(0))
  params_io.save_params(str(work / "params"), params, cfg)
  encode_job.run(cfg, checkpoint=str(work / "params"), checkpoint_config=cfg, params=params,
                 step=None, references=str(work / "data"), out=str(work / "bank"),
                 printer=lambda _: None, progress_every_s=1e9)
  return dict(cfg=cfg, mc=mc, params=params, work=work, root=str(work / "data"),
              checkpoint=str(work / "params"), bank=str(work / "bank"))
