"""Block-sparse vision-as-memory attention as Pallas GPU kernels (Triton backend), with
backward.

GPU Pallas has no scalar prefetch, so the compacted block tables
(:func:`vist2_jax.kernels.blocks.block_table`) are ordinary inputs: each program reads its
row of the table and walks it with a dynamic ``fori_loop`` up to its count, loading the
visited K/V (or, for dk/dv, Q/dO) tiles with dynamic slices. The loads and dots of a
visit are unconditional, so Triton can pipeline them across iterations; only the mask
arithmetic sits in a ``lax.cond``, skipped on FULL pairs (PARTIAL pairs evaluate
:func:`.block_sparse.rule` and set disallowed logits to ``NEG_INF``, which the softmax
turns into exact zeros). Triton compiler params are passed explicitly: without them
``pallas_call`` on GPU goes to the Mosaic GPU backend, which rejects this kernel.

* forward / dq: one program per (head, q block, batch), walking the kv table. Heads are
  the fastest grid axis, so the query heads of a GQA group run side by side on the same
  K/V tiles (L2 hits), and q blocks go last-first (the longest rows start first).
* dk/dv: one program per (kv head, kv block, batch), walking the transposed table; each
  visited q tile's mask is built once and reused for every query head of the group.

Tiles per direction (:func:`tiles`): ``block`` is the tile of the outer (program) axis,
the walked axis uses a smaller one (64 forward, 32 backward), as in flash-attention 2;
each direction has its own block table. fp32 inputs get IEEE dots (no TF32). Tile and
head sizes must be powers of two (and >= 16 for Triton's dot) when compiled.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from vist2_jax.kernels.blocks import FULL, BlockTable, block_table, classify
from vist2_jax.kernels.block_sparse import NEG_INF, backward_delta, prepare, rule
from vist2_jax.kernels.precision import dot_precision
from vist2_jax.kernels.mask import RowMeta

# Lowering target when no GPU is the default device (jax >= 0.11 reads it from here).
DEFAULT_GPU_KIND = "NVIDIA H100 80GB HBM3"


class Tiles(NamedTuple):
    """(q tile, kv tile) of each kernel."""

    fwd: tuple[int, int]
    dq: tuple[int, int]
    dkv: tuple[int, int]


def tiles(block: int) -> Tiles:
    """Per-direction tiles for ``block``: the program's own axis gets ``block``, the walked
    axis the largest divisor of ``block`` up to 64 (forward) or 32 (backward)."""
    fwd_k, bwd = math.gcd(block, 64), math.gcd(block, 32)
    return Tiles(fwd=(block, fwd_k), dq=(block, bwd), dkv=(bwd, block))


def _params(rows: int, dim: int, held: int, accumulators: int, walked: int,
            dtype) -> plgpu.CompilerParams:
    """Launch parameters of a program holding ``held`` input tiles and ``accumulators``
    fp32 tiles of ``rows`` x ``dim`` while it walks tiles of ``walked`` rows: 8 warps once
    those pass 96 registers a thread at 4 warps; 3 pipeline stages for 16-bit inputs while
    a stage's two walked tiles fit 32 KiB of shared memory, else 2 (fp32, the exactness
    path, needs an H100's shared memory at block 128, head dim 128). At head dim 128 in
    bf16 on sm_90 this gives no spills and 8-16 resident warps an SM
    (``python -m vist2_jax.bench.triton_static``)."""
    itemsize = jnp.dtype(dtype).itemsize
    words = rows * dim * (held * itemsize / 4 + accumulators)
    stage_bytes = 2 * walked * dim * itemsize
    return plgpu.CompilerParams(num_warps=8 if words > 96 * 128 else 4,
                                num_stages=3 if itemsize <= 2 and stage_bytes <= 32 << 10 else 2)


@contextlib.contextmanager
def gpu_lowering_target(device_kind: str | None = None):
    """Lower for ``cuda`` without a local GPU: a one-device abstract mesh naming the GPU
    (default: the local GPU if any, else :data:`DEFAULT_GPU_KIND`). jax >= 0.11 takes the
    Triton target from it and otherwise fails with "No supported GPU devices found"."""
    if device_kind is None:
        try:
            device_kind = jax.devices("gpu")[0].device_kind
        except RuntimeError:
            device_kind = DEFAULT_GPU_KIND
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None,
                                         platform="cuda")
    with jax.sharding.use_abstract_mesh(
            jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=device)):
        yield


def _dot(a, b, trans_b=False):
    return plgpu.dot(a, b, trans_b=trans_b, precision=dot_precision(a.dtype))


def _fields(ref, start, size, as_column):
    """Four metadata vectors of tokens [start, start + size) from a (4, S) ref, shaped
    as columns (size, 1) or rows (1, size)."""
    out = []
    for f in range(4):
        x = ref[f, pl.ds(start, size)]
        out.append(x[:, None] if as_column else x[None, :])
    return tuple(out)


def _index(start, size, as_column):
    x = start + jnp.arange(size, dtype=jnp.int32)
    return x[:, None] if as_column else x[None, :]


def _q_major_mask(f_ref, q_fields, q_index, bk, flag):
    """``mask(k_start, s)``: ``s`` [bq, bk] with disallowed logits set to NEG_INF."""
    def mask(k_start, s):
        allowed = rule(q_fields, _fields(f_ref, k_start, bk, False), q_index,
                       _index(k_start, bk, False), flag)
        return jnp.where(allowed, s, NEG_INF)
    return mask


def _fwd_kernel(kvb_ref, cnt_ref, cls_ref, q_ref, k_ref, v_ref, f_ref, o_ref, lse_ref, *,
                tile, nq, scale, flag):
    bq, bk = tile
    q_start = (nq - 1 - pl.program_id(1)) * bq
    q = q_ref[...]
    mask = _q_major_mask(f_ref, _fields(f_ref, q_start, bq, True), _index(q_start, bq, True),
                         bk, flag)

    def visit(t, carry):
        acc, m_prev, l_prev = carry
        k_start = kvb_ref[t] * bk
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s = _dot(q, k, trans_b=True) * scale
        s = jax.lax.cond(cls_ref[t] == FULL, lambda s: s, functools.partial(mask, k_start), s)
        m_new = jnp.maximum(m_prev, s.max(axis=1))
        # A row masked so far has m_new == NEG_INF: subtract 0 so its p is exp(NEG_INF) = 0.
        p = jnp.exp(s - jnp.where(m_new == NEG_INF, 0.0, m_new)[:, None])
        alpha = jnp.exp(m_prev - m_new)
        acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
        return acc, m_new, alpha * l_prev + p.sum(axis=1)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq,), NEG_INF, jnp.float32),
            jnp.zeros((bq,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, cnt_ref[0], visit, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(kvb_ref, cnt_ref, cls_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               f_ref, dq_ref, *, tile, nq, scale, flag):
    bq, bk = tile
    q_start = (nq - 1 - pl.program_id(1)) * bq
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    mask = _q_major_mask(f_ref, _fields(f_ref, q_start, bq, True), _index(q_start, bq, True),
                         bk, flag)

    def visit(t, dq):
        k_start = kvb_ref[t] * bk
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s = _dot(q, k, trans_b=True) * scale
        s = jax.lax.cond(cls_ref[t] == FULL, lambda s: s, functools.partial(mask, k_start), s)
        p = jnp.exp(s - lse)
        ds = p * (_dot(do, v, trans_b=True) - delta)
        return dq + _dot(ds.astype(k.dtype), k)

    dq = jax.lax.fori_loop(0, cnt_ref[0], visit, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(qb_ref, cnt_ref, cls_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                f_ref, dk_ref, dv_ref, *, tile, nk, scale, flag, group):
    bq, bk = tile
    k_start = (nk - 1 - pl.program_id(1)) * bk
    k, v = k_ref[...], v_ref[...]
    k_fields = _fields(f_ref, k_start, bk, True)  # transposed: rows are keys
    k_index = _index(k_start, bk, True)

    def visit(t, carry):
        q_start = qb_ref[t] * bq

        def partial_mask(_):
            return rule(_fields(f_ref, q_start, bq, False), k_fields,
                        _index(q_start, bq, False), k_index, flag)

        allowed = jax.lax.cond(cls_ref[t] == FULL, lambda _: jnp.ones((bk, bq), jnp.bool_),
                               partial_mask, None)

        def head(g, carry):
            dk, dv = carry
            q = q_ref[g, pl.ds(q_start, bq), :]
            do = do_ref[g, pl.ds(q_start, bq), :]
            lse = lse_ref[g, pl.ds(q_start, bq)][None, :]
            delta = delta_ref[g, pl.ds(q_start, bq)][None, :]
            st = jnp.where(allowed, _dot(k, q, trans_b=True) * scale, NEG_INF)
            pt = jnp.exp(st - lse)
            dv = dv + _dot(pt.astype(do.dtype), do)
            dst = pt * (_dot(v, do, trans_b=True) - delta)
            return dk + _dot(dst.astype(q.dtype), q), dv

        return jax.lax.fori_loop(0, group, head, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, cnt_ref[0], visit, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _table_specs(n, outer):
    """The row of a [B, n_outer, n] table for outer block ``outer(axis)``, its count and
    classes; grid (head, reversed outer block, batch)."""
    row = pl.BlockSpec((None, None, n), lambda h, r, b: (b, outer(r), 0))
    return [row, pl.BlockSpec((None, None, 1), lambda h, r, b: (b, outer(r), 0)), row]


def _reversed(n):
    return lambda r: n - 1 - r


def _q_major_specs(table, size, dim, tile, group):
    """Specs of the forward / dq programs: the table row, the q tile, whole K/V rows of
    the kv head and the row metadata."""
    bq = tile[0]
    nq, outer = size // bq, _reversed(size // bq)
    q_spec = pl.BlockSpec((None, None, bq, dim), lambda h, r, b: (b, h, outer(r), 0))
    kv_spec = pl.BlockSpec((None, None, size, dim), lambda h, r, b: (b, h // group, 0, 0))
    vec_spec = pl.BlockSpec((None, None, bq), lambda h, r, b: (b, h, outer(r)))
    f_spec = pl.BlockSpec((None, 4, size), lambda h, r, b: (b, 0, 0))
    tables = (table.kv_blocks, table.kv_counts[..., None], table.kv_classes)
    return nq, _table_specs(table.kv_blocks.shape[-1], outer), tables, q_spec, kv_spec, vec_spec, f_spec


def _forward(q, k, v, tables, fields, tile, flag, interpret):
    batch, heads, size, dim = q.shape
    nq, t_specs, t_args, q_spec, kv_spec, vec_spec, f_spec = _q_major_specs(
        tables[0], size, dim, tile, heads // k.shape[1])
    kernel = functools.partial(_fwd_kernel, tile=tile, nq=nq, scale=dim ** -0.5, flag=flag)
    return pl.pallas_call(
        kernel, grid=(heads, nq, batch), in_specs=t_specs + [q_spec, kv_spec, kv_spec, f_spec],
        out_specs=[q_spec, vec_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, size), jnp.float32)],
        interpret=interpret, compiler_params=_params(tile[0], dim, 1, 1, tile[1], q.dtype),
    )(*t_args, q, k, v, fields)


def _dq(q, k, v, do, lse, delta, tables, fields, tile, flag, interpret):
    batch, heads, size, dim = q.shape
    nq, t_specs, t_args, q_spec, kv_spec, vec_spec, f_spec = _q_major_specs(
        tables[1], size, dim, tile, heads // k.shape[1])
    kernel = functools.partial(_dq_kernel, tile=tile, nq=nq, scale=dim ** -0.5, flag=flag)
    return pl.pallas_call(
        kernel, grid=(heads, nq, batch),
        in_specs=t_specs + [q_spec, kv_spec, kv_spec, q_spec, vec_spec, vec_spec, f_spec],
        out_specs=q_spec, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret, compiler_params=_params(tile[0], dim, 2, 1, tile[1], q.dtype),
    )(*t_args, q, k, v, do, lse, delta, fields)


def _dkv(q, k, v, do, lse, delta, tables, fields, tile, flag, interpret):
    batch, heads, size, dim = q.shape
    kv_heads = k.shape[1]
    group, bk = heads // kv_heads, tile[1]
    nk, outer = size // bk, _reversed(size // bk)
    table = tables[2]
    group_spec = pl.BlockSpec((None, group, size, dim), lambda h, r, b: (b, h, 0, 0))
    vec_spec = pl.BlockSpec((None, group, size), lambda h, r, b: (b, h, 0))
    kv_spec = pl.BlockSpec((None, None, bk, dim), lambda h, r, b: (b, h, outer(r), 0))
    f_spec = pl.BlockSpec((None, 4, size), lambda h, r, b: (b, 0, 0))
    kernel = functools.partial(_dkv_kernel, tile=tile, nk=nk, scale=dim ** -0.5, flag=flag,
                               group=group)
    return pl.pallas_call(
        kernel, grid=(kv_heads, nk, batch),
        in_specs=_table_specs(table.q_blocks.shape[-1], outer)
        + [group_spec, kv_spec, kv_spec, group_spec, vec_spec, vec_spec, f_spec],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=interpret, compiler_params=_params(bk, dim, 2, 2, tile[0], q.dtype),
    )(table.q_blocks, table.q_counts[..., None], table.q_classes, q, k, v, do, lse, delta,
      fields)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attend(q, k, v, tables, fields, tiling, flag, interpret):
    return _forward(q, k, v, tables, fields, tiling.fwd, flag, interpret)[0]


def _attend_fwd(q, k, v, tables, fields, tiling, flag, interpret):
    out, lse = _forward(q, k, v, tables, fields, tiling.fwd, flag, interpret)
    return out, (q, k, v, tables, fields, out, lse)


def _attend_bwd(tiling, flag, interpret, residuals, do):
    q, k, v, tables, fields, out, lse = residuals
    args = (q, k, v, do, lse, backward_delta(out, do), tables, fields)
    dk, dv = _dkv(*args, tiling.dkv, flag, interpret)
    return _dq(*args, tiling.dq, flag, interpret), dk, dv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def direction_tables(prep_table: BlockTable, fields: jax.Array, block: int,
                     flag: bool) -> tuple[BlockTable, BlockTable, BlockTable]:
    """The forward, dq and dk/dv block tables of :func:`tiles` ``(block)``, from the padded
    row's ``fields``; a (block, block) tiling reuses ``prep_table``."""
    meta = RowMeta(*(fields[:, f] for f in range(4)))
    made = {(block, block): prep_table}

    def table(tile):
        if tile not in made:
            made[tile] = BlockTable(*(a.astype(jnp.int32)
                                      for a in block_table(classify(meta, *tile, flag))))
        return made[tile]

    return tuple(table(t) for t in tiles(block))


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: RowMeta, *,
                           block: int = 64, visual_attends_past_visual: bool = False,
                           interpret: bool = False) -> jax.Array:
    """Same contract as :func:`vist2_jax.kernels.pallas_tpu.block_sparse_attention`;
    differentiable in q, k, v. ``block`` is the q tile of forward / dq and the kv tile of
    dk/dv (:func:`tiles`)."""
    seq = q.shape[1]
    prep = prepare(q, k, v, meta, block, visual_attends_past_visual)
    tables = direction_tables(prep.table, prep.fields, block, visual_attends_past_visual)
    out = _attend(prep.q, prep.k, prep.v, tables, prep.fields, tiles(block),
                  visual_attends_past_visual, interpret)
    return jnp.swapaxes(out, 1, 2)[:, :seq]
