"""Checkpointer: sharded round trips, keep-N, latest step, async safety, preemption, and
reading its steps for inference (m3jax.model.params_io)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from m3jax.core import config as config_lib
from m3jax.core import workspace
from m3jax.model import params_io
from m3jax.training import checkpoint as ck
from m3jax.training.preemption import PreemptionGuard


def _state(mesh_2x4, mesh_8, seed=0):
  """A train-state-like pytree: params + optimizer moments + step, sharded two ways."""
  rng = np.random.default_rng(seed)
  embed = rng.normal(size=(16, 8)).astype(np.float32)
  kernel = rng.normal(size=(8, 12)).astype(np.float32)
  params = {
      "embed": {"embedding": jax.device_put(embed, NamedSharding(mesh_2x4, P("fsdp", None)))},
      "mlp": {"kernel": jax.device_put(kernel, NamedSharding(mesh_2x4, P("data", "fsdp")))},
  }
  mu = jax.tree.map(lambda x: x * 0.5, params)
  return {
      "params": params,
      "opt_state": {"mu": mu, "count": jnp.asarray(7, jnp.int32)},
      "step": jnp.asarray(3, jnp.int32),
      "row": jax.device_put(np.arange(8, dtype=np.float32), NamedSharding(mesh_8, P("data"))),
  }


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def _assert_tree_equal(a, b):
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def meshes():
  devices = np.array(jax.devices()[:8])
  return (jax.sharding.Mesh(devices.reshape(2, 4), ("data", "fsdp")),
          jax.sharding.Mesh(devices, ("data",)))


def test_round_trip_restores_values_shardings_data_and_meta(tmp_path, meshes):
  mesh_2x4, mesh_8 = meshes
  state = _state(mesh_2x4, mesh_8)
  data_state = json.dumps({"last_seen_indices": {"0": 41}, "worker_count": 0}).encode()
  with ck.Checkpointer(str(tmp_path / "ckpt")) as c:
    assert c.save(5, state, data_state, meta={"loss": np.float32(2.5), "tokens": 1024})
    c.wait_until_finished()
    restored, data, meta = c.restore(5, _abstract(state))
  _assert_tree_equal(restored, state)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    assert got.sharding == want.sharding
  assert data == data_state
  assert meta["loss"] == 2.5 and meta["tokens"] == 1024 and meta["step"] == 5
  assert meta["process_count"] == 1


def test_restore_reshards_into_a_different_mesh(tmp_path, meshes):
  mesh_2x4, mesh_8 = meshes
  state = _state(mesh_2x4, mesh_8)
  with ck.Checkpointer(str(tmp_path)) as c:
    c.save(1, state)
    c.wait_until_finished()
    # Every array replicated over the flat mesh instead of its saved layout.
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh_8, P())),
        state)
    restored, data, _ = c.restore(1, target)
  _assert_tree_equal(restored, state)
  assert restored["params"]["mlp"]["kernel"].sharding == NamedSharding(mesh_8, P())
  assert data is None  # nothing was saved for the data iterator


def test_keep_n_keeps_only_the_newest_n(tmp_path, meshes):
  state = _state(*meshes)
  with ck.Checkpointer(str(tmp_path), keep=2) as c:
    for step in (10, 20, 30, 40):
      c.save(step, state)
    c.wait_until_finished()
    assert c.all_steps() == [30, 40]
  assert sorted(os.listdir(tmp_path)) == ["30", "40"]


def test_a_read_only_checkpointer_opens_without_orbax_read_only_warning(tmp_path, caplog):
  import logging
  (tmp_path / "1").mkdir()
  absl = logging.getLogger("absl")
  filters = list(absl.filters)
  with caplog.at_level(logging.WARNING):
    ck.Checkpointer(str(tmp_path), read_only=True)
    absl.warning("another warning is still shown")
  messages = [r.getMessage() for r in caplog.records]
  assert "another warning is still shown" in messages
  assert not [m for m in messages if "read only" in m] and absl.filters == filters


def test_latest_step_is_found_by_a_new_checkpointer(tmp_path, meshes):
  mesh_2x4, mesh_8 = meshes
  with ck.Checkpointer(str(tmp_path), keep=None) as c:
    assert c.latest_step() is None
    for step, seed in ((2, 0), (11, 1), (7, 2)):  # saved out of order on purpose
      c.save(step, _state(mesh_2x4, mesh_8, seed))
  reopened = ck.Checkpointer(str(tmp_path), read_only=True)
  assert reopened.latest_step() == 11
  state, _, meta = reopened.restore(None, _abstract(_state(mesh_2x4, mesh_8)))
  assert meta["step"] == 11
  _assert_tree_equal(state, _state(mesh_2x4, mesh_8, seed=1))


def test_async_save_survives_deleted_source_buffers(tmp_path, meshes):
  # A training loop donates the state to the next step right after save() returns.
  state = _state(*meshes)
  expected = jax.tree.map(np.asarray, state)
  abstract = _abstract(state)
  with ck.Checkpointer(str(tmp_path), async_save=True) as c:
    c.save(1, state, b'{"i": 1}')
    for leaf in jax.tree.leaves(state):
      leaf.delete()
    c.wait_until_finished()
    restored, data, _ = c.restore(1, abstract)
  _assert_tree_equal(restored, expected)
  assert data == b'{"i": 1}'


def test_half_written_step_is_not_latest_and_is_cleaned_up(tmp_path, meshes):
  state = _state(*meshes)
  with ck.Checkpointer(str(tmp_path)) as c:
    c.save(2, state)
  # What a job killed in the middle of saving step 9 leaves behind.
  shutil.copytree(tmp_path / "2", tmp_path / "9.orbax-checkpoint-tmp-1700000000")
  assert ck.Checkpointer(str(tmp_path), read_only=True).latest_step() == 2
  assert (tmp_path / "9.orbax-checkpoint-tmp-1700000000").exists()  # readers never delete
  with ck.Checkpointer(str(tmp_path)) as restarted:  # a restarted trainer does
    assert restarted.latest_step() == 2
    restarted.save(3, state)
  assert sorted(os.listdir(tmp_path)) == ["2", "3"]


def test_data_state_kinds_round_trip(tmp_path, meshes):
  state = {"w": jnp.ones((2,))}
  with ck.Checkpointer(str(tmp_path), keep=None) as c:
    c.save(1, state, {"epoch": 3, "offsets": [1, 2]})
    c.save(2, state, b"\x00\xffraw")
    c.wait_until_finished()
    assert c.restore(1).data_state == {"epoch": 3, "offsets": [1, 2]}
    assert c.restore(2).data_state == b"\x00\xffraw"
    assert c.restore(2, restore_data=False).data_state is None


def test_saving_an_existing_step_is_a_no_op(tmp_path):
  # E.g. a preemption save at the step of a periodic save still being written.
  with ck.Checkpointer(str(tmp_path)) as c:
    assert c.save(4, {"w": jnp.zeros(2)}, meta={"tag": "first"})
    assert not c.save(4, {"w": jnp.ones(2)}, meta={"tag": "second"})
  with ck.Checkpointer(str(tmp_path)) as c:
    assert not c.save(4, {"w": jnp.ones(2)}, meta={"tag": "third"})
    _, _, meta = c.restore(4)
  assert meta["tag"] == "first"


def test_data_state_from_another_process_layout_is_a_clear_error(tmp_path):
  with ck.Checkpointer(str(tmp_path)) as c:
    c.save(1, {"w": jnp.zeros(2)}, {"pos": 5})
  data_dir = tmp_path / "1" / "data"
  os.rename(data_dir / "process_0-of-1.json", data_dir / "process_0-of-2.json")
  c = ck.Checkpointer(str(tmp_path), read_only=True)
  with pytest.raises(FileNotFoundError, match="restore_data=False"):
    c.restore(1)
  assert c.restore(1, restore_data=False).data_state is None


def test_bad_keep_and_meta_are_named(tmp_path):
  with pytest.raises(ValueError, match="keep_checkpoints"):
    ck.Checkpointer(str(tmp_path), keep=0)
  with ck.Checkpointer(str(tmp_path)) as c:
    with pytest.raises(TypeError, match="meta.bad"):
      c.save(1, {"w": jnp.zeros(2)}, meta={"bad": object()})


_GUARD_SCRIPT = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from m3jax.training import checkpoint as ck
    from m3jax.training.preemption import PreemptionGuard

    workdir = sys.argv[1]
    state = {"w": jnp.zeros((4,))}
    with PreemptionGuard() as guard, ck.Checkpointer.for_workdir(workdir) as c:
      step = 0
      while True:
        step += 1
        state = {"w": state["w"] + 1}
        if step == 3:
          print("READY", flush=True)
        if guard.should_stop(step):
          c.save(step, state, {"step": step}, meta={"reason": guard.signal_name})
          print("SAVED", step, flush=True)
          break
        time.sleep(0.02)
    sys.exit(0)
""")


