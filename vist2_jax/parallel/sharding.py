"""One rules table from logical axis names to mesh axes, MaxText style.

Every parameter is created with logical axis names (``nn.with_logical_partitioning``)
and every large activation is constrained by name (``nn.with_logical_constraint``).
Only this table says how those names land on the ``data`` / ``fsdp`` / ``tensor`` mesh.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from vist2_jax.config.schema import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis or axes or None). Order matters only for duplicate names.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("images", ("data", "fsdp")),
    ("length", None),
    ("patches", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("vit_patches", None),
    ("aligner_in", "tensor"),
    ("glyph_out", "tensor"),
)

def resolve_mesh_shape(mesh_config: MeshConfig, num_devices: int) -> dict[str, int]:
    """Fill the one ``-1`` axis and check the product equals the device count."""
    sizes = mesh_config.axis_sizes()
    known = math.prod(size for size in sizes.values() if size != -1)
    for name, size in sizes.items():
        if size == -1:
            if num_devices % known:
                raise ConfigError(f"mesh.{name}: {num_devices} devices are not divisible by "
                                  f"the other axes' product {known}")
            sizes[name] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(f"mesh: axes {sizes} need {math.prod(sizes.values())} devices, "
                          f"but {num_devices} are available")
    return sizes


def make_mesh(mesh_config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_config, len(devices))
    grid = np.asarray(devices).reshape([sizes[axis] for axis in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def logical_shardings(abstract_tree: Any, mesh: Mesh,
                      rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
    """NamedShardings for a tree of ``nn.Partitioned`` (e.g. from ``jax.eval_shape(init)``)."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, jax.sharding.PartitionSpec())
