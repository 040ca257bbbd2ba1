"""``vist2 data preview RECIPE [key=value ...] --batches N --out DIR``: look at the data.

Writes the first batches as PNG sheets, each image slot beside the decoded text it stands
for (the chunk's own text in OLM rows, the text that reads it in caption / OCR rows), and
prints the counters: records and skipped records of the source, rows, documents, render
and image skips, renderer outcomes. Rows are built in this process, so the counters are
exactly the ones that made these rows.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import numpy as np

from vist2_jax.row_contract import TEXT, VISUAL, stack_rows

TEXT_COLUMNS = 72


def register(subparsers) -> None:
    from vist2_jax.cli import data_prepare

    data = subparsers.add_parser("data", help="the data pipeline: prepare sources, preview batches")
    what = data.add_subparsers(dest="data_command", required=True, metavar="WHAT")
    data_prepare.add_parser(what)
    p = what.add_parser("preview", help="first batches as PNG sheets of sketches beside their text")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.add_argument("--batches", type=int, default=1)
    p.add_argument("--out", required=True, help="folder for batch_<i>.png and counters.json")
    p.add_argument("--workdir", default=None, help="where a trained tokenizer is cached (default --out)")
    p.set_defaults(func=run_preview)


def image_texts(batch: dict, row: int, tokenizer, stage: str, visual_len: int) -> list[tuple[np.ndarray, str]]:
    """(image, text it stands for) for every real image slot of one row (the k-th span of
    ``visual_len`` visual positions holds image k)."""
    modality, chunk, segment = batch["modality"][row], batch["chunk_id"][row], batch["segment_id"][row]
    starts = np.flatnonzero(modality == VISUAL)[::visual_len]
    out = []
    for slot, start in enumerate(starts):
        if not batch["image_mask"][row, slot]:
            break
        c, s = chunk[start], segment[start]
        wanted = c if stage in ("olm", "sft") else c + 1
        where = (modality == TEXT) & (chunk == wanted) & (segment == s)
        if stage == "olm" and not where.any():  # an OCR row mixed into OLM
            where = (modality == TEXT) & (chunk == c + 1) & (segment == s)
        ids = [int(t) for t in batch["tokens"][row][where][1:]]  # drop the <|chunk|> marker
        text = tokenizer.decode(ids) if ids else "(rendered query: its text is only in the image)"
        out.append((batch["images"][row, slot], f"row {row} doc {s} chunk {c}:\n{text}"))
    return out


def sheet(entries: list[tuple[np.ndarray, str]]):
    """One PNG: each image on the left, its text wrapped on the right."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    size = entries[0][0].shape[0] if entries else 64
    blocks = []
    for image, text in entries:
        lines = [piece for line in text.splitlines() for piece in (textwrap.wrap(line, TEXT_COLUMNS) or [""])]
        blocks.append((image, lines, max(size, 12 * len(lines) + 8)))
    width = size + 12 + 7 * TEXT_COLUMNS
    canvas = Image.new("RGB", (width, max(1, sum(h + 6 for *_, h in blocks))), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for image, lines, height in blocks:
        canvas.paste(Image.fromarray(image), (0, y))
        draw.multiline_text((size + 8, y + 2), "\n".join(lines), fill="black", font=font, spacing=2)
        y += height + 6
        draw.line([(0, y - 3), (width, y - 3)], fill=(200, 200, 200))
    return canvas


def run_preview(args: argparse.Namespace) -> int:
    from data_pipelines.pipeline import build_pipeline
    from vist2_jax.config import load_config
    from vist2_jax.cli.errors import UsageError

    if args.batches <= 0:
        raise UsageError("--batches must be positive")
    config = load_config(args.recipe, overrides=args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(config, args.workdir or out)
    size, maker = config.data.global_batch_size, pipeline.row_maker
    for index in range(args.batches):
        # Row i of the training set is maker(i) (pipeline.py), so this is the first batches'
        # content, built here without Grain's read-ahead threads to keep the counters exact.
        batch = stack_rows([maker(i) for i in range(index * size, (index + 1) * size)])
        entries = [e for row in range(len(batch["tokens"]))
                   for e in image_texts(batch, row, pipeline.tokenizer, config.data.stage,
                                            config.model.layout.visual_len)]
        sheet(entries).save(out / f"batch_{index}.png")
        print(f"wrote {out / f'batch_{index}.png'}: {len(entries)} images")
    stats = maker.renderer.stats  # rows were built in this thread, by this renderer
    counters = {"source": pipeline.source_counters, "rows": maker.counters, "renderer": maker.renderer.counters}
    (out / "counters.json").write_text(json.dumps({**counters, "renderer": stats.as_dict()}, indent=2) + "\n")
    for group, values in counters.items():
        print(f"{group}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    print(f"missing glyphs: {stats.missing_summary()}")
    return 0
