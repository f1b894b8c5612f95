"""Multi-process start-up, the local launcher, and checkpoints/preemption across processes."""

import os
import subprocess
import sys
import textwrap

import pytest
from absl import flags

from launch import local
from m3jax.training import checkpoint as ck
from m3jax.core import distributed
from m3jax.core import workspace

pytestmark = pytest.mark.multiprocess

# Run by 2 processes x 2 fake CPU devices. Each prints what the test checks.
_JOB = textwrap.dedent("""
    import os, signal, sys, time
    from m3jax.core import distributed
    setup = distributed.initialize(timeout_s=60)

    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from m3jax.training import checkpoint as ck
    from m3jax.training.preemption import PreemptionGuard
    from m3jax.core import metrics

    pid = jax.process_index()
    gathered = multihost_utils.process_allgather(np.int32(10 * pid + 1))
    mesh = jax.make_mesh((2, 2), ("data", "fsdp"))  # "data" spans the two processes
    local = np.full((jax.local_device_count(),), pid + 1.0, np.float32)
    x = multihost_utils.host_local_array_to_global_array(local, jax.make_mesh((4,), ("d",)),
                                                         P("d"))
    acc = metrics.MetricAccumulator()
    acc.add({"sum": jax.jit(jnp.sum, out_shardings=NamedSharding(x.sharding.mesh, P()))(x)})
    print("RESULT", pid, jax.device_count(), sorted(gathered.tolist()), acc.fetch()["sum"],
          flush=True)

    workdir = sys.argv[1]
    w = jax.device_put(np.arange(32, dtype=np.float32).reshape(4, 8),
                       NamedSharding(mesh, P("data", "fsdp")))
    replicated = NamedSharding(mesh, P())
    state = {"params": {"w": w}, "step": jax.device_put(np.int32(0), replicated)}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            state)
    with ck.Checkpointer.for_workdir(workdir, keep=None) as c:
      c.save(1, state, {"host": pid})
      c.wait_until_finished()
      restored, data, _ = c.restore(1, abstract)
      same = all(np.array_equal(np.asarray(a.data), np.asarray(b.data))
                 for a, b in zip(restored["params"]["w"].addressable_shards,
                                 w.addressable_shards))
      print("RESTORED", pid, same, data, flush=True)

      # A programmatic request on one process stops both at the next sync step.
      with PreemptionGuard(sync_every=5) as guard:
        for step in range(2, 10):
          if pid == 0 and step == 2:
            guard.request("max wall time")
          if guard.should_stop(step):
            print("REQUESTED", pid, step, flush=True)
            break

      with PreemptionGuard() as guard:
        for step in range(10, 600):
          state = {"params": {"w": state["params"]["w"] + 1},
                   "step": jax.device_put(np.int32(step), replicated)}
          if pid == 1 and step == 12:
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler preempts one host
          if guard.should_stop(step):
            c.save(step, state, {"host": pid, "step": step})
            print("STOPPED", pid, step, flush=True)
            sys.exit(0)
          time.sleep(0.02)
    print("NEVER STOPPED", pid, flush=True)
    sys.exit(1)
""")


def _run_launcher(args, timeout=180):
  return subprocess.run([sys.executable, "-m", "launch.local", *args], capture_output=True,
                        text=True, timeout=timeout, cwd=local.__file__.rsplit("/launch/", 1)[0])


