"""The one table of TPU slices ``vist2 aot`` compiles for, by the names users write.

A v5p slice is named by TensorCores (two per chip: v5p-32 is 16 chips); v5e / v6e slices
by chips. ``hbm_gib`` is the HBM per chip, ``peak_tflops`` the dense bf16 peak per chip
(public spec sheets); ``hbm_gbps`` the HBM bandwidth per chip.
"""

from __future__ import annotations

import dataclasses
import glob
import os

from vist2_jax.config.schema import ConfigError


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str
    topology: str  # libtpu topology name for ``get_topology_desc``
    chips: int
    hbm_gib: float
    peak_tflops: float
    hbm_gbps: float


_V5P = dict(hbm_gib=95.74, peak_tflops=459.0, hbm_gbps=2765.0)
_V5E = dict(hbm_gib=16.0, peak_tflops=197.0, hbm_gbps=819.0)
_V6E = dict(hbm_gib=32.0, peak_tflops=918.0, hbm_gbps=1640.0)

SLICES: dict[str, Slice] = {s.name: s for s in (
    Slice("v5p-8", "v5p:2x2x1", 4, **_V5P),
    Slice("v5p-16", "v5p:2x2x2", 8, **_V5P),
    Slice("v5p-32", "v5p:2x2x4", 16, **_V5P),
    Slice("v5p-64", "v5p:2x4x4", 32, **_V5P),
    Slice("v5p-128", "v5p:4x4x4", 64, **_V5P),
    Slice("v5p-256", "v5p:4x4x8", 128, **_V5P),
    Slice("v5e-8", "v5e:2x4", 8, **_V5E),
    Slice("v5e-256", "v5e:16x16", 256, **_V5E),
    Slice("v6e-8", "v6e:2x4", 8, **_V6E),
    Slice("v6e-256", "v6e:16x16", 256, **_V6E),
)}


def get_slice(name: str) -> Slice:
    if name not in SLICES:
        raise ConfigError(f"--topology: unknown slice {name!r}; known: {', '.join(SLICES)}")
    return SLICES[name]


def _has_local_tpu() -> bool:
    """A TPU attached to this host (TPU VMs expose ``/dev/accel*`` or ``/dev/vfio``)."""
    return bool(glob.glob("/dev/accel*")) or os.path.exists("/dev/vfio")


def slice_devices(slice_: Slice):
    """The slice's TPU devices (compile targets only; libtpu needs no TPU on this host)."""
    try:
        import libtpu  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"--topology: libtpu is not installed ({err}); pip install 'vist2-jax[tpu]'") from None
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other libtpu users on this host
    if not _has_local_tpu():
        # Off a TPU VM libtpu asks the (absent) metadata server for the accelerator type and
        # the worker hostnames and prints three warnings; the compile targets come from the
        # topology alone (the same devices whatever these say), so say what it asks for.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", slice_.name.replace("v5e-", "v5litepod-"))
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    return topologies.get_topology_desc(slice_.topology, "tpu").devices