def test_sigterm_saves_a_checkpoint_and_exits_zero(tmp_path):
  script = tmp_path / "loop.py"
  script.write_text(_GUARD_SCRIPT)
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, str(script), str(workdir)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "READY"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 0, err
  saved_step = int(out.split("SAVED")[1].split()[0])
  c = ck.Checkpointer(workspace.checkpoint_dir(str(workdir)), read_only=True)
  assert c.latest_step() == saved_step
  state, data, meta = c.restore()
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4,), saved_step, np.float32))
  assert data == {"step": saved_step} and meta["reason"] == "SIGTERM"


def test_guard_single_process_flag_and_restore_handlers():
  before = signal.getsignal(signal.SIGTERM)
  with PreemptionGuard() as guard:
    assert not guard.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.requested and guard.should_stop(2) and guard.stop_step == 2
  assert signal.getsignal(signal.SIGTERM) is before


def test_export_params_and_load_for_inference_from_every_kind_of_path(tmp_path, meshes,
                                                                      tiny_config):
  mesh_2x4, mesh_8 = meshes
  workdir = tmp_path / "run"
  config_lib.save_config(tiny_config, str(workdir / "config.json"))
  with ck.Checkpointer.for_workdir(str(workdir), tiny_config) as c:
    c.save(3, _state(mesh_2x4, mesh_8, seed=0))
    c.save(8, _state(mesh_2x4, mesh_8, seed=1))
  want = {8: _state(mesh_2x4, mesh_8, seed=1)["params"],
          3: _state(mesh_2x4, mesh_8, seed=0)["params"]}

  # A half-written step (a save killed mid-way) is not a finished step.
  os.makedirs(workdir / "checkpoints" / "9.orbax-checkpoint-tmp-1" / "state")
  assert params_io.latest_step(str(workdir / "checkpoints")) == 8

  out = params_io.export_params(str(workdir), None, str(tmp_path / "exported"))
  assert sorted(os.listdir(out)) == ["config.json", "export.json", "params"]

  for path, step in ((workdir, 8), (workdir / "checkpoints", 8),
                     (workdir / "checkpoints" / "3", 3), (tmp_path / "exported", 8)):
    cfg, params, got_step = params_io.load_for_inference(str(path))
    assert got_step == step, path
    assert cfg.model.d_model == tiny_config.model.d_model
    _assert_tree_equal(params, want[step])

  shardings = jax.tree.map(lambda x: x.sharding, want[8])
  _, params, _ = params_io.load_for_inference(str(workdir), shardings)
  assert params["mlp"]["kernel"].sharding == shardings["mlp"]["kernel"]

  with pytest.raises(FileNotFoundError, match="neither a params directory"):
    os.makedirs(tmp_path / "empty")
    params_io.load_for_inference(str(tmp_path / "empty"))
