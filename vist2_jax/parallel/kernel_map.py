"""Run a Pallas attention kernel under the ambient mesh with ``shard_map``.

Mosaic / Triton calls cannot be partitioned automatically, so under a mesh the kernel runs
per shard: rows split over the batch axes and heads over the head axis, exactly as the
rules table shards ``("batch", "length", "act_heads")`` activations. An axis that does not
divide (one generation row, fewer KV heads than the tensor axis) stays whole. Without a
mesh (or with every mesh axis of size 1) the kernel is called directly.

On TPU the per-row block tables are scalar-prefetched into SMEM (1 MiB), which overflows
as rows per chip grow (16 rows of 8192 at block 128 for 8B); the shard's rows are then
processed in groups whose tables fit (``lax.map``), so SMEM use is bounded by the group.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P

from vist2_jax.kernels.mask import RowMeta
from vist2_jax.parallel.sharding import LOGICAL_AXIS_RULES

TPU_TABLE_BUDGET = 256 * 1024  # bytes of scalar-prefetched tables per kernel call (of 1 MiB)


def ambient_mesh():
    """The mesh set by ``jax.set_mesh`` (abstract), or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def target_platform() -> str:
    """The platform being compiled for: the ambient mesh's devices, else the default backend."""
    mesh = ambient_mesh()
    platform = getattr(getattr(mesh, "abstract_device", None), "platform", None) if mesh else None
    return {"cuda": "gpu", "rocm": "gpu"}.get(platform, platform) or jax.default_backend()


def _mesh_axes(logical: str, mesh) -> tuple[str, ...]:
    """Mesh axes the rules table maps ``logical`` to, restricted to ``mesh``'s axes."""
    spec = nn.logical_to_mesh_axes((logical,), LOGICAL_AXIS_RULES)[0]
    axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
    return tuple(a for a in axes if a in mesh.axis_names)


def _fit(axes: tuple[str, ...], mesh, *sizes: int) -> tuple[str, ...]:
    """The longest prefix of ``axes`` whose product divides every one of ``sizes``."""
    shape = dict(zip(mesh.axis_names, mesh.axis_sizes))
    kept = []
    for axis in axes:
        n = math.prod(shape[a] for a in kept) * shape[axis]
        if any(s % n for s in sizes):
            break
        kept.append(axis)
    return tuple(kept)


def rows_per_call(rows: int, seq: int, block: int) -> int:
    """Largest divisor of ``rows`` whose TPU block tables (int32, three [rows, n, n]
    arrays with n = seq / block) fit :data:`TPU_TABLE_BUDGET`."""
    blocks = -(-seq // block)
    cap = max(1, TPU_TABLE_BUDGET // (3 * 4 * blocks * blocks))
    return max(d for d in range(1, rows + 1) if rows % d == 0 and d <= cap)


def in_row_groups(fn: Callable, group: int) -> Callable:
    """``fn(q, k, v, meta)`` applied to consecutive groups of ``group`` rows (lax.map)."""
    def grouped(q, k, v, meta):
        rows = q.shape[0]
        if group >= rows:
            return fn(q, k, v, meta)
        split = lambda x: x.reshape((rows // group, group) + x.shape[1:])  # noqa: E731
        out = jax.lax.map(lambda a: fn(*a[:3], RowMeta(*a[3])),
                          (split(q), split(k), split(v), tuple(split(m) for m in meta)))
        return out.reshape((rows,) + out.shape[2:])
    return grouped


def shard_kernel(fn: Callable, q, k, v, meta: RowMeta):
    """``fn(q, k, v, meta)`` (q [B, S, H, D], k/v [B, S, KV, D], meta [B, S]; per-row and
    per-head independent) per shard of the ambient mesh; every mesh axis is manual inside
    (axes the arrays are not split over see them whole)."""
    mesh = ambient_mesh()
    if mesh is None or mesh.size == 1 or mesh.manual_axes:
        return fn(q, k, v, meta)
    batch = _fit(_mesh_axes("batch", mesh), mesh, q.shape[0])
    heads = _fit(_mesh_axes("act_heads", mesh), mesh, q.shape[2], k.shape[2])
    if not batch and not heads:
        return fn(q, k, v, meta)
    b, h = (batch or None), (heads or None)
    qkv, row = P(b, None, h, None), P(b, None)
    return jax.shard_map(lambda q, k, v, *m: fn(q, k, v, RowMeta(*m)), mesh=mesh,
                         in_specs=(qkv, qkv, qkv) + (row,) * 4, out_specs=qkv,
                         check_vma=False)(q, k, v, *meta)
