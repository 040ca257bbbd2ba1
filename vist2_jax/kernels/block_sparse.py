"""Pieces shared by the block-sparse Pallas kernels (TPU: :mod:`.pallas_tpu`, GPU:
:mod:`.pallas_gpu`): the in-kernel mask rule, the row preparation (padding to whole
blocks, block table, metadata fields, head-major layout) and the XLA side of the
backward pass (``delta = rowsum(dO * O)``).

Both kernels compute, per visited (q block, kv block) pair, the flash-attention
recurrences; FULL pairs skip the mask arithmetic, PARTIAL pairs evaluate :func:`rule`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vist2_jax.kernels.blocks import BlockTable, block_table, classify
from vist2_jax.kernels.mask import PAD, TEXT, VISUAL, RowMeta

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def rule(q_fields, k_fields, q_index, k_index, visual_attends_past_visual: bool):
    """The reference mask (:mod:`.mask`) on a tile. ``q_fields`` / ``k_fields`` are
    (modality, chunk, segment, position) arrays already shaped to broadcast against each
    other (a column and a row); the indices are the physical token indices, used only by
    a padding query to find itself."""
    q_mod, q_chunk, q_seg, q_pos = q_fields
    k_mod, k_chunk, k_seg, k_pos = k_fields
    same_chunk, earlier = q_chunk == k_chunk, k_chunk < q_chunk
    visual_reach = (same_chunk | earlier) if visual_attends_past_visual else same_chunk
    allowed = ((q_seg == k_seg) & (k_pos <= q_pos)
               & (((q_mod == TEXT) & (k_mod == TEXT) & same_chunk)
                  | ((q_mod == TEXT) & (k_mod == VISUAL) & earlier)
                  | ((q_mod == VISUAL) & (k_mod == VISUAL) & visual_reach)))
    # ``allowed`` is False for a padding query; an or, not a boolean select (older
    # Mosaic rejects a select between i1 vectors).
    return allowed | ((q_mod == PAD) & (q_index == k_index))


class Prepared(NamedTuple):
    q: jax.Array       # [B, H, S', D], S' = S rounded up to whole blocks
    k: jax.Array       # [B, KV, S', D]
    v: jax.Array       # [B, KV, S', D]
    table: BlockTable  # forward lists and their transpose
    fields: jax.Array  # int32 [B, 4, S']: modality, chunk, segment, position


def prepare(q, k, v, meta: RowMeta, block: int, visual_attends_past_visual: bool) -> Prepared:
    """Extends the row with padding tokens to whole blocks (they attend only themselves
    and nothing reads them, so real rows are unchanged), classifies the block pairs and
    moves heads before the sequence."""
    extra = -q.shape[1] % block
    if extra:
        def pad(x, value=0):
            return jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2),
                           constant_values=value)
        q, k, v = pad(q), pad(k), pad(v)
        meta = RowMeta(pad(meta.modality, PAD), pad(meta.chunk_id), pad(meta.segment_id),
                       pad(meta.positions))
    table = block_table(classify(meta, block, block, visual_attends_past_visual))
    table = BlockTable(*(a.astype(jnp.int32) for a in table))
    fields = jnp.stack([a.astype(jnp.int32) for a in meta], axis=1)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    return Prepared(q, k, v, table, fields)


def backward_delta(out: jax.Array, d_out: jax.Array) -> jax.Array:
    """``rowsum(dO * O)`` in fp32, [B, H, S']: the softmax-gradient correction."""
    return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
