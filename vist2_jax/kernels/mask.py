"""The vision-as-memory mask (docs/design.md §3), computed from per-token row metadata.

This pure-jnp rule is the reference every attention kernel is tested against.
For query q and key k of the same segment with ``position[k] <= position[q]``:

* text q, text k: allowed iff same chunk (causal inside the chunk);
* text q, visual k: allowed iff ``chunk[k] < chunk[q]`` (the past survives only as pictures);
* visual q, visual k: allowed iff same chunk, or any earlier chunk when
  ``visual_attends_past_visual``;
* visual q, text k: never.

Nothing crosses segments; a padding token attends only to itself and nothing attends
to padding, so no softmax row is empty. Causality is read from ``positions`` (continuous
inside a document), not from the physical index, so the rule survives a permutation of
the row (a kernel may reorder tokens, e.g. visual-first).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vist2_jax.row_contract import PAD, TEXT, VISUAL


class RowMeta(NamedTuple):
    """The per-token metadata of a packed row that attention needs; each [B, S]."""

    modality: jax.Array
    chunk_id: jax.Array
    segment_id: jax.Array
    positions: jax.Array

    @classmethod
    def from_batch(cls, batch) -> "RowMeta":
        return cls(batch["modality"], batch["chunk_id"], batch["segment_id"], batch["positions"])

    @classmethod
    def text_only(cls, positions: jax.Array, segment_id: jax.Array | None = None) -> "RowMeta":
        """Plain causal text attention: every token text, one chunk."""
        segment_id = jnp.zeros_like(positions) if segment_id is None else segment_id
        return cls(jnp.full(positions.shape, TEXT, jnp.int8), jnp.zeros_like(positions),
                   segment_id, positions)


def vision_memory_mask(meta: RowMeta, visual_attends_past_visual: bool = False,
                       kv_meta: RowMeta | None = None) -> jax.Array:
    """Boolean mask [B, Sq, Sk]: True where query q may attend key k.

    ``kv_meta`` defaults to ``meta`` (self-attention over one row); a different one
    describes the keys of a KV cache.
    """
    kv_meta = meta if kv_meta is None else kv_meta

    def q(a):
        return a[:, :, None]

    def k(a):
        return a[:, None, :]

    q_mod, k_mod = q(meta.modality), k(kv_meta.modality)
    same_segment = q(meta.segment_id) == k(kv_meta.segment_id)
    not_after = k(kv_meta.positions) <= q(meta.positions)
    same_chunk = q(meta.chunk_id) == k(kv_meta.chunk_id)
    earlier_chunk = k(kv_meta.chunk_id) < q(meta.chunk_id)

    text_text = (q_mod == TEXT) & (k_mod == TEXT) & same_chunk
    text_visual = (q_mod == TEXT) & (k_mod == VISUAL) & earlier_chunk
    visual_reach = (same_chunk | earlier_chunk) if visual_attends_past_visual else same_chunk
    visual_visual = (q_mod == VISUAL) & (k_mod == VISUAL) & visual_reach
    allowed = same_segment & not_after & (text_text | text_visual | visual_visual)

    if kv_meta is meta:
        size = meta.modality.shape[1]
        itself = jnp.eye(size, dtype=bool)[None]
        return jnp.where(q_mod == PAD, itself, allowed)
    return allowed
