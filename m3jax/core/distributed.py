"""Multi-process start-up: `jax.distributed.initialize` from args, env or the cluster.

Each setting comes from, in order: the argument (or flag), the environment
(`M3JAX_COORDINATOR=host:port`, `M3JAX_NUM_PROCESSES`, `M3JAX_PROCESS_ID`,
`M3JAX_LOCAL_DEVICE_IDS=0,1,..|all`), then JAX's cluster detection (Cloud TPU VMs and
GKE TPU slices, SLURM, Open MPI, Kubernetes with the `kubernetes` package). One
process in total is a no-op.

Before JAX connects, the processes meet at the coordinator address in a small TCP
rendezvous (process 0 listens on the coordinator port, which JAX's service binds
right after). JAX itself aborts the process with a bare DEADLINE_EXCEEDED when a peer
never arrives; the rendezvous instead raises `DistributedInitError` naming the
coordinator address and the missing process ids. `M3JAX_RENDEZVOUS=0` skips it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import time
from typing import Mapping, Sequence

import jax
from absl import flags

from m3jax.core import errors

ENV_COORDINATOR = "M3JAX_COORDINATOR"
ENV_NUM_PROCESSES = "M3JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "M3JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "M3JAX_LOCAL_DEVICE_IDS"
ENV_RENDEZVOUS = "M3JAX_RENDEZVOUS"


class DistributedInitError(errors.UserError, RuntimeError):
  """Processes could not form a job; the message says who is missing and where."""


@dataclasses.dataclass(frozen=True)
class ProcessSetup:
  """How this process joins the job (`num_processes == 1`: no distributed runtime)."""

  coordinator_address: str | None
  num_processes: int
  process_id: int
  local_device_ids: tuple[int, ...] | None  # None: all local devices (or JAX's default)
  source: str  # "args", "env", "cluster" (JAX detected one) or "single"
  all_local_devices: bool = False  # M3JAX_LOCAL_DEVICE_IDS=all

  @property
  def is_multiprocess(self) -> bool:
    return self.num_processes > 1


def _parse_int(value: str | int | None, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise DistributedInitError(f"{name}={value!r}: not an integer") from None


def _parse_device_ids(value: str | Sequence[int] | None, name: str
                      ) -> tuple[tuple[int, ...] | None, bool]:
  if value is None or value == "":
    return None, False
  if isinstance(value, str):
    if value.strip().lower() == "all":
      return None, True
    try:
      return tuple(int(v) for v in value.split(",") if v.strip()), False
    except ValueError:
      raise DistributedInitError(
          f"{name}={value!r}: expected comma-separated device ids or 'all'") from None
  return tuple(int(v) for v in value), False


def _detect_cluster(timeout_s: int) -> tuple[str | None, int | None, int | None,
                                             tuple[int, ...] | None, str | None]:
  """JAX's own cluster detection: (address, processes, process id, local ids, "cluster").

  JAX has no public API that returns the detected settings (only
  `jax.distributed.initialize()` uses them, too late for the rendezvous and the
  one-process check), so this calls the one private entry point behind it; without
  it (another JAX version) nothing is detected.
  """
  try:
    from jax._src.clusters import ClusterEnv  # private: no public detection API (see above)
  except ImportError:  # pragma: no cover - depends on the JAX version
    return None, None, None, None, None
  addr, n, pid, ids = ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, None, None, timeout_s)
  if (addr, n, pid, ids) == (None, None, None, None):
    return None, None, None, None, None
  return addr, n, pid, (tuple(ids) if ids is not None else None), "cluster"


def resolve_setup(coordinator_address: str | None = None, num_processes: int | None = None,
                  process_id: int | None = None,
                  local_device_ids: str | Sequence[int] | None = None, *,
                  environ: Mapping[str, str] | None = None, detect: bool = True,
                  timeout_s: int = 300) -> ProcessSetup:
  """Merges args > M3JAX_* environment > cluster detection into a `ProcessSetup`."""
  env = os.environ if environ is None else environ
  source = "args" if any(v is not None for v in (coordinator_address, num_processes,
                                                 process_id)) else None
  if coordinator_address is None and env.get(ENV_COORDINATOR):
    coordinator_address = env[ENV_COORDINATOR]
    source = source or "env"
  if num_processes is None and env.get(ENV_NUM_PROCESSES):
    num_processes = _parse_int(env[ENV_NUM_PROCESSES], ENV_NUM_PROCESSES)
    source = source or "env"
  if process_id is None and env.get(ENV_PROCESS_ID):
    process_id = _parse_int(env[ENV_PROCESS_ID], ENV_PROCESS_ID)
    source = source or "env"
  if local_device_ids is None:
    local_device_ids = env.get(ENV_LOCAL_DEVICE_IDS) or None
  ids, all_local = _parse_device_ids(local_device_ids, "local_device_ids")

  if detect and None in (coordinator_address, num_processes, process_id):
    d_addr, d_n, d_pid, d_ids, name = _detect_cluster(timeout_s)
    if name is not None:
      coordinator_address = coordinator_address or d_addr
      num_processes = num_processes if num_processes is not None else d_n
      process_id = process_id if process_id is not None else d_pid
      if ids is None and not all_local:
        ids = d_ids
      source = source or name

  if num_processes is None or num_processes == 1:
    if num_processes is None and (coordinator_address or process_id not in (None, 0)):
      raise DistributedInitError(
          f"the number of processes is not set ({ENV_NUM_PROCESSES} or --num_processes) "
          f"but a coordinator ({coordinator_address}) or process id ({process_id}) is")
    return ProcessSetup(None, 1, 0, ids, "single", all_local)
  missing = [name for name, v in ((f"{ENV_COORDINATOR} / --coordinator_address",
                                   coordinator_address),
                                  (f"{ENV_PROCESS_ID} / --process_id", process_id)) if v is None]
  if missing:
    raise DistributedInitError(
        f"{num_processes} processes requested but {' and '.join(missing)} not set "
        "(and no cluster was detected to provide them)")
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise DistributedInitError(
        f"process_id={process_id} is not in [0, {num_processes}) "
        f"(num_processes={num_processes})")
  if ":" not in coordinator_address:
    raise DistributedInitError(
        f"coordinator address {coordinator_address!r} must be host:port")
  return ProcessSetup(coordinator_address, num_processes, process_id, ids, source,
                      all_local)


# ------------------------------------------------------------------ rendezvous


def _split_address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  host = host.strip("[]")
  try:
    return host, int(port)
  except ValueError:
    raise DistributedInitError(f"coordinator address {address!r}: bad port") from None


def _send(conn: socket.socket, message: dict) -> None:
  try:
    conn.sendall((json.dumps(message) + "\n").encode())
  except OSError:
    pass


def _recv_line(conn: socket.socket, deadline: float) -> dict | None:
  buf = b""
  while b"\n" not in buf:
    conn.settimeout(max(0.05, deadline - time.monotonic()))
    try:
      chunk = conn.recv(4096)
    except (socket.timeout, OSError):
      return None
    if not chunk:
      return None
    buf += chunk
  try:
    return json.loads(buf.split(b"\n", 1)[0])
  except json.JSONDecodeError:
    return None


def _listen(port: int) -> socket.socket:
  if socket.has_dualstack_ipv6():
    return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True,
                                reuse_port=False)
  return socket.create_server(("", port))


def _coordinator_rendezvous(setup: ProcessSetup, timeout_s: float) -> None:
  """Process 0: waits for every peer's hello, then releases them all at once."""
  _, port = _split_address(setup.coordinator_address)
  n = setup.num_processes
  deadline = time.monotonic() + timeout_s
  try:
    server = _listen(port)
  except OSError as e:
    raise DistributedInitError(
        f"process 0 cannot listen on the coordinator port {port} of "
        f"{setup.coordinator_address}: {e}") from e
  peers: dict[int, socket.socket] = {}
  try:
    while len(peers) < n - 1:
      server.settimeout(max(0.05, deadline - time.monotonic()))
      try:
        conn, _ = server.accept()
      except socket.timeout:
        if time.monotonic() >= deadline:
          break
        continue
      hello = _recv_line(conn, min(deadline, time.monotonic() + 10))
      if hello is None:
        conn.close()
        continue
      pid, their_n = hello.get("process_id"), hello.get("num_processes")
      problem = None
      if their_n != n:
        problem = (f"process {pid} was started with num_processes={their_n}, "
                   f"process 0 with {n}")
      elif not isinstance(pid, int) or not 0 < pid < n:
        problem = f"a peer announced process_id={pid!r}, outside [1, {n})"
      elif pid in peers:
        problem = f"two processes were started with process_id={pid}"
      if problem:
        message = f"coordinator {setup.coordinator_address}: {problem}"
        for c in [conn, *peers.values()]:
          _send(c, {"ok": False, "error": message})
          c.close()
        raise DistributedInitError(message)
      peers[pid] = conn
    if len(peers) < n - 1:
      missing = sorted(set(range(1, n)) - set(peers))
      message = (
          f"coordinator {setup.coordinator_address}: {len(missing)} of {n} processes did "
          f"not connect within {timeout_s:g}s (missing process ids: "
          f"{_short_list(missing)}; arrived: 0{''.join(f', {p}' for p in sorted(peers))}). "
          f"Start all {n} processes with the same {ENV_COORDINATOR} and "
          f"{ENV_NUM_PROCESSES}, check that the port is reachable, or raise the timeout "
          "(--distributed_timeout_s).")
      for c in peers.values():
        _send(c, {"ok": False, "error": message})
      raise DistributedInitError(message)
    for c in peers.values():
      _send(c, {"ok": True})
    # Let each peer close first, so the port is free of our sockets for JAX's service.
    for c in peers.values():
      _recv_line(c, time.monotonic() + 5)
  finally:
    for c in peers.values():
      c.close()
    server.close()


