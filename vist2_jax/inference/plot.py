"""A dependency-free (Pillow) plot of KV memory and FLOPs against context length."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw

from vist2_jax.config.schema import ModelConfig
from vist2_jax.inference import flops as F
from vist2_jax.inference.cache import CacheLayout, kv_bytes, peak_entries, prefill_length, prefill_pieces
from vist2_jax.model.layers import DTYPES

COLORS = {"text": (200, 60, 50), "pcc": (60, 110, 200), "gcc": (40, 150, 70)}


def scaling_curves(cfg: ModelConfig, new_tokens: int, prompts=None) -> dict:
    """Per mode, analytic peak KV bytes and whole-generation attended FLOPs vs prompt length."""
    lay, dec = cfg.layout, cfg.decoder
    prompts = prompts or [2 ** k for k in range(10, 17)]
    itemsize = 2 if DTYPES[cfg.dtype].__name__ == "bfloat16" else 4
    out = {}
    for mode in ("text", "pcc", "gcc"):
        mem, fl = [], []
        for n in prompts:
            peak = peak_entries(mode, n, new_tokens, lay.text_len, lay.visual_len)
            mem.append(kv_bytes(peak, dec.num_layers, dec.num_kv_heads, dec.head_dim, itemsize))
            cap = CacheLayout.for_generation(mode, [n], new_tokens, lay.text_len, lay.visual_len).capacity
            pieces, piece = prefill_pieces(prefill_length(mode, n, lay.text_len, lay.visual_len), 1024)
            fl.append(F.generation_flops(cfg, mode, n, new_tokens, cap, pieces, piece)["total_attended"])
        out[mode] = {"kv_bytes": mem, "flops": fl}
    return {"prompts": prompts, "modes": out}


def _panel(draw, box, xs, series, title):
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=(0, 0, 0))
    draw.text((x0 + 5, y0 - 16), title, fill=(0, 0, 0))
    lx = [math.log2(x) for x in xs]
    ys = [math.log10(v) for s in series.values() for v in s]
    lo, hi = math.floor(min(ys)), math.ceil(max(ys))
    for decade in range(lo, hi + 1):
        y = y1 - (decade - lo) / max(hi - lo, 1) * (y1 - y0)
        draw.line((x0, y, x1, y), fill=(225, 225, 225))
        draw.text((x0 - 38, y - 6), f"1e{decade}", fill=(0, 0, 0))
    for x, label in zip(lx, xs):
        px = x0 + (x - lx[0]) / (lx[-1] - lx[0]) * (x1 - x0)
        draw.text((px - 10, y1 + 4), f"{label // 1024}k", fill=(0, 0, 0))
    for i, (mode, vals) in enumerate(series.items()):
        pts = [(x0 + (x - lx[0]) / (lx[-1] - lx[0]) * (x1 - x0),
                y1 - (math.log10(v) - lo) / max(hi - lo, 1) * (y1 - y0)) for x, v in zip(lx, vals)]
        draw.line(pts, fill=COLORS[mode], width=3)
        draw.text((x0 + 10, y0 + 8 + 14 * i), mode, fill=COLORS[mode])


def plot_scaling(cfg: ModelConfig, name: str, new_tokens: int, path: str) -> dict:
    curves = scaling_curves(cfg, new_tokens)
    image = Image.new("RGB", (1000, 420), "white")
    draw = ImageDraw.Draw(image)
    modes = curves["modes"]
    _panel(draw, (60, 40, 480, 370), curves["prompts"], {m: d["kv_bytes"] for m, d in modes.items()},
           f"{name}: peak KV cache bytes (+{new_tokens} new tokens)")
    _panel(draw, (560, 40, 980, 370), curves["prompts"], {m: d["flops"] for m, d in modes.items()},
           f"{name}: generation FLOPs (attended)")
    draw.text((400, 395), "prompt tokens (log scale)", fill=(0, 0, 0))
    image.save(path)
    return curves
