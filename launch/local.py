#!/usr/bin/env python3
"""Run one program as N processes on this machine, over loopback (the multi-host path).

    python launch/local.py --processes 2 --devices-per-process 2 -- vist2 train RECIPE ...

Each process gets VIST2_COORDINATOR / VIST2_NUM_PROCESSES / VIST2_PROCESS_ID (read by
``vist2_jax.training.distributed.initialize_from_env``) and, on CPU, its own forced
device count. ``--dry-run`` prints the commands.

When a process fails (a non-zero exit, or killed by a signal) it is named at once; the
others exit by themselves within the heartbeat timeout (``VIST2_HEARTBEAT_S``, default 60 s,
see ``vist2_jax/training/distributed.py``) and are stopped if they are still running
``--grace`` seconds after that. Exits with the first failure's code (128 + N for signal N).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=1, help="CPU devices forced per process")
    parser.add_argument("--port", type=int, default=0, help="coordinator port (0: pick a free one)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds past the heartbeat timeout before surviving processes are stopped")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the program and its arguments")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the program to run after --")
    port = args.port or free_port()
    envs = []
    for rank in range(args.processes):
        env = {"VIST2_COORDINATOR": f"127.0.0.1:{port}", "VIST2_NUM_PROCESSES": str(args.processes),
               "VIST2_PROCESS_ID": str(rank), "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices_per_process}"}
        envs.append(env)
        if args.dry_run:
            print(" ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()), shlex.join(command))
    if args.dry_run:
        return 0
    procs = [subprocess.Popen(command, env={**os.environ, **env}) for env in envs]
    return watch(procs, float(os.environ.get("VIST2_HEARTBEAT_S", "60")), args.grace)


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def watch(procs: list[subprocess.Popen], heartbeat_s: float, grace_s: float) -> int:
    """Wait for every process; name the first that fails, and stop the others if they
    outlive it by the heartbeat timeout + ``grace_s``. Returns the first failure's exit code
    (0: none)."""
    first, failed_at, wait_s = None, None, heartbeat_s + grace_s
    while [p.poll() for p in procs].count(None):  # poll each one (any() would stop at the first)
        for rank, p in enumerate(procs):
            if first is None and p.returncode not in (None, 0):
                first, failed_at = (rank, p.returncode), time.monotonic()
                print(f"launch/local.py: process {rank} of {len(procs)} {describe(p.returncode)}; the others "
                      f"exit after the heartbeat timeout (VIST2_HEARTBEAT_S={heartbeat_s:.0f} s) or are "
                      f"stopped {wait_s:.0f} s from now", file=sys.stderr, flush=True)
        if failed_at is not None and time.monotonic() - failed_at > wait_s:
            for rank, p in enumerate(procs):
                if p.poll() is None:
                    print(f"launch/local.py: process {rank} still runs {wait_s:.0f} s after process {first[0]} "
                          "failed; stopping it", file=sys.stderr, flush=True)
                    p.kill()
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
    if first is None:
        first = next(((rank, p.returncode) for rank, p in enumerate(procs) if p.returncode), None)
        if first is not None:
            print(f"launch/local.py: process {first[0]} of {len(procs)} {describe(first[1])}", file=sys.stderr)
    if first is None:
        return 0
    return first[1] if first[1] > 0 else 128 - first[1]


if __name__ == "__main__":
    sys.exit(main())
