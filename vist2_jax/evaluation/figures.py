"""A PNG of held-out sketches beside the model's greedy reconstruction of them (the
reconstruction drawn by the run's own renderer, so the two can be compared by eye, and
quoted below each pair, which also covers output the renderer cannot draw)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vist2_jax.config.schema import CurriculumPoint
from vist2_jax.evaluation.context import EvalContext, final_point, row_maker
from vist2_jax.evaluation.metrics import char_error_rate
from vist2_jax.evaluation.ocr import held_out_chunks, reconstruct


def reconstruction_png(ctx: EvalContext, path: str | Path, count: int = 3, scale: int = 2) -> list[float]:
    """Rows of [sketch | reconstruction] with each chunk's CER; returns the CERs."""
    L = final_point(ctx.config).text_len
    maker = row_maker(ctx, "ocr", CurriculumPoint(text_len=L, max_chunks=1))
    chunks = held_out_chunks(maker, L, count, seed=ctx.config.run.seed)
    predictions = reconstruct(ctx, chunks)
    size = ctx.config.model.layout.image_size * scale
    caption = 14
    sheet = Image.new("RGB", (2 * size + 30, len(chunks) * (size + 2 * caption + 10) + caption), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((10, 2), "held-out sketch", fill=(0, 0, 0))
    draw.text((size + 20, 2), "model's greedy reconstruction", fill=(0, 0, 0))
    cers, renderer, tokenizer = [], maker.renderer, maker.tokenizer
    for i, ((_, text, image, px), prediction) in enumerate(zip(chunks, predictions)):
        top = caption + i * (size + 2 * caption + 10)
        # token-aligned tiles draw token groups (SketchRenderer.sketch_text)
        drawn = renderer.try_render(renderer.sketch_text(tokenizer.encode(prediction), tokenizer.decode))
        if drawn is None:  # the reconstruction does not fit one sketch: show a grey panel
            drawn = np.full_like(image, 200)
        for column, panel in enumerate((image, drawn)):
            sheet.paste(Image.fromarray(panel).resize((size, size), Image.NEAREST),
                        (10 + column * (size + 10), top))
        cers.append(char_error_rate(prediction, text))
        draw.text((10, top + size + 1), f"L={L} tokens, {px}px font, CER {cers[-1]:.2f}", fill=(90, 90, 90))
        draw.text((10, top + size + caption), f"read: {prediction!r}"[:90], fill=(90, 90, 90))
    sheet.save(path)
    return cers