def _short_list(ids: list[int]) -> str:
  return str(ids) if len(ids) <= 16 else f"{ids[:16]} ... ({len(ids)} in all)"


def _peer_rendezvous(setup: ProcessSetup, timeout_s: float) -> None:
  """Processes 1..n-1: say hello to process 0 and wait until everyone is there."""
  host, port = _split_address(setup.coordinator_address)
  deadline = time.monotonic() + timeout_s
  last_error: Exception | None = None
  while time.monotonic() < deadline:
    try:
      conn = socket.create_connection((host, port), timeout=min(5.0, timeout_s))
    except OSError as e:
      last_error = e
      time.sleep(0.25)
      continue
    with conn:
      _send(conn, {"process_id": setup.process_id, "num_processes": setup.num_processes})
      reply = _recv_line(conn, deadline + 5)
    if reply is None:
      # Connected to something that closed on us (a previous job's service
      # shutting down, or process 0 restarting): retry until the deadline.
      last_error = ConnectionError("connection closed without an answer")
      time.sleep(0.25)
      continue
    if not reply.get("ok"):
      raise DistributedInitError(
          f"process {setup.process_id}: {reply.get('error', 'rendezvous refused')}")
    return
  raise DistributedInitError(
      f"process {setup.process_id} of {setup.num_processes}: no coordinator answered at "
      f"{setup.coordinator_address} within {timeout_s:g}s ({last_error}). Is process 0 "
      "running, and is that address reachable from this host?")


