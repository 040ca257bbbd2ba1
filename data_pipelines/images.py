"""Caption images: decode a file / bytes / TFDS reference and fit it to the layout's square.

Images are scaled (aspect kept) to fit ``size x size`` and centred on a white canvas, so
every slot has one fixed shape for XLA. Anything that does not decode raises
``ImageUnreadable`` naming the reason; the caller skips and counts it or stops the run.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class ImageUnreadable(ValueError):
    """The image bytes do not decode (corrupt, truncated, not an image, too large)."""


def image_bytes(ref) -> bytes:
    """``ref`` is a path, raw bytes, or a lazy reference with ``read() -> bytes`` (an image
    left in its dataset, so a large caption set is never held in memory)."""
    if isinstance(ref, bytes):
        return ref
    if hasattr(ref, "read"):
        return ref.read()
    try:
        with open(ref, "rb") as f:
            return f.read()
    except OSError as err:
        raise ImageUnreadable(f"cannot read: {err.strerror or err}") from None


def fit_image(ref, size: int, background: int = 255) -> np.ndarray:
    """uint8 [size, size, 3]: the image scaled to fit, centred, padded with ``background``."""
    data = image_bytes(ref)
    if not data:
        raise ImageUnreadable("empty image data")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageUnreadable(f"does not decode ({type(err).__name__}: {err})") from None
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageUnreadable("zero-sized image")
    scale = size / max(width, height)
    new = (max(1, round(width * scale)), max(1, round(height * scale)))
    if new != image.size:
        image = image.resize(new, Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size), (background,) * 3)
    canvas.paste(image, ((size - new[0]) // 2, (size - new[1]) // 2))
    return np.asarray(canvas, np.uint8)