@pytest.mark.multiprocess
def test_two_processes_collectives_checkpoint_and_preemption(tmp_path):
  script = tmp_path / "job.py"
  script.write_text(_JOB)
  workdir = tmp_path / "run"
  proc = _run_launcher(["--num_processes", "2", "--devices_per_process", "2",
                        "--timeout_s", "150", "--", "python", str(script), str(workdir)])
  out = proc.stdout
  assert proc.returncode == 0, out[-4000:]
  for pid in (0, 1):
    # 2 processes x 2 devices; allgather of 10*pid+1; sum of (pid+1) over all 4 devices.
    assert f"[p{pid}] RESULT {pid} 4 [1, 11] 6.0" in out, out[-4000:]
    assert f"[p{pid}] RESTORED {pid} True {{'host': {pid}}}" in out, out[-4000:]
    assert f"[p{pid}] REQUESTED {pid} 5" in out, out[-4000:]
  stops = {line.split()[2]: int(line.split()[3]) for line in out.splitlines()
           if line.split()[1:2] == ["STOPPED"]}
  assert set(stops) == {"0", "1"} and stops["0"] == stops["1"] >= 12, out[-4000:]
  step = stops["0"]
  c = ck.Checkpointer(workspace.checkpoint_dir(str(workdir)), read_only=True)
  assert c.all_steps() == [1, step]
  assert sorted(os.listdir(workdir / "checkpoints" / str(step) / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
def test_peer_that_never_arrives_gives_a_clear_error(tmp_path):
  script = "from m3jax.core import distributed; distributed.initialize(timeout_s=5)"
  coordinator_port = peer_port = local.free_port()
  while peer_port == coordinator_port:  # the two lone processes must not meet
    peer_port = local.free_port()
  base = {k: v for k, v in os.environ.items() if not k.startswith("M3JAX_")}
  alone_coordinator = subprocess.Popen(
      [sys.executable, "-c", script], stderr=subprocess.PIPE, text=True,
      env={**base, "M3JAX_COORDINATOR": f"127.0.0.1:{coordinator_port}",
           "M3JAX_NUM_PROCESSES": "3", "M3JAX_PROCESS_ID": "0"})
  alone_peer = subprocess.Popen(
      [sys.executable, "-c", script], stderr=subprocess.PIPE, text=True,
      env={**base, "M3JAX_COORDINATOR": f"127.0.0.1:{peer_port}",
           "M3JAX_NUM_PROCESSES": "2", "M3JAX_PROCESS_ID": "1"})
  err_coordinator = alone_coordinator.communicate(timeout=60)[1]
  err_peer = alone_peer.communicate(timeout=60)[1]
  assert alone_coordinator.returncode != 0 and alone_peer.returncode != 0
  assert (f"DistributedInitError: coordinator 127.0.0.1:{coordinator_port}: 2 of 3 processes "
          "did not connect within 5s (missing process ids: [1, 2]") in err_coordinator
  assert (f"DistributedInitError: process 1 of 2: no coordinator answered at "
          f"127.0.0.1:{peer_port} within 5s") in err_peer


def test_launcher_stops_the_others_and_returns_the_failing_code():
  script = ("import os, sys, time\n"
            "pid = int(os.environ['M3JAX_PROCESS_ID'])\n"
            "print('hello from', pid, os.environ['XLA_FLAGS'], flush=True)\n"
            "sys.exit(3) if pid == 1 else time.sleep(120)\n")
  proc = _run_launcher(["--num_processes", "3", "--devices_per_process", "4", "--grace_s", "5",
                        "--", "python", "-c", script], timeout=60)
  assert proc.returncode == 3, proc.stdout
  assert "[p1] hello from 1 --xla_force_host_platform_device_count=4" in proc.stdout
  assert "process 1 exited with 3" in proc.stdout


def test_resolve_setup_takes_args_over_env_and_validates():
  env = {"M3JAX_COORDINATOR": "10.0.0.1:1234", "M3JAX_NUM_PROCESSES": "4",
         "M3JAX_PROCESS_ID": "2", "M3JAX_LOCAL_DEVICE_IDS": "0,1"}
  s = distributed.resolve_setup(environ=env, detect=False)
  assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids,
          s.source) == ("10.0.0.1:1234", 4, 2, (0, 1), "env")
  s = distributed.resolve_setup(process_id=3, local_device_ids="all", environ=env,
                                detect=False)
  assert (s.process_id, s.local_device_ids, s.all_local_devices, s.source) == (
      3, None, True, "args")
  assert not distributed.resolve_setup(environ={}, detect=False).is_multiprocess
  with pytest.raises(distributed.DistributedInitError, match="M3JAX_COORDINATOR"):
    distributed.resolve_setup(environ={"M3JAX_NUM_PROCESSES": "2", "M3JAX_PROCESS_ID": "0"},
                              detect=False)
  with pytest.raises(distributed.DistributedInitError, match="M3JAX_NUM_PROCESSES='two'"):
    distributed.resolve_setup(environ={"M3JAX_NUM_PROCESSES": "two"}, detect=False)
  with pytest.raises(distributed.DistributedInitError, match=r"process_id=4 is not in \[0, 4\)"):
    distributed.resolve_setup(process_id=4, environ=env, detect=False)


def test_flags_define_once_and_single_process_is_a_no_op():
  fv = flags.FlagValues()
  distributed.define_distributed_flags(fv)
  distributed.define_distributed_flags(fv)  # idempotent
  fv(["prog", "--num_processes=1", "--distributed_timeout_s=7"])
  assert fv.distributed_timeout_s == 7
  setup = distributed.initialize_from_flags(fv)
  assert not setup.is_multiprocess and setup.source == "single"
