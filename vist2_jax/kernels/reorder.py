"""The visual-first permutation of a packed row (docs/design.md §3).

In the natural order ``[T1][V1][T2]...`` nearly every kv block holds a few visual tokens,
so block-sparse attention can skip little. Moving, inside each document, all visual
tokens (by chunk) before all text tokens gathers the visual memory into a few kv blocks
that later text reads in full, and leaves the text chunks on a narrow diagonal band.
Documents stay in order and padding goes to the end. The mask reads causality from
``positions``, so it is invariant: ``mask(permuted)[i, j] == mask[perm[i], perm[j]]``.

The permutation is applied once per row (to metadata and activations) and undone exactly
with its inverse; both are int32 index arrays built with jnp, so this jits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vist2_jax.kernels.mask import PAD, VISUAL, RowMeta


def visual_first_permutation(meta: RowMeta) -> tuple[jax.Array, jax.Array]:
    """``(perm, inverse)``, each int32 [B, S]: new index i holds old token ``perm[b, i]``,
    and old token j goes to ``inverse[b, j]``.

    A document is a maximal run of equal segment id among non-padding tokens; sort keys,
    most significant first: padding last, document start, visual before text, chunk id,
    original index (so the sort is a stable, total order).
    """
    batch, seq = meta.modality.shape
    index = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    seg = meta.segment_id.astype(jnp.int32)
    starts = jnp.concatenate([jnp.ones((batch, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    doc_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    is_pad = meta.modality == PAD
    group = jnp.where(meta.modality == VISUAL, 0, 1)
    doc_key = jnp.where(is_pad, seq, doc_start)  # all padding after every document
    chunk = jnp.where(is_pad, 0, meta.chunk_id.astype(jnp.int32))
    group = jnp.where(is_pad, 0, group)
    # jnp.lexsort: the last key is the primary one.
    perm = jnp.lexsort((index, chunk, group, doc_key), axis=-1).astype(jnp.int32)
    inverse = jnp.zeros_like(perm).at[jnp.arange(batch)[:, None], perm].set(index)
    return perm, inverse


def permute(x: jax.Array, perm: jax.Array) -> jax.Array:
    """Gather ``x`` [B, S, ...] along the sequence axis: ``out[b, i] = x[b, perm[b, i]]``.
    With the inverse it undoes a permutation exactly."""
    idx = perm.reshape(perm.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)


def permute_meta(meta: RowMeta, perm: jax.Array) -> RowMeta:
    return RowMeta(*(permute(a, perm) for a in meta))
