"""Multi-host set-up: ``jax.distributed.initialize`` from the environment, assembling
host-local batches into global arrays, and reading global arrays back on every host.

Recognised (in order): an explicit coordinator (``VIST2_COORDINATOR``, ``VIST2_NUM_PROCESSES``,
``VIST2_PROCESS_ID``, set by ``launch/local.sh``, the JobSet manifest and the SLURM
script), SLURM (``SLURM_NTASKS`` > 1, which JAX reads itself), and TPU VM pods (JAX finds
the other workers itself). A single process without those variables runs as is.

A dead process (killed, its host lost) stops sending heartbeats to the coordination service;
after ``VIST2_HEARTBEAT_S`` seconds (default 60) every other process is told and exits
with an error instead of waiting in a collective forever.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)
BATCH_AXES = ("data", "fsdp")


def initialize_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Call ``jax.distributed.initialize`` when the environment describes several processes."""
    env = os.environ if environ is None else environ
    timeouts = {"heartbeat_timeout_seconds": heartbeat_seconds(env)}
    if env.get("VIST2_COORDINATOR"):
        if env.get("JAX_PLATFORMS", "") == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=env["VIST2_COORDINATOR"],
                                   num_processes=int(env["VIST2_NUM_PROCESSES"]),
                                   process_id=int(env["VIST2_PROCESS_ID"]), **timeouts)
    elif int(env.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize(**timeouts)
    elif env.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize(**timeouts)
    else:
        return False
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def heartbeat_seconds(env: Mapping[str, str]) -> int:
    """How long the others wait for a silent process before they exit (``VIST2_HEARTBEAT_S``)."""
    from vist2_jax.config.schema import ConfigError

    text = env.get("VIST2_HEARTBEAT_S", "60")
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"VIST2_HEARTBEAT_S: {text!r} is not a whole number of seconds >= 1")
    return int(text)


def to_host(value) -> np.ndarray:
    """A (small) jax.Array as numpy on every host, also when it spans other hosts' devices
    (the outputs of evaluation functions over parameters sharded across a pod): gathered,
    so every host must call it, as every host runs the evaluations."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(value)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local rows (this host's slice of the global batch) -> global sharded arrays."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
