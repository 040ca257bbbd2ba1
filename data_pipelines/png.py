"""A PNG encoding that depends on the pixels alone, so the same sketch is the same bytes
on every machine: no ancillary chunks (time, gamma, text), filter 0, and stored
(uncompressed) deflate blocks, since compressed deflate output differs between zlib
builds (zlib vs zlib-ng). Any PNG reader opens it."""

from __future__ import annotations

import struct
import zlib

import numpy as np

_STORED_BLOCK = 0xFFFF  # the largest stored deflate block


def _chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W] (grayscale) or [H, W, 3] (RGB) as deterministic PNG bytes."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"png_bytes wants uint8 [H, W] or [H, W, 3], got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    rows = np.zeros((height, 1 + image[0].size if height else 1), np.uint8)  # column 0: filter type 0
    rows[:, 1:] = image.reshape(height, -1)
    raw = rows.tobytes()
    blocks = []
    for at in range(0, max(len(raw), 1), _STORED_BLOCK):
        part = raw[at:at + _STORED_BLOCK]
        final = at + _STORED_BLOCK >= len(raw)
        blocks.append(struct.pack("<BHH", final, len(part), len(part) ^ 0xFFFF) + part)
    stream = b"\x78\x01" + b"".join(blocks) + struct.pack(">I", zlib.adler32(raw))
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if image.ndim == 2 else 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")
