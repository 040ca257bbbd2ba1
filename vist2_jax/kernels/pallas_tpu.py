"""Block-sparse vision-as-memory attention, forward only, as a Pallas TPU (Mosaic) kernel.

The compacted kv-block table of :func:`vist2_jax.kernels.blocks.block_table` is
scalar-prefetched and drives the K/V index maps, so only the visited kv blocks are ever
fetched; visits past a q block's count repeat the last block (no new DMA) and skip the
compute. FULL pairs use no mask; PARTIAL pairs compute the rule from per-token metadata
(segment, position, modality, chunk) inside the kernel, as in :mod:`.mask`. Online
softmax in fp32; GQA maps query head h to kv head ``h // group`` (K/V not repeated).

Tested on CPU in interpret mode against the dense reference; a backward pass (walking
the transposed table) is not written yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from vist2_jax.kernels.blocks import FULL, block_table, classify
from vist2_jax.kernels.mask import PAD, TEXT, VISUAL, RowMeta

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def _rule(qm, km, q_index, k_index, visual_attends_past_visual):
    """The mask rule on a [bq, bk] tile; qm: [bq, 4] columns, km: [4, bk] rows, fields
    (modality, chunk, segment, position)."""
    q_mod, q_chunk, q_seg, q_pos = (qm[:, f:f + 1] for f in range(4))
    k_mod, k_chunk, k_seg, k_pos = (km[f:f + 1, :] for f in range(4))
    same_chunk, earlier = q_chunk == k_chunk, k_chunk < q_chunk
    visual_reach = (same_chunk | earlier) if visual_attends_past_visual else same_chunk
    allowed = ((q_seg == k_seg) & (k_pos <= q_pos)
               & (((q_mod == TEXT) & (k_mod == TEXT) & same_chunk)
                  | ((q_mod == TEXT) & (k_mod == VISUAL) & earlier)
                  | ((q_mod == VISUAL) & (k_mod == VISUAL) & visual_reach)))
    return jnp.where(q_mod == PAD, q_index == k_index, allowed)


def _kernel(kv_blocks, kv_counts, kv_classes, q_ref, k_ref, v_ref, qm_ref, km_ref, o_ref,
            m_sc, l_sc, acc_sc, *, block_q, block_k, scale, visual_attends_past_visual):
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, _NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < kv_counts[b, i])
    def _visit():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * scale
        q_index = i * block_q + jax.lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
        k_index = kv_blocks[b, i, j] * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        rule = _rule(qm_ref[...], km_ref[...], q_index, k_index, visual_attends_past_visual)
        mask = rule | (kv_classes[b, i, j] == FULL)
        s = jnp.where(mask, s, _NEG_INF)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(v.dtype), v,
                                                    preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: RowMeta, *,
                           block: int = 128, visual_attends_past_visual: bool = False,
                           interpret: bool = False) -> jax.Array:
    """Same contract as :func:`vist2_jax.kernels.chunked.xla_chunked_attention`.

    The row is extended with padding tokens to a multiple of ``block`` (they attend only
    themselves and nothing reads them) and the extra rows are dropped.
    """
    batch, seq, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    extra = -seq % block
    if extra:
        def pad(x, value=0):
            return jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2), constant_values=value)
        q, k, v = pad(q), pad(k), pad(v)
        meta = RowMeta(pad(meta.modality, PAD), pad(meta.chunk_id), pad(meta.segment_id),
                       pad(meta.positions))
    size = seq + extra
    nq = size // block
    table = block_table(classify(meta, block, block, visual_attends_past_visual))
    fields = jnp.stack([a.astype(jnp.int32) for a in meta], axis=1)  # [B, 4, S]
    q_t, k_t, v_t = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, heads, S, D]

    def kv_map(b, h, i, j, kv_blocks, kv_counts, kv_classes):
        return b, jax.lax.div(h, group), kv_blocks[b, i, j], 0  # no floor_divide: h >= 0

    def km_map(b, h, i, j, kv_blocks, kv_counts, kv_classes):
        return b, 0, kv_blocks[b, i, j]

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3, grid=(batch, heads, nq, nq),
        in_specs=[
            pl.BlockSpec((None, None, block, dim), lambda b, h, i, j, *_: (b, h, i, 0)),
            pl.BlockSpec((None, None, block, dim), kv_map),
            pl.BlockSpec((None, None, block, dim), kv_map),
            pl.BlockSpec((None, block, 4), lambda b, h, i, j, *_: (b, i, 0)),
            pl.BlockSpec((None, 4, block), km_map),
        ],
        out_specs=pl.BlockSpec((None, None, block, dim), lambda b, h, i, j, *_: (b, h, i, 0)),
        scratch_shapes=[pltpu.VMEM((block, 1), jnp.float32), pltpu.VMEM((block, 1), jnp.float32),
                        pltpu.VMEM((block, dim), jnp.float32)])
    kernel = functools.partial(_kernel, block_q=block, block_k=block, scale=dim ** -0.5,
                               visual_attends_past_visual=visual_attends_past_visual)
    out = pl.pallas_call(
        kernel, grid_spec=grid_spec, interpret=interpret,
        out_shape=jax.ShapeDtypeStruct(q_t.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
    )(table.kv_blocks, table.kv_counts, table.kv_classes.astype(jnp.int32),
      q_t, k_t, v_t, jnp.swapaxes(fields, 1, 2), fields)
    return jnp.swapaxes(out, 1, 2)[:, :seq]
