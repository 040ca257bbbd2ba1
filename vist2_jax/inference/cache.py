"""Static KV-cache layout and the chunk arithmetic of the three generation modes.

A cache row holds ``capacity`` slots: a visual region of ``visual_chunks * m`` slots
(finished chunk c, 1-based, lives at ``[(c-1)*m, c*m)``), then a text region of
``text_slots`` slots for the current chunk's text, then one trash slot that padding and
finished rows write to (always modality PAD, so never read). Slot metadata are the row
contract's (modality, chunk_id, segment_id, positions), so the training mask applies
unchanged to cache keys.

Positions and chunk ids are those of the equivalent training row (``pack_olm_row``):
chunk c's ``<|chunk|>`` marker sits at ``(c-1)*(L+1+m)``, its L tokens follow, then its
m visual tokens. ``text`` mode is a plain LLM: one chunk (id 0), positions 0.., no marker.

Modes, for a prompt of N tokens and M new tokens (the M-th is sampled, never fed):
  gcc: k = N // L prompt chunks are rendered; the current chunk's text is kept; each time
       it reaches L tokens it is rendered, encoded, its m visual tokens are written and
       its text slots freed. Finished chunks in the end: K = (N + M - 1) // L.
  pcc: the same prefill; the response is never compressed (the chunk just grows).
  text: every token is a text entry.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vist2_jax.kernels.mask import PAD, RowMeta
from vist2_jax.model.decoder import KVCache

MODES = ("gcc", "pcc", "text")
SEGMENT = 1  # every live entry belongs to document 1 (padding/free slots: PAD, segment 0)


def finished_chunks(mode: str, prompt_len: int, new_tokens: int, L: int) -> int:
    """Chunks held as visual tokens at the end of the generation (prefill + compressions)."""
    if mode == "text":
        return 0
    if mode == "pcc":
        return prompt_len // L
    return (prompt_len + new_tokens - 1) // L


def peak_entries(mode: str, prompt_len: int, new_tokens: int, L: int, m: int) -> int:
    """Analytic peak of live KV entries per row (per layer), for ``new_tokens >= 1``.

    text: N + M - 1. pcc: k*m + (1 + N - k*L) + (M - 1). gcc: the larger of the end state
    (K*m visual + marker + the last chunk's fed tokens) and the state just before the last
    compression ((K-1)*m + marker + L-1 tokens), when one happens during decoding.
    """
    n, fed = prompt_len, prompt_len + new_tokens - 1
    if mode == "text":
        return fed
    k = n // L
    if mode == "pcc":
        return k * m + 1 + fed - k * L
    K = finished_chunks(mode, n, new_tokens, L)
    end = K * m + 1 + fed - K * L
    before_last = (K - 1) * m + L if K > k else 0
    return max(end, before_last)


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Slot regions of a static cache; ``visual_chunks`` is the capacity set in chunks."""

    visual_chunks: int
    text_slots: int
    m: int

    @property
    def text_base(self) -> int:
        return self.visual_chunks * self.m

    @property
    def trash(self) -> int:
        return self.text_base + self.text_slots

    @property
    def capacity(self) -> int:
        return self.trash + 1

    def visual_slots(self, chunk: int) -> np.ndarray:
        if not 1 <= chunk <= self.visual_chunks:
            raise ValueError(f"chunk {chunk} exceeds the cache's {self.visual_chunks} visual chunks")
        return np.arange((chunk - 1) * self.m, chunk * self.m)

    def text_slot(self, index: int) -> int:
        if not 0 <= index < self.text_slots:
            raise ValueError(f"text entry {index} exceeds the cache's {self.text_slots} text slots")
        return self.text_base + index

    @classmethod
    def for_generation(cls, mode: str, prompt_lens, new_tokens: int, L: int, m: int,
                       capacity_chunks: int | None = None) -> "CacheLayout":
        """The smallest layout that holds every row's whole generation (full chunks)."""
        return cls.for_rows(mode, [n // L for n in prompt_lens], [n - (n // L) * L for n in prompt_lens],
                            new_tokens, L, m, capacity_chunks)

    @classmethod
    def for_rows(cls, mode: str, prompt_chunks, prompt_rest, new_tokens: int, L: int, m: int,
                 capacity_chunks: int | None = None) -> "CacheLayout":
        """The layout for rows whose prompts closed ``prompt_chunks`` chunks and left
        ``prompt_rest`` tokens of text; gcc reserves the generation's full chunks (a chunk
        closed early by the renderer grows the cache, :func:`grow_cache`)."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}; choose one of {', '.join(MODES)}")
        rows = list(zip(prompt_chunks, prompt_rest))
        if mode == "text":
            chunks, text = 0, max(k * L + r for k, r in rows) + new_tokens - 1
        elif mode == "pcc":
            chunks, text = max(k for k, _ in rows), max(1 + r for _, r in rows) + new_tokens - 1
        else:
            chunks, text = max(k + (r + new_tokens - 1) // L for k, r in rows), L  # marker + <= L-1 fed
        if capacity_chunks is not None:
            if capacity_chunks < chunks:
                raise ValueError(f"capacity of {capacity_chunks} chunks < the {chunks} needed")
            chunks = capacity_chunks
        return cls(chunks, max(text, 1), m)


def grow_cache(cache: KVCache, old: CacheLayout, new: CacheLayout) -> KVCache:
    """The same entries in a layout with more visual chunks: visual slots keep their index,
    the text region and the trash slot move up by the added visual slots."""
    def move(array, fill):
        shape = array.shape[:-1] + (new.capacity,) if array.ndim == 2 else \
            array.shape[:2] + (new.capacity,) + array.shape[3:]
        out = jnp.full(shape, fill, array.dtype)
        axis = 1 if array.ndim == 2 else 2
        take = lambda a, b: jax.lax.slice_in_dim(array, a, b, axis=axis)  # noqa: E731
        out = jax.lax.dynamic_update_slice_in_dim(out, take(0, old.text_base), 0, axis)
        return jax.lax.dynamic_update_slice_in_dim(out, take(old.text_base, old.capacity), new.text_base, axis)

    meta = RowMeta(move(cache.meta.modality, PAD), *(move(a, 0) for a in cache.meta[1:]))
    return KVCache(move(cache.k, 0), move(cache.v, 0), meta)


def empty_cache(layout: CacheLayout, batch: int, num_layers: int, kv_heads: int,
                head_dim: int, dtype) -> KVCache:
    shape = (num_layers, batch, layout.capacity, kv_heads, head_dim)
    meta = RowMeta(jnp.full((batch, layout.capacity), PAD, jnp.int8),
                   *(jnp.zeros((batch, layout.capacity), jnp.int32) for _ in range(3)))  # distinct buffers (donated)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), meta)


def prefill_pieces(length: int, prefill_chunk: int) -> tuple[int, int]:
    """Chunked prefill: (number of pieces, entries per piece, a multiple of 8) covering
    ``length`` entries with pieces of at most about ``prefill_chunk``."""
    pieces = -(-length // prefill_chunk)
    piece = -(-length // pieces)
    return pieces, piece + (-piece % 8)


def prefill_length(mode: str, prompt_len: int, L: int, m: int) -> int:
    """Entries the prefill writes: the prompt's text, or k*m visual + marker + remainder."""
    if mode == "text":
        return prompt_len
    k = prompt_len // L
    return k * m + 1 + prompt_len - k * L


def kv_bytes(entries: int, num_layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of K and V for ``entries`` cache entries across all layers."""
    return 2 * entries * num_layers * kv_heads * head_dim * dtype_bytes
