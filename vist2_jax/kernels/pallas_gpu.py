"""Block-sparse vision-as-memory attention as Pallas GPU kernels (Triton backend), with
backward.

GPU Pallas has no scalar prefetch, so the compacted block tables
(:func:`vist2_jax.kernels.blocks.block_table`) are ordinary inputs: each program reads its
row of the table and walks it with a dynamic ``fori_loop`` up to its count, loading the
visited K/V (or, for dk/dv, Q/dO) blocks with dynamic slices. FULL pairs take the
unmasked branch of a ``lax.cond``; PARTIAL pairs evaluate :func:`.block_sparse.rule`.
Triton compiler params are passed explicitly: without them ``pallas_call`` on GPU goes
to the Mosaic GPU backend, which rejects this kernel.

* forward / dq: one program per (q block, batch, head), walking the kv table.
* dk/dv: one program per (kv block, batch, kv head), walking the transposed table for
  every query head of the GQA group (K/V never repeated).

Block and head sizes must be powers of two (and >= 16 for Triton's dot) when compiled.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from vist2_jax.kernels.blocks import FULL
from vist2_jax.kernels.block_sparse import NEG_INF, backward_delta, prepare, rule
from vist2_jax.kernels.mask import RowMeta

_PARAMS = plgpu.CompilerParams(num_warps=4, num_stages=2)


def _fields(ref, start, block, as_column):
    """Four metadata vectors of tokens [start, start + block) from a (4, S) ref, shaped
    as columns (block, 1) or rows (1, block)."""
    out = []
    for f in range(4):
        x = ref[f, pl.ds(start, block)]
        out.append(x[:, None] if as_column else x[None, :])
    return tuple(out)


def _branch(is_full, body, carry):
    """``body(masked, carry)``: unmasked on FULL pairs, masked on PARTIAL ones."""
    return jax.lax.cond(is_full, functools.partial(body, False), functools.partial(body, True),
                        carry)


def _fwd_kernel(kvb_ref, cnt_ref, cls_ref, q_ref, k_ref, v_ref, f_ref, o_ref, lse_ref, *,
                block, scale, flag):
    i = pl.program_id(0)
    q = q_ref[...]
    q_start = i * block
    q_fields = _fields(f_ref, q_start, block, True)
    q_index = q_start + jnp.arange(block, dtype=jnp.int32)[:, None]

    def visit(t, carry):
        k_start = kvb_ref[t] * block

        def body(masked, carry):
            acc, m_prev, l_prev = carry
            k = k_ref[pl.ds(k_start, block), :]
            v = v_ref[pl.ds(k_start, block), :]
            s = plgpu.dot(q, k, trans_b=True) * scale
            if masked:
                k_index = k_start + jnp.arange(block, dtype=jnp.int32)[None, :]
                mask = rule(q_fields, _fields(f_ref, k_start, block, False), q_index, k_index, flag)
                s = jnp.where(mask, s, NEG_INF)
            m_new = jnp.maximum(m_prev, s.max(axis=1))
            p = jnp.exp(s - m_new[:, None])
            if masked:  # a fully masked row so far has m_new == NEG_INF and exp(0) == 1
                p = jnp.where(mask, p, 0.0)
            alpha = jnp.exp(m_prev - m_new)
            acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
            return acc, m_new, alpha * l_prev + p.sum(axis=1)

        return _branch(cls_ref[t] == FULL, body, carry)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block,), NEG_INF, jnp.float32),
            jnp.zeros((block,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, cnt_ref[0], visit, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(kvb_ref, cnt_ref, cls_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
               f_ref, dq_ref, *, block, scale, flag):
    i = pl.program_id(0)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
    q_start = i * block
    q_fields = _fields(f_ref, q_start, block, True)
    q_index = q_start + jnp.arange(block, dtype=jnp.int32)[:, None]

    def visit(t, dq):
        k_start = kvb_ref[t] * block

        def body(masked, dq):
            k = k_ref[pl.ds(k_start, block), :]
            v = v_ref[pl.ds(k_start, block), :]
            p = jnp.exp(plgpu.dot(q, k, trans_b=True) * scale - lse)
            if masked:
                k_index = k_start + jnp.arange(block, dtype=jnp.int32)[None, :]
                mask = rule(q_fields, _fields(f_ref, k_start, block, False), q_index, k_index, flag)
                p = jnp.where(mask, p, 0.0)
            ds = p * (plgpu.dot(do, v, trans_b=True) - delta)
            return dq + plgpu.dot(ds.astype(k.dtype), k)

        return _branch(cls_ref[t] == FULL, body, dq)

    dq = jax.lax.fori_loop(0, cnt_ref[0], visit, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(qb_ref, cnt_ref, cls_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref,
                f_ref, dk_ref, dv_ref, *, block, scale, flag, group):
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    k_start = j * block
    k_fields = _fields(f_ref, k_start, block, True)  # transposed: rows are keys
    k_index = k_start + jnp.arange(block, dtype=jnp.int32)[:, None]

    def head(g, carry):
        def visit(t, carry):
            q_start = qb_ref[t] * block

            def body(masked, carry):
                dk, dv = carry
                q = q_ref[g, pl.ds(q_start, block), :]
                do = do_ref[g, pl.ds(q_start, block), :]
                lse = lse_ref[g, pl.ds(q_start, block)][None, :]
                delta = delta_ref[g, pl.ds(q_start, block)][None, :]
                pt = jnp.exp(plgpu.dot(k, q, trans_b=True) * scale - lse)
                if masked:
                    q_index = q_start + jnp.arange(block, dtype=jnp.int32)[None, :]
                    mask = rule(_fields(f_ref, q_start, block, False), k_fields, q_index,
                                k_index, flag)
                    pt = jnp.where(mask, pt, 0.0)
                dv = dv + plgpu.dot(pt.astype(do.dtype), do)
                dst = pt * (plgpu.dot(v, do, trans_b=True) - delta)
                return dk + plgpu.dot(dst.astype(q.dtype), q), dv

            return _branch(cls_ref[t] == FULL, body, carry)

        return jax.lax.fori_loop(0, cnt_ref[0], visit, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, group, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _table_specs(n):
    """The row of a [B, n_blocks, n] table, its count [B, n_blocks, 1] and classes."""
    row = pl.BlockSpec((None, None, n), lambda i, b, h: (b, i, 0))
    return [row, pl.BlockSpec((None, None, 1), lambda i, b, h: (b, i, 0)), row]


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret):
    return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, interpret=interpret, compiler_params=_PARAMS)


def _forward(q, k, v, table, fields, block, flag, interpret):
    batch, heads, size, dim = q.shape
    group, nq = heads // k.shape[1], size // block
    q_spec = pl.BlockSpec((None, None, block, dim), lambda i, b, h: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, size, dim), lambda i, b, h: (b, h // group, 0, 0))
    f_spec = pl.BlockSpec((None, 4, size), lambda i, b, h: (b, 0, 0))
    kernel = functools.partial(_fwd_kernel, block=block, scale=dim ** -0.5, flag=flag)
    return _call(kernel, (nq, batch, heads),
                 _table_specs(nq) + [q_spec, kv_spec, kv_spec, f_spec],
                 [q_spec, pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))],
                 [jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct((batch, heads, size), jnp.float32)], interpret)(
        table.kv_blocks, table.kv_counts[..., None], table.kv_classes, q, k, v, fields)


def _dq(q, k, v, do, lse, delta, table, fields, block, flag, interpret):
    batch, heads, size, dim = q.shape
    group, nq = heads // k.shape[1], size // block
    q_spec = pl.BlockSpec((None, None, block, dim), lambda i, b, h: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, size, dim), lambda i, b, h: (b, h // group, 0, 0))
    vec_spec = pl.BlockSpec((None, None, block), lambda i, b, h: (b, h, i))
    f_spec = pl.BlockSpec((None, 4, size), lambda i, b, h: (b, 0, 0))
    kernel = functools.partial(_dq_kernel, block=block, scale=dim ** -0.5, flag=flag)
    return _call(kernel, (nq, batch, heads),
                 _table_specs(nq) + [q_spec, kv_spec, kv_spec, q_spec, vec_spec, vec_spec, f_spec],
                 q_spec, jax.ShapeDtypeStruct(q.shape, q.dtype), interpret)(
        table.kv_blocks, table.kv_counts[..., None], table.kv_classes, q, k, v, do, lse, delta,
        fields)


def _dkv(q, k, v, do, lse, delta, table, fields, block, flag, interpret):
    batch, heads, size, dim = q.shape
    kv_heads = k.shape[1]
    group, nk = heads // kv_heads, size // block
    group_spec = pl.BlockSpec((None, group, size, dim), lambda j, b, h: (b, h, 0, 0))
    vec_spec = pl.BlockSpec((None, group, size), lambda j, b, h: (b, h, 0))
    kv_spec = pl.BlockSpec((None, None, block, dim), lambda j, b, h: (b, h, j, 0))
    f_spec = pl.BlockSpec((None, 4, size), lambda j, b, h: (b, 0, 0))
    kernel = functools.partial(_dkv_kernel, block=block, scale=dim ** -0.5, flag=flag,
                               group=group)
    return _call(kernel, (nk, batch, kv_heads),
                 _table_specs(nk) + [group_spec, kv_spec, kv_spec, group_spec, vec_spec,
                                     vec_spec, f_spec],
                 [kv_spec, kv_spec],
                 [jax.ShapeDtypeStruct(k.shape, k.dtype),
                  jax.ShapeDtypeStruct(v.shape, v.dtype)], interpret)(
        table.q_blocks, table.q_counts[..., None], table.q_classes, q, k, v, do, lse, delta,
        fields)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attend(q, k, v, table, fields, block, flag, interpret):
    return _forward(q, k, v, table, fields, block, flag, interpret)[0]


def _attend_fwd(q, k, v, table, fields, block, flag, interpret):
    out, lse = _forward(q, k, v, table, fields, block, flag, interpret)
    return out, (q, k, v, table, fields, out, lse)


def _attend_bwd(block, flag, interpret, residuals, do):
    q, k, v, table, fields, out, lse = residuals
    args = (q, k, v, do, lse, backward_delta(out, do), table, fields, block, flag, interpret)
    dk, dv = _dkv(*args)
    return _dq(*args), dk, dv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: RowMeta, *,
                           block: int = 64, visual_attends_past_visual: bool = False,
                           interpret: bool = False) -> jax.Array:
    """Same contract as :func:`vist2_jax.kernels.pallas_tpu.block_sparse_attention`;
    differentiable in q, k, v."""
    seq = q.shape[1]
    prep = prepare(q, k, v, meta, block, visual_attends_past_visual)
    out = _attend(prep.q, prep.k, prep.v, prep.table, prep.fields, block,
                  visual_attends_past_visual, interpret)
    return jnp.swapaxes(out, 1, 2)[:, :seq]
