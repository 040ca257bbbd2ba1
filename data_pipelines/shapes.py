"""Synthetic captioned shapes: an offline image-caption source for stage 1.

Each sample is one or two coloured shapes (circle, square, triangle) on a white canvas,
with a caption that names them, their colours and where they are; deterministic in the
seed, so stage 1 runs with no download.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "black": (0, 0, 0),
          "orange": (240, 140, 20), "purple": (140, 50, 170)}
SHAPES = ("circle", "square", "triangle")
PLACES = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}


def captioned_shapes(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, str]:
    """One (uint8 [S, S, 3] image, caption) pair."""
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    cells = list(PLACES)
    picks = rng.choice(len(cells), size=int(rng.integers(1, 3)), replace=False)
    parts = []
    half = image_size // 2
    for index in picks:
        row, col = cells[index]
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = list(COLORS)[rng.integers(len(COLORS))]
        size = int(rng.integers(half // 3, half - 4))
        x0 = col * half + int(rng.integers(2, half - size - 1))
        y0 = row * half + int(rng.integers(2, half - size - 1))
        box = (x0, y0, x0 + size, y0 + size)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(x0 + size // 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=COLORS[color])
        parts.append(f"a {color} {shape} at the {PLACES[(row, col)]}")
    caption = " and ".join(parts).capitalize() + "."
    return np.asarray(image, np.uint8), caption
