"""The vision-as-memory mask in PyTorch (docs/design.md §3), the same rule as
``vist2_jax/kernels/mask.py``, over per-entry metadata; no JAX import."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from vist2_jax.row_contract import PAD, TEXT, VISUAL


class Meta(NamedTuple):
    """Per-entry metadata (each [B, S] long): the row contract's modality, chunk, segment, position."""

    modality: torch.Tensor
    chunk: torch.Tensor
    segment: torch.Tensor
    position: torch.Tensor

    @classmethod
    def of(cls, modality, chunk, position, segment=None, device=None) -> "Meta":
        """One row of entries (segment 1 unless given)."""
        def as_long(a):
            return torch.as_tensor(np.asarray(a), dtype=torch.long, device=device).reshape(1, -1)

        modality = as_long(modality)
        segment = torch.ones_like(modality) if segment is None else as_long(segment)
        return cls(modality, as_long(chunk), segment, as_long(position))

    @classmethod
    def from_batch(cls, batch, device=None) -> "Meta":
        names = ("modality", "chunk_id", "segment_id", "positions")
        return cls(*(torch.as_tensor(np.asarray(batch[n]), dtype=torch.long, device=device) for n in names))

    def cat(self, other: "Meta") -> "Meta":
        return Meta(*(torch.cat([a, b], dim=1) for a, b in zip(self, other)))

    def take(self, count: int) -> "Meta":
        return Meta(*(a[:, :count] for a in self))


def vision_memory_mask(q: Meta, k: Meta, visual_attends_past_visual: bool = False,
                       self_attention: bool = False) -> torch.Tensor:
    """bool [B, Sq, Sk], True where query q may read key k (design §3; the same rule as
    ``vist2_jax/kernels/mask.py``): causal by position inside a segment; text reads its own
    chunk's text and earlier chunks' visual tokens; visual reads its own chunk's visual
    tokens (or earlier chunks' with the flag); padding reads only itself."""
    qm, km = q.modality[:, :, None], k.modality[:, None, :]
    same_segment = q.segment[:, :, None] == k.segment[:, None, :]
    not_after = k.position[:, None, :] <= q.position[:, :, None]
    same_chunk = q.chunk[:, :, None] == k.chunk[:, None, :]
    earlier = k.chunk[:, None, :] < q.chunk[:, :, None]
    text_text = (qm == TEXT) & (km == TEXT) & same_chunk
    text_visual = (qm == TEXT) & (km == VISUAL) & earlier
    reach = (same_chunk | earlier) if visual_attends_past_visual else same_chunk
    visual_visual = (qm == VISUAL) & (km == VISUAL) & reach
    allowed = same_segment & not_after & (text_text | text_visual | visual_visual)
    if self_attention:
        itself = torch.eye(allowed.shape[1], dtype=torch.bool, device=allowed.device)[None]
        allowed = torch.where(qm == PAD, itself, allowed)
    return allowed


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool [B, Sq, Sk] -> the float [B, 1, Sq, Sk] mask HF attention adds to its scores."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)[:, None]