# ------------------------------------------------------------------ initialize


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: str | Sequence[int] | None = None,
               timeout_s: int = 300) -> ProcessSetup:
  """Joins the multi-process job (no-op for one process); call before any JAX work.

  Raises `DistributedInitError` when the peers do not all arrive within
  `timeout_s` (the message names the coordinator and the missing process ids).
  """
  if jax.distributed.is_initialized():
    return ProcessSetup(None, jax.process_count(), jax.process_index(), None, "existing")
  setup = resolve_setup(coordinator_address, num_processes, process_id, local_device_ids,
                        timeout_s=timeout_s)
  if not setup.is_multiprocess:
    return setup
  try:
    # Private: JAX has no public "backends already initialised" query. JAX's own
    # initialize() raises on this too, but only after the rendezvous has made every
    # peer wait; checking first fails this process alone, at once.
    from jax._src.xla_bridge import backends_are_initialized  # private: see above
    too_late = backends_are_initialized()
  except (ImportError, AttributeError):  # pragma: no cover - JAX checks this too
    too_late = False
  if too_late:
    raise DistributedInitError(
        "m3jax.core.distributed.initialize() must run before any JAX computation or "
        "jax.devices() call in this process")
  print(f"m3jax.core.distributed: process {setup.process_id}/{setup.num_processes} joining "
        f"coordinator {setup.coordinator_address} ({setup.source}; timeout {timeout_s}s)",
        file=sys.stderr, flush=True)
  if os.environ.get(ENV_RENDEZVOUS, "1") != "0":
    if setup.process_id == 0:
      _coordinator_rendezvous(setup, timeout_s)
    else:
      _peer_rendezvous(setup, timeout_s)
  kwargs = dict(coordinator_address=setup.coordinator_address,
                num_processes=setup.num_processes, process_id=setup.process_id,
                initialization_timeout=int(timeout_s))
  if setup.local_device_ids is not None:
    kwargs["local_device_ids"] = list(setup.local_device_ids)
  else:
    # Everything is resolved: stop JAX from re-detecting SLURM/MPI and narrowing
    # each process to one GPU (we may run one process per node owning all GPUs).
    kwargs["cluster_detection_method"] = "deactivate"
  jax.distributed.initialize(**kwargs)
  logging.info("m3jax.core.distributed: process %d/%d up, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return setup


# ------------------------------------------------------------------ absl flags


def define_distributed_flags(flag_values=None) -> None:
  """Defines --coordinator_address, --num_processes, --process_id, --local_device_ids and
  --distributed_timeout_s (idempotent; call at import time of a command module)."""
  fv = flags.FLAGS if flag_values is None else flag_values
  if "distributed_timeout_s" in fv:
    return
  flags.DEFINE_string("coordinator_address", None,
                      f"host:port of process 0 (default: ${ENV_COORDINATOR} or detected)",
                      flag_values=fv)
  flags.DEFINE_integer("num_processes", None,
                       f"processes in the job (default: ${ENV_NUM_PROCESSES} or detected)",
                       flag_values=fv)
  flags.DEFINE_integer("process_id", None,
                       f"this process' index (default: ${ENV_PROCESS_ID} or detected)",
                       flag_values=fv)
  flags.DEFINE_string("local_device_ids", None,
                      "comma-separated local device ids this process owns, or 'all' "
                      f"(default: ${ENV_LOCAL_DEVICE_IDS} or JAX's choice)", flag_values=fv)
  flags.DEFINE_integer("distributed_timeout_s", 300,
                       "seconds to wait for every process to join", flag_values=fv)


def initialize_from_flags(flag_values=None) -> ProcessSetup:
  """`initialize()` with the values of `define_distributed_flags()`'s flags."""
  f = flags.FLAGS if flag_values is None else flag_values
  return initialize(f.coordinator_address, f.num_processes, f.process_id,
                    f.local_device_ids, timeout_s=f.distributed_timeout_s)
