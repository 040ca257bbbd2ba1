"""``xla_chunked`` attention: the vision-as-memory rule in pure XLA, memory-bounded in S.

The dense path materialises the [B, S, S] mask and [B, H, S, S] logits. Here the queries
are processed ``chunk_size`` at a time (``lax.map``); each chunk builds its own
[B, chunk, S] mask from the row metadata and does an exact softmax over all keys, so the
peak is O(B * H * chunk * S). The chunk body is rematerialised (``jax.checkpoint``), so
the backward pass also holds one chunk's logits at a time rather than all of them.
GQA groups query heads per kv head; K/V are never repeated in memory. The arithmetic per
row matches :func:`vist2_jax.kernels.attention.dense_attention` (fp32 logits, the same
finite -inf, full-precision dots for fp32 inputs), so results agree to rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vist2_jax.kernels.precision import dot_precision
from vist2_jax.kernels.mask import PAD, RowMeta, vision_memory_mask

_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def chunk_mask(q_meta: RowMeta, q_index: jax.Array, kv_meta: RowMeta,
               visual_attends_past_visual: bool) -> jax.Array:
    """[B, Cq, T] mask of a block of queries (row indices ``q_index`` [Cq]) over all keys:
    the reference rule, with a padding query attending only to the key at its own index."""
    allowed = vision_memory_mask(q_meta, visual_attends_past_visual, kv_meta=kv_meta)
    k_index = jnp.arange(kv_meta.modality.shape[1], dtype=jnp.int32)
    itself = q_index[:, None] == k_index[None, :]
    return jnp.where((q_meta.modality == PAD)[:, :, None], itself[None], allowed)


def xla_chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: RowMeta, *,
                          visual_attends_past_visual: bool = False,
                          chunk_size: int = 512) -> jax.Array:
    """Self-attention over one packed row, ``chunk_size`` queries at a time.

    q: [B, S, H, D]; k, v: [B, S, KV, D]; meta: RowMeta of [B, S]. Returns [B, S, H, D].
    S need not be a multiple of ``chunk_size``: the tail chunk is filled with padding
    queries whose rows are dropped.
    """
    batch, seq, heads, dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    chunk = min(chunk_size, seq)
    num_chunks = -(-seq // chunk)
    extra = num_chunks * chunk - seq

    def pad_seq(x, value=0):
        return jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2), constant_values=value)

    q_meta = RowMeta(pad_seq(meta.modality, PAD), pad_seq(meta.chunk_id),
                     pad_seq(meta.segment_id), pad_seq(meta.positions))
    qg = pad_seq(q).reshape(batch, num_chunks, chunk, kv_heads, group, dim)
    scale = dim ** -0.5
    precision = dot_precision(q.dtype)

    def to_chunks(x):  # [B, num_chunks * chunk] -> [num_chunks, B, chunk]
        return jnp.moveaxis(x.reshape(batch, num_chunks, chunk), 1, 0)

    xs = (jnp.moveaxis(qg, 1, 0), RowMeta(*(to_chunks(a) for a in q_meta)),
          jnp.arange(num_chunks * chunk, dtype=jnp.int32).reshape(num_chunks, chunk))

    @jax.checkpoint
    def body(x):
        q_chunk, m_chunk, index = x
        mask = chunk_mask(m_chunk, index, meta, visual_attends_past_visual)
        logits = jnp.einsum("bskgd,btkd->bkgst", q_chunk, k, preferred_element_type=jnp.float32,
                            precision=precision)
        logits = jnp.where(mask[:, None, None], logits * scale, _NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgst,btkd->bskgd", probs, v, precision=precision)

    out = jax.lax.map(body, xs)  # [num_chunks, B, chunk, KV, G, D]
    out = jnp.moveaxis(out, 0, 1).reshape(batch, num_chunks * chunk, heads, dim)
    return out[:, :seq]
