"""Analytic FLOP counts of the generation programs (multiply-add = 2 FLOPs).

The per-piece counts (real head_dim, GQA, ViT, aligner) come from
:mod:`vist2_jax.model.flops`; this module adds the generation schedule. Two attention
counts are kept apart:

* ``executed``: what the static-shape programs compute, every query against every one
  of the C cache slots (dense masked attention), the number the compiled programs'
  cost analysis must reproduce;
* ``attended``: only the (query, key) pairs the vision-as-memory mask lets through,
  the cost of an ideal kernel that skips masked entries.

Norms, RoPE, softmax and other element-wise work are left out (well under 5% at the real
presets; see the cross-check in :mod:`vist2_jax.bench.efficiency`).
"""

from __future__ import annotations

from vist2_jax.config.schema import ModelConfig
from vist2_jax.inference.cache import finished_chunks
from vist2_jax.model.flops import attention_flops, decoder_token_flops, image_flops, lm_head_flops


def unused_last_layer_flops(cfg: ModelConfig, tokens: int, pairs: int) -> int:
    """Work of the last layer that nothing reads when no logits are taken (a chunk's visual
    entries only need that layer's K/V): Q and O projections, attention and MLP."""
    d = cfg.decoder
    per_token = (2 * d.hidden_size * d.num_heads * d.head_dim * 2
                 + 3 * 2 * d.hidden_size * d.intermediate_size)
    return tokens * per_token + attention_flops(cfg, pairs) // d.num_layers


def extend_flops(cfg: ModelConfig, batch: int, entries: int, capacity: int, logits: bool) -> int:
    """One executed ``extend`` call: ``entries`` new entries per row over ``capacity`` slots."""
    rows = batch * entries
    total = rows * decoder_token_flops(cfg) + attention_flops(cfg, rows * capacity)
    if not logits:
        return total - unused_last_layer_flops(cfg, rows, rows * capacity)
    return total + lm_head_flops(cfg, batch)


def generation_attended_pairs(mode: str, prompt_len: int, new_tokens: int, L: int, m: int) -> dict[str, int]:
    """(query, key) pairs the mask allows, for the prefill and the whole generation of one row.

    Replays the schedule of :mod:`vist2_jax.inference.cache`: text entries attend their
    chunk's earlier text and every finished chunk's visual tokens, visual tokens their own
    chunk causally (``visual_attends_past_visual`` off).
    """
    n = prompt_len
    if mode == "text":
        prefill = n * (n + 1) // 2
        decode = sum(j + 1 for j in range(n, n + new_tokens - 1))
        return {"prefill": prefill, "total": prefill + decode}
    k = n // L
    r = n - k * L
    prefill = k * m * (m + 1) // 2 + sum(k * m + i + 1 for i in range(r + 1))
    total, chunk, text = prefill, k + 1, r + 1  # chunk = current chunk id, text = its entries
    for t in range(1, new_tokens):  # token t is fed (tokens 1..M-1; the M-th is not)
        if mode == "gcc" and text == L:  # marker + L-1 fed tokens + token t makes L: compress
            total += m * (m + 1) // 2
            chunk, text = chunk + 1, 0
        text += 1
        total += (chunk - 1) * m + text
    return {"prefill": prefill, "total": total}


def generation_flops(cfg: ModelConfig, mode: str, prompt_len: int, new_tokens: int,
                     capacity: int, prefill_pieces: int, piece: int) -> dict[str, float]:
    """Executed and attended FLOPs of one row's prefill and whole generation."""
    lay = cfg.layout
    L, m = lay.text_len, lay.visual_len
    k = 0 if mode == "text" else prompt_len // L
    compressions = finished_chunks(mode, prompt_len, new_tokens, L) - k
    images = image_flops(cfg) * k
    prefill = images + prefill_pieces * extend_flops(cfg, 1, piece, capacity, True)
    decode = (new_tokens - 1) * extend_flops(cfg, 1, 1, capacity, True)
    compress = compressions * (image_flops(cfg) + extend_flops(cfg, 1, m, capacity, False))
    pairs = generation_attended_pairs(mode, prompt_len, new_tokens, L, m)
    prefill_tokens = prompt_len if mode == "text" else k * m + 1 + prompt_len - k * L
    ideal_prefill = (images + prefill_tokens * decoder_token_flops(cfg)
                     + attention_flops(cfg, pairs["prefill"]) + lm_head_flops(cfg, 1))
    fed = prefill_tokens + (new_tokens - 1) + compressions * m
    ideal_total = (images + compressions * image_flops(cfg) + fed * decoder_token_flops(cfg)
                   + attention_flops(cfg, pairs["total"]) + lm_head_flops(cfg, new_tokens)
                   - compressions * unused_last_layer_flops(cfg, m, m * (m + 1) // 2))
    return {"prefill_executed": float(prefill), "total_executed": float(prefill + decode + compress),
            "prefill_attended": float(ideal_prefill), "total_attended": float(ideal_total),
            "compressions": compressions, "prefill_images": k}
