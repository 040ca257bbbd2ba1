"""Block-sparse vision-as-memory attention as Pallas TPU (Mosaic) kernels, with backward.

The compacted block tables of :func:`vist2_jax.kernels.blocks.block_table` are
scalar-prefetched and drive the index maps, so only visited blocks are ever fetched;
visits past a block's count repeat the last block (no new DMA) and skip the compute.
FULL pairs run without mask arithmetic; PARTIAL pairs evaluate the rule from per-token
metadata (:func:`.block_sparse.rule`). Online softmax in fp32; fp32 inputs get
full-precision (``HIGHEST``) dots.

* forward: per (q block, head), walk the kv table; also writes the logsumexp residual.
* dq: per (q block, head), walk the same table, recomputing P from the logsumexp.
* dk/dv: per (kv block, kv head), walk the transposed table and, for GQA, every query
  head of the group (grid axes), accumulating in VMEM; K/V are never repeated. This
  kernel works in the transposed orientation (kv rows, q columns) so every matmul is a
  plain or B-transposed one.

Wired with ``jax.custom_vjp``; tested on CPU in interpret mode against the dense
reference, lowered with ``jax.export`` and compiled for a libtpu topology.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vist2_jax.kernels.blocks import FULL
from vist2_jax.kernels.block_sparse import NEG_INF, backward_delta, prepare, rule
from vist2_jax.kernels.precision import dot_precision
from vist2_jax.kernels.mask import RowMeta

_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T


def _dot(a, b):
    return jnp.dot(a, b, preferred_element_type=jnp.float32, precision=dot_precision(a.dtype))


def _dot_nt(a, b):
    """a @ b.T in fp32."""
    return jax.lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32,
                               precision=dot_precision(a.dtype))


def _iota(shape, axis, offset):
    return offset + jax.lax.broadcasted_iota(jnp.int32, shape, axis)


def _col_fields(ref):
    """(block, 4) metadata tile -> four (block, 1) columns."""
    x = ref[...]
    return tuple(x[:, f:f + 1] for f in range(4))


def _row_fields(ref):
    """(4, block) metadata tile -> four (1, block) rows."""
    x = ref[...]
    return tuple(x[f:f + 1, :] for f in range(4))


def _on_visit(visit, is_full, body):
    """Run ``body(masked)`` on a visited pair: without the mask on FULL pairs, with it
    on PARTIAL ones."""
    pl.when(visit & is_full)(lambda: body(False))
    pl.when(visit & jnp.logical_not(is_full))(lambda: body(True))


def _fwd_kernel(kv_blocks, kv_counts, kv_classes, q_ref, k_ref, v_ref, qm_ref, km_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, block, scale, flag):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def body(masked):
        v = v_ref[...]
        s = _dot_nt(q_ref[...], k_ref[...]) * scale
        if masked:
            mask = rule(_col_fields(qm_ref), _row_fields(km_ref), _iota((block, 1), 0, i * block),
                        _iota((1, block), 1, kv_blocks[b, i, j] * block), flag)
            s = jnp.where(mask, s, NEG_INF)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if masked:  # a fully masked row so far has m_new == NEG_INF and exp(0) == 1
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v.dtype), v)
        m_sc[...] = m_new

    _on_visit(j < kv_counts[b, i], kv_classes[b, i, j] == FULL, body)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])


def _dq_kernel(kv_blocks, kv_counts, kv_classes, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, qm_ref, km_ref, dq_ref, dq_sc, *, block, scale, flag):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def body(masked):
        k = k_ref[...]
        s = _dot_nt(q_ref[...], k) * scale
        p = jnp.exp(s - lse_ref[...])
        if masked:
            mask = rule(_col_fields(qm_ref), _row_fields(km_ref), _iota((block, 1), 0, i * block),
                        _iota((1, block), 1, kv_blocks[b, i, j] * block), flag)
            p = jnp.where(mask, p, 0.0)
        dp = _dot_nt(do_ref[...], v_ref[...])
        ds = p * (dp - delta_ref[...])
        dq_sc[...] += _dot(ds.astype(k.dtype), k)

    _on_visit(j < kv_counts[b, i], kv_classes[b, i, j] == FULL, body)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_blocks, q_counts, q_classes, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, qm_ref, km_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, block, scale, flag):
    b, j, g, t = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (t == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def body(masked):  # transposed orientation: rows are keys, columns are queries
        q, do = q_ref[...], do_ref[...]
        st = _dot_nt(k_ref[...], q) * scale
        pt = jnp.exp(st - lse_ref[...])
        if masked:
            mask = rule(_row_fields(qm_ref), _col_fields(km_ref),
                        _iota((1, block), 1, q_blocks[b, j, t] * block),
                        _iota((block, 1), 0, j * block), flag)
            pt = jnp.where(mask, pt, 0.0)
        dv_sc[...] += _dot(pt.astype(do.dtype), do)
        dpt = _dot_nt(v_ref[...], do)
        dst = pt * (dpt - delta_ref[...])
        dk_sc[...] += _dot(dst.astype(q.dtype), q)

    _on_visit(t < q_counts[b, j], q_classes[b, j, t] == FULL, body)

    @pl.when((g == pl.num_programs(3) - 1) & (t == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _specs(block, dim, group):
    """Index maps of the q-major kernels (forward, dq): grid (B, H, nq, visits)."""
    def kv_map(b, h, i, j, kv_blocks, *_):
        return b, jax.lax.div(h, group), kv_blocks[b, i, j], 0  # no floor_divide: h >= 0

    q_spec = pl.BlockSpec((None, None, block, dim), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, block, dim), kv_map)
    col_spec = pl.BlockSpec((None, None, block, 1), lambda b, h, i, j, *_: (b, h, i, 0))
    qm_spec = pl.BlockSpec((None, block, 4), lambda b, h, i, j, *_: (b, i, 0))
    km_spec = pl.BlockSpec((None, 4, block), lambda b, h, i, j, kv_blocks, *_: (b, 0, kv_blocks[b, i, j]))
    return q_spec, kv_spec, col_spec, qm_spec, km_spec


def _forward(q, k, v, table, fields, block, flag, interpret):
    batch, heads, size, dim = q.shape
    group, nq = heads // k.shape[1], size // block
    q_spec, kv_spec, col_spec, qm_spec, km_spec = _specs(block, dim, group)
    kernel = functools.partial(_fwd_kernel, block=block, scale=dim ** -0.5, flag=flag)
    return pl.pallas_call(
        kernel, interpret=interpret,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(batch, heads, nq, nq),
            in_specs=[q_spec, kv_spec, kv_spec, qm_spec, km_spec],
            out_specs=[q_spec, col_spec],
            scratch_shapes=[pltpu.VMEM((block, 1), jnp.float32),
                            pltpu.VMEM((block, 1), jnp.float32),
                            pltpu.VMEM((block, dim), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, size, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    )(table.kv_blocks, table.kv_counts, table.kv_classes, q, k, v,
      jnp.swapaxes(fields, 1, 2), fields)


def _dq(q, k, v, do, lse, delta, table, fields, block, flag, interpret):
    batch, heads, size, dim = q.shape
    group, nq = heads // k.shape[1], size // block
    q_spec, kv_spec, col_spec, qm_spec, km_spec = _specs(block, dim, group)
    kernel = functools.partial(_dq_kernel, block=block, scale=dim ** -0.5, flag=flag)
    return pl.pallas_call(
        kernel, interpret=interpret,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(batch, heads, nq, nq),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, col_spec, col_spec, qm_spec, km_spec],
            out_specs=q_spec,
            scratch_shapes=[pltpu.VMEM((block, dim), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    )(table.kv_blocks, table.kv_counts, table.kv_classes, q, k, v, do, lse[..., None],
      delta[..., None], jnp.swapaxes(fields, 1, 2), fields)


def _dkv(q, k, v, do, lse, delta, table, fields, block, flag, interpret):
    batch, heads, size, dim = q.shape
    kv_heads = k.shape[1]
    group, nk = heads // kv_heads, size // block

    def q_map(b, h, j, g, t, q_blocks, *_):
        return b, h * group + g, q_blocks[b, j, t], 0

    def row_map(b, h, j, g, t, q_blocks, *_):
        return b, h * group + g, 0, q_blocks[b, j, t]

    q_spec = pl.BlockSpec((None, None, block, dim), q_map)
    kv_spec = pl.BlockSpec((None, None, block, dim), lambda b, h, j, g, t, *_: (b, h, j, 0))
    row_spec = pl.BlockSpec((None, None, 1, block), row_map)
    qm_spec = pl.BlockSpec((None, 4, block), lambda b, h, j, g, t, q_blocks, *_: (b, 0, q_blocks[b, j, t]))
    km_spec = pl.BlockSpec((None, block, 4), lambda b, h, j, g, t, *_: (b, j, 0))
    kernel = functools.partial(_dkv_kernel, block=block, scale=dim ** -0.5, flag=flag)
    return pl.pallas_call(
        kernel, interpret=interpret,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(batch, kv_heads, nk, group, nk),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, qm_spec, km_spec],
            out_specs=[kv_spec, kv_spec],
            scratch_shapes=[pltpu.VMEM((block, dim), jnp.float32),
                            pltpu.VMEM((block, dim), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
    )(table.q_blocks, table.q_counts, table.q_classes, q, k, v, do, lse[:, :, None],
      delta[:, :, None], fields, jnp.swapaxes(fields, 1, 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attend(q, k, v, table, fields, block, flag, interpret):
    return _forward(q, k, v, table, fields, block, flag, interpret)[0]


def _attend_fwd(q, k, v, table, fields, block, flag, interpret):
    out, lse = _forward(q, k, v, table, fields, block, flag, interpret)
    return out, (q, k, v, table, fields, out, lse[..., 0])


def _attend_bwd(block, flag, interpret, residuals, do):
    q, k, v, table, fields, out, lse = residuals
    delta = backward_delta(out, do)
    args = (q, k, v, do, lse, delta, table, fields, block, flag, interpret)
    dk, dv = _dkv(*args)
    return _dq(*args), dk, dv, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: RowMeta, *,
                           block: int = 128, visual_attends_past_visual: bool = False,
                           interpret: bool = False) -> jax.Array:
    """Same contract as :func:`vist2_jax.kernels.chunked.xla_chunked_attention`
    (q: [B, S, H, D]; k, v: [B, S, KV, D]), differentiable in q, k, v.

    Any token order is exact (causality comes from positions); the visual-first order
    (:mod:`.reorder`) is what makes the table sparse. ``block`` must be a multiple of
    128 when compiled for TPU; any size works in interpret mode.
    """
    if not interpret and block % 128:
        raise ValueError(f"pallas_tpu block={block}: must be a multiple of 128 (the lane width "
                         "of v5p / v6e tiles) when compiled")
    seq = q.shape[1]
    prep = prepare(q, k, v, meta, block, visual_attends_past_visual)
    out = _attend(prep.q, prep.k, prep.v, prep.table, prep.fields, block,
                  visual_attends_past_visual, interpret)
    return jnp.swapaxes(out, 1, 2)[:, :seq]
