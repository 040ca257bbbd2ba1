"""Model FLOPs of a training step, counted analytically from the real shapes.

Counted: every matmul of the ViT (patch embedding, attention, MLP), the aligner, and the
decoder (Qwen3's explicit head_dim, GQA projections, SwiGLU, LM head); attention scores
and values only over the pairs the vision-as-memory mask allows, counted per row from
the metadata (not full causal attention). Backward costs one forward for activation
gradients (where something trainable lies below) plus one for weight gradients (where
the component is trainable), so frozen stages are not over-counted. Only the real image
slots count. A multiply-add is 2 FLOPs.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from vist2_jax.config.schema import Config
from vist2_jax.model.flops import (aligner_flops, attention_flops, decoder_token_flops, lm_head_flops,
                                   vision_flops)

from vist2_jax.row_contract import TEXT, VISUAL


def attended_pairs(modality: np.ndarray, chunk_id: np.ndarray, segment_id: np.ndarray,
                   visual_attends_past_visual: bool = False) -> int:
    """Number of (q, k) pairs the mask allows over non-padding queries, in O(B*S).

    Relies on the row contract: positions increase along each document, so "k not after
    q" is the physical order; text of a chunk is contiguous per span.
    """
    total = 0
    for mod, chunk, seg in zip(np.asarray(modality), np.asarray(chunk_id), np.asarray(segment_id)):
        seen_text: dict[tuple[int, int], int] = {}
        seen_visual: dict[tuple[int, int], int] = {}
        visual_before: dict[int, list[tuple[int, int]]] = {}
        for m, c, s in zip(mod.tolist(), chunk.tolist(), seg.tolist()):
            key = (s, c)
            if m == TEXT:
                seen_text[key] = seen_text.get(key, 0) + 1
                past = sum(n for cc, n in visual_before.get(s, {}).items() if cc < c)
                total += seen_text[key] + past
            elif m == VISUAL:
                seen_visual[key] = seen_visual.get(key, 0) + 1
                per_seg = visual_before.setdefault(s, {})
                per_seg[c] = per_seg.get(c, 0) + 1
                past = sum(n for cc, n in per_seg.items() if cc < c) if visual_attends_past_visual else 0
                total += seen_visual[key] + past
    return total


def train_step_flops(config: Config, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Forward FLOPs per component and the whole step's FLOPs (forward + backward)."""
    model, trainable = config.model, set(config.train.trainable)
    images = float(np.asarray(batch["image_mask"]).sum())
    pairs = attended_pairs(batch["modality"], batch["chunk_id"], batch["segment_id"],
                           model.layout.visual_attends_past_visual)
    tokens = int(np.asarray(batch["modality"]).size)
    forward = {"vision": images * vision_flops(model),
               "aligner": images * aligner_flops(model),
               "decoder": float(tokens * decoder_token_flops(model) + attention_flops(model, pairs)
                                + lm_head_flops(model, tokens))}
    total, below_trainable = 0.0, False
    for name in ("vision", "aligner", "decoder"):  # bottom to top
        total += forward[name]
        if below_trainable:
            total += forward[name]  # activation gradients flow through to a trainable part below
        if name in trainable:
            total += forward[name]  # weight gradients
        below_trainable = below_trainable or name in trainable
    return {**{f"forward_{k}": v for k, v in forward.items()}, "train_step": total,
            "attended_pairs": float(pairs)}
