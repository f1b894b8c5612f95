"""Run N JAX processes on this machine, as a multi-host job would (tests, debugging).

    python -m launch.local --num_processes 2 --devices_per_process 4 -- \\
        m3jax train --config=configs/tiny.py --workdir=/tmp/run

Each process gets M3JAX_COORDINATOR=127.0.0.1:<free port>, M3JAX_NUM_PROCESSES,
M3JAX_PROCESS_ID (read by `m3jax.core.distributed.initialize`) and, with the default
`--platform=cpu`, JAX_PLATFORMS=cpu and XLA_FLAGS faking `--devices_per_process` CPU
devices. Output lines are prefixed with `[p<i>]`. When a process fails, the others are
stopped (SIGTERM, then SIGKILL after `--grace_s`); SIGINT/SIGTERM to the launcher is
forwarded to all. Exit code: 0 if all succeeded, else the code of the first process
that failed (signals as 128+n), 124 on `--timeout_s`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  """A TCP port the OS reports free on 127.0.0.1 (reuse is racy but rare)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def resolve_command(command: Sequence[str]) -> list[str]:
  """`m3jax ...` works without the venv on PATH; `python` means this interpreter."""
  command = list(command)
  if not command:
    raise SystemExit("launch.local: no command given (put it after `--`)")
  if command[0] == "m3jax" and shutil.which("m3jax") is None:
    beside = os.path.join(os.path.dirname(sys.executable), "m3jax")
    command[:1] = [beside] if os.path.exists(beside) else [sys.executable, "-m", "m3jax.cli"]
  elif command[0] in ("python", "python3"):
    command[0] = sys.executable
  return command


def process_env(base: dict[str, str], *, coordinator: str, num_processes: int,
                process_id: int, devices_per_process: int, platform: str) -> dict[str, str]:
  env = dict(base)
  env.update(M3JAX_COORDINATOR=coordinator, M3JAX_NUM_PROCESSES=str(num_processes),
             M3JAX_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
  if platform:
    env["JAX_PLATFORMS"] = platform
  if platform == "cpu" and devices_per_process:
    flags = re.sub(rf"{DEVICE_COUNT_FLAG}=\S+", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(flags + [f"{DEVICE_COUNT_FLAG}={devices_per_process}"])
  return env


def _exit_code(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


def _pump(proc: subprocess.Popen, prefix: str, out, lock: threading.Lock) -> None:
  broken = False
  for raw in iter(proc.stdout.readline, b""):
    if broken:
      continue  # keep draining so the process never blocks on a full pipe
    line = raw.decode("utf-8", errors="replace").rstrip("\n")
    with lock:
      try:
        out.write(f"{prefix}{line}\n")
        out.flush()
      except (BrokenPipeError, ValueError):  # e.g. `| head` went away
        broken = True


def run(command: Sequence[str], num_processes: int, devices_per_process: int = 1, *,
        platform: str = "cpu", timeout_s: float | None = None, grace_s: float = 10.0,
        port: int | None = None, out=None) -> int:
  """Starts the processes, streams their output, returns the job's exit code."""
  if num_processes < 1:
    raise SystemExit(f"launch.local: --num_processes={num_processes} must be >= 1")
  out = out or sys.stdout
  command = resolve_command(command)
  coordinator = f"127.0.0.1:{port or free_port()}"
  lock = threading.Lock()
  procs: list[subprocess.Popen] = []
  pumps: list[threading.Thread] = []
  for i in range(num_processes):
    env = process_env(os.environ, coordinator=coordinator, num_processes=num_processes,
                      process_id=i, devices_per_process=devices_per_process,
                      platform=platform)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(proc)
    t = threading.Thread(target=_pump, args=(proc, f"[p{i}] ", out, lock), daemon=True)
    t.start()
    pumps.append(t)

  def stop_all(sig: int) -> None:
    for p in procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, sig)
        except ProcessLookupError:
          pass

  forwarded: list[int] = []

  def forward(signum, frame):
    del frame
    forwarded.append(signum)
    stop_all(signal.SIGTERM)

  previous = {}
  if threading.current_thread() is threading.main_thread():
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  start = time.monotonic()
  first_failure: int | None = None
  stop_deadline: float | None = None
  try:
    while any(p.poll() is None for p in procs):
      if first_failure is None:
        for p in procs:
          code = p.poll()
          if code not in (None, 0):
            first_failure = _exit_code(code)
            with lock:
              out.write(f"launch.local: process {procs.index(p)} exited with {first_failure}; "
                        "stopping the others\n")
            stop_all(signal.SIGTERM)
            stop_deadline = time.monotonic() + grace_s
            break
      if (timeout_s is not None and first_failure is None
          and time.monotonic() - start > timeout_s):
        with lock:
          out.write(f"launch.local: timed out after {timeout_s:g}s; stopping all\n")
        first_failure = 124
        stop_all(signal.SIGTERM)
        stop_deadline = time.monotonic() + grace_s
      if forwarded and stop_deadline is None:
        stop_deadline = time.monotonic() + grace_s
      if stop_deadline is not None and time.monotonic() > stop_deadline:
        stop_all(signal.SIGKILL)
      time.sleep(0.05)
  finally:
    stop_all(signal.SIGKILL)
    for p in procs:
      p.wait()
    for t in pumps:
      t.join(timeout=5)
    for s, h in previous.items():
      signal.signal(s, h)
  if first_failure is not None:
    return first_failure
  codes = [_exit_code(p.returncode) for p in procs]
  return max(codes, key=lambda c: (c != 0, c))


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" in argv:
    split = argv.index("--")
    argv, command = argv[:split], argv[split + 1:]
  else:
    command = []
  parser = argparse.ArgumentParser(
      prog="python -m launch.local",
      description="Run N local JAX processes as one multi-process job.",
      epilog="Everything after `--` is the command each process runs.")
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1,
                      help="fake CPU devices per process (with --platform=cpu)")
  parser.add_argument("--platform", default="cpu",
                      help="JAX_PLATFORMS for the processes ('' keeps the environment's)")
  parser.add_argument("--timeout_s", type=float, default=None,
                      help="stop everything after this many seconds (exit 124)")
  parser.add_argument("--grace_s", type=float, default=10.0,
                      help="seconds between SIGTERM and SIGKILL when stopping")
  parser.add_argument("--port", type=int, default=None,
                      help="coordinator port (default: one the OS reports free)")
  args = parser.parse_args(argv)
  if not command:
    parser.error("give the command to run after `--`")
  return run(command, args.num_processes, args.devices_per_process, platform=args.platform,
             timeout_s=args.timeout_s, grace_s=args.grace_s, port=args.port)


if __name__ == "__main__":
  sys.exit(main())
