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

from vist2_jax.row_contract import PAD, TEXT, VISUAL


def mask_attended_pairs(modality: np.ndarray, chunk_id: np.ndarray, segment_id: np.ndarray,
                        visual_attends_past_visual: bool = False) -> int:
    """Number of (q, k) pairs the mask allows over non-padding queries, vectorised per row.

    Relies on the row contract: positions increase along each document and chunk ids never
    decrease along a row, so a query's allowed keys are its own span's earlier tokens (rank
    inside its (segment, chunk, modality) group) plus the visual tokens of earlier chunks.
    """
    total = 0
    for mod, chunk, seg in zip(np.asarray(modality), np.asarray(chunk_id), np.asarray(segment_id)):
        mod, chunk, seg = mod.astype(np.int64), chunk.astype(np.int64), seg.astype(np.int64)
        live = mod != PAD
        span = ((seg << 32) + chunk) * 4 + mod
        order = np.argsort(span, kind="stable")
        ranked = span[order]
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order)) - np.searchsorted(ranked, ranked, "left") + 1
        visual_keys = np.sort(((seg << 32) + chunk)[mod == VISUAL])
        earlier_visual = (np.searchsorted(visual_keys, (seg << 32) + chunk, "left")
                          - np.searchsorted(visual_keys, seg << 32, "left"))
        reads_past = (mod == TEXT) | ((mod == VISUAL) & visual_attends_past_visual)
        total += int(np.sum(np.where(live, rank + np.where(reads_past, earlier_visual, 0), 0)))
    return total


def global_text_tokens(local_batch: Mapping[str, np.ndarray]) -> float:
    """Text tokens of the global batch, from this host's slice (every host holds as many)."""
    import jax

    return float((np.asarray(local_batch["modality"]) == TEXT).sum()) * jax.process_count()


def step_record(config: Config, local_batch: Mapping[str, np.ndarray], elapsed: float) -> dict[str, float]:
    """Throughput of one logged step: text and decoder tokens/s, analytic model FLOPs and MFU
    (the chip peak from ``train.peak_tflops_per_device``; the compiler's count is not used,
    it misses scanned layers and Pallas calls). Counts the mask's pairs on the host: call it
    on logged steps only."""
    import jax

    text_tokens = global_text_tokens(local_batch)
    step_flops = train_step_flops(config, local_batch)["train_step"] * jax.process_count()
    record = {"step_time_s": elapsed, "text_tokens_per_s": text_tokens / elapsed,
              "decoder_tokens_per_s": config.data.global_batch_size * config.data.seq_len / elapsed,
              "model_flops_per_step": step_flops, "model_tflops_per_s": step_flops / elapsed / 1e12}
    if config.train.peak_tflops_per_device > 0:
        record["mfu"] = step_flops / elapsed / 1e12 / (config.train.peak_tflops_per_device * jax.device_count())
    return record


def train_step_flops(config: Config, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Forward FLOPs per component and the whole step's FLOPs (forward + backward)."""
    model, trainable = config.model, set(config.train.trainable)
    images = float(np.asarray(batch["image_mask"]).sum())
    pairs = mask_attended_pairs(batch["modality"], batch["chunk_id"], batch["segment_id"],
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
