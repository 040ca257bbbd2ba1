"""Block classification of the vision-as-memory mask (docs/design.md §3), in XLA.

A block-sparse kernel tiles the [S, S] mask into (q block, kv block) pairs and needs to
know, before it runs, which pairs it can skip (EMPTY), which it can run without mask
arithmetic (FULL) and which need the per-element rule (PARTIAL). Segment ids never make a
block skippable in Splash / cuDNN, so we classify from per-block summaries of the row
metadata instead: for each block and each modality (text, visual) the min/max segment id
and the lexicographic min/max of (segment, position) and (segment, chunk), plus whether
the block holds padding.

Soundness is by construction: a pair is EMPTY only if a necessary condition for some
allowed element fails, and FULL only if a sufficient condition for every element holds,
so the classes can only err towards PARTIAL. Tightness relies on segments being
contiguous and chunk ids / positions rising inside each modality of a document, which
holds for both the natural and the visual-first order (:mod:`vist2_jax.kernels.reorder`).

Padding attends only to itself, so a pair with padding is never FULL and is non-EMPTY
only when the padding index ranges of the two blocks overlap (the diagonal).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vist2_jax.kernels.mask import PAD, TEXT, VISUAL, RowMeta

EMPTY, PARTIAL, FULL = 0, 1, 2
_BIG = jnp.iinfo(jnp.int32).max
_SMALL = jnp.iinfo(jnp.int32).min


class Lex(NamedTuple):
    """A lexicographic (segment, value) bound per block; each [B, nblocks]."""

    seg: jax.Array
    val: jax.Array


class ModalitySummary(NamedTuple):
    """Summaries over the tokens of one modality in each block; each [B, nblocks]."""

    present: jax.Array
    seg_min: jax.Array
    seg_max: jax.Array
    pos_lo: Lex    # lexicographic min of (segment, position)
    pos_hi: Lex    # lexicographic max of (segment, position)
    chunk_lo: Lex  # lexicographic min of (segment, chunk)
    chunk_hi: Lex  # lexicographic max of (segment, chunk)


class BlockSummary(NamedTuple):
    text: ModalitySummary
    visual: ModalitySummary
    has_pad: jax.Array  # [B, nblocks]
    start: jax.Array    # first token index of each block, [nblocks]
    size: int


class BlockTable(NamedTuple):
    """Compacted visit lists. ``kv_blocks[b, i, :kv_counts[b, i]]`` are the kv blocks q
    block i visits, ascending, with ``kv_classes`` PARTIAL or FULL; entries past the count
    repeat the last valid one (a kernel re-using it fetches nothing new). ``q_blocks`` /
    ``q_counts`` / ``q_classes`` are the transpose (per kv block, the q blocks that visit
    it), for a backward pass accumulating dK / dV."""

    kv_blocks: jax.Array
    kv_counts: jax.Array
    kv_classes: jax.Array
    q_blocks: jax.Array
    q_counts: jax.Array
    q_classes: jax.Array


def _lex_min(seg, val, valid):
    """Per block (last axis) lexicographic min of (seg, val) over valid tokens."""
    seg_min = jnp.min(jnp.where(valid, seg, _BIG), axis=-1)
    at_min = valid & (seg == seg_min[..., None])
    return Lex(seg_min, jnp.min(jnp.where(at_min, val, _BIG), axis=-1))


def _lex_max(seg, val, valid):
    seg_max = jnp.max(jnp.where(valid, seg, _SMALL), axis=-1)
    at_max = valid & (seg == seg_max[..., None])
    return Lex(seg_max, jnp.max(jnp.where(at_max, val, _SMALL), axis=-1))


def _lex_le(a: Lex, b: Lex):
    return (a.seg < b.seg) | ((a.seg == b.seg) & (a.val <= b.val))


def _lex_lt(a: Lex, b: Lex):
    return (a.seg < b.seg) | ((a.seg == b.seg) & (a.val < b.val))


def _blocked(x, size):
    """[B, S] -> [B, nblocks, size], zero-filling the tail (masked out by modality -1)."""
    seq = x.shape[1]
    extra = -seq % size
    if extra:
        x = jnp.pad(x, ((0, 0), (0, extra)))
    return x.reshape(x.shape[0], -1, size)


def summarize(meta: RowMeta, size: int) -> BlockSummary:
    """Per-block min/max summaries of the row metadata for block size ``size``.

    A tail shorter than ``size`` is filled with tokens that are neither text nor visual
    (they allow nothing) and the block is marked as holding padding, so it is never FULL.
    """
    seq = meta.modality.shape[1]
    modality = meta.modality.astype(jnp.int32)
    extra = -seq % size
    if extra:
        modality = jnp.pad(modality, ((0, 0), (0, extra)), constant_values=-1)
    modality = modality.reshape(modality.shape[0], -1, size)
    seg, pos, chunk = (_blocked(a.astype(jnp.int32), size)
                       for a in (meta.segment_id, meta.positions, meta.chunk_id))

    def one(kind):
        valid = modality == kind
        return ModalitySummary(
            present=valid.any(-1),
            seg_min=jnp.min(jnp.where(valid, seg, _BIG), axis=-1),
            seg_max=jnp.max(jnp.where(valid, seg, _SMALL), axis=-1),
            pos_lo=_lex_min(seg, pos, valid), pos_hi=_lex_max(seg, pos, valid),
            chunk_lo=_lex_min(seg, chunk, valid), chunk_hi=_lex_max(seg, chunk, valid))

    has_pad = ((modality == PAD) | (modality == -1)).any(-1)
    start = jnp.arange(modality.shape[1], dtype=jnp.int32) * size
    return BlockSummary(one(TEXT), one(VISUAL), has_pad, start, size)


def _pair(a, b):
    """Broadcast a per-q-block [B, nq] and a per-kv-block [B, nk] array to [B, nq, nk]."""
    return a[:, :, None], b[:, None, :]


def classify(meta: RowMeta, block_q: int, block_k: int | None = None,
             visual_attends_past_visual: bool = False) -> jax.Array:
    """EMPTY / PARTIAL / FULL for every (q block, kv block) pair: int8 [B, nq, nk]."""
    block_k = block_q if block_k is None else block_k
    qs, ks = summarize(meta, block_q), summarize(meta, block_k)
    seq = meta.modality.shape[1]

    def possible(qm: ModalitySummary, km: ModalitySummary, chunk_rel):
        """Necessary condition for any allowed (q of qm, k of km) element."""
        q = jax.tree.map(lambda a: a[:, :, None], qm)
        k = jax.tree.map(lambda a: a[:, None, :], km)
        seg_overlap = (k.seg_min <= q.seg_max) & (q.seg_min <= k.seg_max)
        causal = _lex_le(k.pos_lo, q.pos_hi)
        if chunk_rel == "same":
            chunks = _lex_le(k.chunk_lo, q.chunk_hi) & _lex_le(q.chunk_lo, k.chunk_hi)
        elif chunk_rel == "earlier":
            chunks = _lex_lt(k.chunk_lo, q.chunk_hi)
        else:  # same or earlier
            chunks = _lex_le(k.chunk_lo, q.chunk_hi)
        return q.present & k.present & seg_overlap & causal & chunks

    vv_rel = "same_or_earlier" if visual_attends_past_visual else "same"
    tt = possible(qs.text, ks.text, "same")
    tv = possible(qs.text, ks.visual, "earlier")
    vv = possible(qs.visual, ks.visual, vv_rel)
    q_pad, k_pad = _pair(qs.has_pad, ks.has_pad)
    q_lo, k_lo = qs.start[:, None], ks.start[None, :]
    index_overlap = (k_lo < jnp.minimum(q_lo + block_q, seq)) & (q_lo < k_lo + block_k)
    pad_diag = q_pad & k_pad & index_overlap[None]
    nonempty = tt | tv | vv | pad_diag

    # Sufficient condition for every element allowed: no padding, one segment, every key
    # not after every query, and for each present modality pair its rule for all pairs.
    q = qs._replace(text=jax.tree.map(lambda a: a[:, :, None], qs.text),
                    visual=jax.tree.map(lambda a: a[:, :, None], qs.visual))
    k = ks._replace(text=jax.tree.map(lambda a: a[:, None, :], ks.text),
                    visual=jax.tree.map(lambda a: a[:, None, :], ks.visual))
    q_seg = jnp.where(q.text.present, q.text.seg_min, q.visual.seg_min)
    k_seg = jnp.where(k.text.present, k.text.seg_min, k.visual.seg_min)
    one_segment = ((~q.text.present | (q.text.seg_min == q.text.seg_max) & (q.text.seg_min == q_seg))
                   & (~q.visual.present | (q.visual.seg_min == q.visual.seg_max)
                      & (q.visual.seg_min == q_seg))
                   & (~k.text.present | (k.text.seg_min == k.text.seg_max) & (k.text.seg_min == k_seg))
                   & (~k.visual.present | (k.visual.seg_min == k.visual.seg_max)
                      & (k.visual.seg_min == k_seg))
                   & (q_seg == k_seg))
    # Inside one segment the lexicographic bounds are plain position / chunk bounds.
    k_pos_max = jnp.maximum(jnp.where(k.text.present, k.text.pos_hi.val, _SMALL),
                            jnp.where(k.visual.present, k.visual.pos_hi.val, _SMALL))
    q_pos_min = jnp.minimum(jnp.where(q.text.present, q.text.pos_lo.val, _BIG),
                            jnp.where(q.visual.present, q.visual.pos_lo.val, _BIG))
    causal_all = k_pos_max <= q_pos_min
    qt_lo, qt_hi = q.text.chunk_lo.val, q.text.chunk_hi.val
    kt_lo, kt_hi = k.text.chunk_lo.val, k.text.chunk_hi.val
    qv_lo, qv_hi = q.visual.chunk_lo.val, q.visual.chunk_hi.val
    kv_lo, kv_hi = k.visual.chunk_lo.val, k.visual.chunk_hi.val
    tt_all = ~(q.text.present & k.text.present) | ((qt_lo == qt_hi) & (kt_lo == kt_hi) & (qt_lo == kt_lo))
    tv_all = ~(q.text.present & k.visual.present) | (kv_hi < qt_lo)
    vt_all = ~(q.visual.present & k.text.present)
    if visual_attends_past_visual:
        vv_all_ok = kv_hi <= qv_lo
    else:
        vv_all_ok = (qv_lo == qv_hi) & (kv_lo == kv_hi) & (qv_lo == kv_lo)
    vv_all = ~(q.visual.present & k.visual.present) | vv_all_ok
    any_q = q.text.present | q.visual.present
    any_k = k.text.present | k.visual.present
    full = (~q_pad & ~k_pad & any_q & any_k & one_segment & causal_all
            & tt_all & tv_all & vt_all & vv_all)
    return jnp.where(full, FULL, jnp.where(nonempty, PARTIAL, EMPTY)).astype(jnp.int8)


def exact_classes(meta: RowMeta, block_q: int, block_k: int | None = None,
                  visual_attends_past_visual: bool = False, *, with_count: bool = False):
    """The true class of every block pair from the reference rule (tests, bench), one q
    block of mask rows at a time so S=8192 stays cheap. With ``with_count``, also the
    number of allowed elements per row [B].

    A tail shorter than a block counts as disallowed elements (as a kernel sees it).
    """
    from vist2_jax.kernels.chunked import chunk_mask

    block_k = block_q if block_k is None else block_k
    batch, seq = meta.modality.shape
    nq, extra_k = -(-seq // block_q), -seq % block_k
    index = jnp.arange(nq * block_q, dtype=jnp.int32).reshape(nq, block_q)
    fill = nq * block_q - seq
    q_meta = RowMeta(*(jnp.pad(a, ((0, 0), (0, fill)), constant_values=-1 if n == 0 else 0)
                       for n, a in enumerate(meta)))
    q_meta = RowMeta(*(jnp.moveaxis(a.reshape(batch, nq, block_q), 1, 0) for a in q_meta))

    def row_block(x):
        m, idx = x
        mask = chunk_mask(m, idx, meta, visual_attends_past_visual)  # [B, bq, S]
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, extra_k)))
        blocks = mask.reshape(batch, block_q, -1, block_k)
        classes = jnp.where(blocks.all((1, 3)), FULL,
                            jnp.where(blocks.any((1, 3)), PARTIAL, EMPTY)).astype(jnp.int8)
        return classes, mask.sum((1, 2))

    classes, counts = jax.lax.map(row_block, (q_meta, index))
    classes = jnp.moveaxis(classes, 0, 1)
    return (classes, counts.sum(0)) if with_count else classes


def soundness_violations(classes: jax.Array, exact: jax.Array) -> jax.Array:
    """Pairs where ``classes`` is unsound against ``exact``: claimed EMPTY but some element
    is allowed, or claimed FULL but some element is not. Bool, same shape."""
    return ((classes == EMPTY) & (exact != EMPTY)) | ((classes == FULL) & (exact != FULL))


def _compact(classes: jax.Array):
    """Per row of [B, n, m] classes: the non-empty column indices ascending, padded with
    the last valid one, their count and their classes."""
    m = classes.shape[-1]
    cols = jnp.arange(m, dtype=jnp.int32)
    nonempty = classes != EMPTY
    order = jnp.argsort(jnp.where(nonempty, cols, m + cols), axis=-1, stable=True).astype(jnp.int32)
    counts = nonempty.sum(-1).astype(jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    order = jnp.where(cols < counts[..., None], order, last)
    return order, counts, jnp.take_along_axis(classes, order, axis=-1)


def block_table(classes: jax.Array) -> BlockTable:
    """Compacted forward (per q block) and transposed (per kv block) visit lists."""
    kv_blocks, kv_counts, kv_classes = _compact(classes)
    q_blocks, q_counts, q_classes = _compact(jnp.swapaxes(classes, 1, 2))
    return BlockTable(kv_blocks, kv_counts, kv_classes, q_blocks, q_counts, q_classes)
