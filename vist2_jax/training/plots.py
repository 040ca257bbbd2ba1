"""A loss-curve PNG drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def line_chart(series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, title: str,
               x_label: str, y_label: str, size: tuple[int, int] = (900, 500)) -> Path:
    """One PNG with a line per series of (x, y) points, axes with min/max ticks and a legend."""
    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = [p for values in series.values() for p in values]
    if not points:
        raise ValueError("line_chart: nothing to plot")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        _, py = to_px(x0, y)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((4, py - 6), f"{y:.2f}", fill="black")
    for i in range(5):
        x = x0 + (x1 - x0) * i / 4
        px, _ = to_px(x, y0)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
        draw.text((px - 10, height - bottom + 8), f"{x:.0f}", fill="black")
    draw.text((width // 2 - 60, height - 18), x_label, fill="black")
    draw.text((4, 8), f"{title}   ({y_label})", fill="black")
    for index, (name, values) in enumerate(series.items()):
        color = PALETTE[index % len(PALETTE)]
        pixels = [to_px(x, y) for x, y in values]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        for px, py in pixels[-1:]:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
        draw.text((width - right - 220, top + 8 + 14 * index), f"-- {name}", fill=color)
    image.save(path)
    return Path(path)
