#!/usr/bin/env python3
"""Run one program as N processes on this machine, over loopback (the multi-host path).

    python launch/local.py --processes 2 --devices-per-process 2 -- vist2 train RECIPE ...

Each process gets VIST2_COORDINATOR / VIST2_NUM_PROCESSES / VIST2_PROCESS_ID (read by
``vist2_jax.training.distributed.initialize_from_env``) and, on CPU, its own forced
device count. Exits with the first non-zero exit code. ``--dry-run`` prints the commands.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys


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
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())
