"""The fast path of the sketch renderer: a pre-rasterized glyph atlas for one monospace
font size, assembled with numpy (docs/design.md §4: thousands of images/s/core vs Pillow's hundreds).

Each glyph is rasterized once by Pillow, alone, at the same integer pen position it has
inside a line, giving its coverage tile. A line's mask merges its glyphs' tiles with
Pillow's rule (``a + b - a*b/255``, rounded: symmetric, so the merge order does not
matter) and is blended over the background with Pillow's rounding, so the result
matches ``ImageDraw.text`` pixel for pixel. Glyphs
whose ink spills past their cell (``W`` at 10px spills 1px right) are handled by
compositing in ``kx * ky`` passes, each placing only cells far enough apart not to overlap.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _div255(v: np.ndarray) -> np.ndarray:
    """Pillow's DIV255: round(v / 255) for v in [0, 255 * 255]."""
    v = v + 128
    return ((v >> 8) + v) >> 8


def _blend_lut(foreground: int, background: int) -> np.ndarray:
    """Pillow's BLEND(mask, bg, fg) for every coverage value."""
    a = np.arange(256, dtype=np.int64)
    return _div255(background * (255 - a) + foreground * a).astype(np.uint8)


class GlyphAtlas:
    """Coverage tiles of one monospace font size; glyphs are added on first use."""

    def __init__(self, font: ImageFont.FreeTypeFont, cell: int, height: int, pitch: int,
                 foreground: int = 0, background: int = 255):
        self.font, self.cell, self.pitch, self.foreground = font, cell, pitch, foreground
        # Raster big enough for any sane overflow; origin = the cell's top-left corner.
        self._raster = (4 * max(height, pitch), 6 * cell)
        self._origin = (max(height, pitch), 2 * cell)
        self._glyphs: list[np.ndarray] = []
        self._extents: list[tuple[int, int, int, int]] = []  # overflow top, bottom, left, right
        self.table = np.full(0x10000, -1, np.int32)  # BMP code point -> tile index; -2 unusable
        self.lut = _blend_lut(foreground, background)
        self._tiles: np.ndarray | None = None
        self._add([chr(c) for c in range(0x20, 0x7F)])

    def _rasterize(self, ch: str) -> np.ndarray | None:
        h, w = self._raster
        oy, ox = self._origin
        img = Image.new("L", (w, h), 0)
        ImageDraw.Draw(img).text((ox, oy), ch, fill=255, font=self.font)
        cov = np.asarray(img)
        if cov[0].any() or cov[-1].any() or cov[:, 0].any() or cov[:, -1].any():
            return None  # ink reaches the raster border: too big to place by cells
        return cov

    def _add(self, chars) -> bool:
        """Rasterize new characters; False if one cannot be placed by cells."""
        ok = True
        oy, ox = self._origin
        for ch in chars:
            code = ord(ch)
            if code >= 0x10000 or self.table[code] == -2 or self.font.getlength(ch) != self.cell:
                ok = False
                if code < 0x10000:
                    self.table[code] = -2
                continue
            if self.table[code] >= 0:
                continue
            cov = self._rasterize(ch)
            if cov is None:
                self.table[code], ok = -2, False
                continue
            rows, cols = np.nonzero(cov.any(axis=1))[0], np.nonzero(cov.any(axis=0))[0]
            ext = (0, 0, 0, 0) if rows.size == 0 else (
                max(0, oy - rows[0]), max(0, rows[-1] + 1 - (oy + self.pitch)),
                max(0, ox - cols[0]), max(0, cols[-1] + 1 - (ox + self.cell)))
            self.table[code] = len(self._glyphs)
            self._glyphs.append(cov)
            self._extents.append(tuple(int(e) for e in ext))
            self._tiles = None
        return ok

    def _build(self) -> None:
        """Crop every glyph raster to the tile of the current pass geometry."""
        top, bottom, left, right = (max(e[i] for e in self._extents) for i in range(4))
        self.kx = math.ceil((self.cell + left + right) / self.cell)
        self.ky = math.ceil((self.pitch + top + bottom) / self.pitch)
        self.top, self.left = top, left
        th, tw = self.ky * self.pitch, self.kx * self.cell
        oy, ox = self._origin
        y0, x0 = oy - top, ox - left
        tiles = np.zeros((len(self._glyphs), th, tw), np.uint8)
        for i, cov in enumerate(self._glyphs):
            part = cov[y0:y0 + th, x0:x0 + tw]
            tiles[i, :part.shape[0], :part.shape[1]] = part
        self._tiles = tiles

    def draw(self, lines: list[str], cols: int, rows: int, size: int, margin: int) -> np.ndarray | None:
        """uint8 [size, size, 3] for lines laid out on the cell grid, or None when a
        character cannot go through the atlas (the caller falls back to Pillow)."""
        if not lines:
            lines = [""]
        if len(lines) > rows or any(len(line) > cols for line in lines):
            raise ValueError("lines do not fit the atlas grid")
        text = "".join(line.ljust(cols) for line in lines)
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
        if codes.max() >= 0x10000:
            return None
        codes = codes.reshape(len(lines), cols)
        idx = self.table[codes]
        if (idx < 0).any():
            if not self._add({chr(c) for c in np.unique(codes[idx < 0])}):
                return None
            idx = self.table[codes]
        if self._tiles is None:
            self._build()
        tiles, ky, kx = self._tiles, self.ky, self.kx
        th, tw = tiles.shape[1:]
        pad_y, pad_x = ky * self.pitch, kx * self.cell
        shape = (size + 2 * pad_y, size + 2 * pad_x)
        image = None
        for py in range(ky):  # rows of one pass never overlap: one Pillow draw call each
            cov = np.zeros(shape, np.uint8)
            for px in range(kx):  # cells of one pass never overlap
                sub = idx[py::ky, px::kx]
                if sub.size == 0:
                    continue
                r, c = sub.shape
                block = tiles[sub].transpose(0, 2, 1, 3).reshape(r * th, c * tw)
                y0 = pad_y + margin + py * self.pitch - self.top
                x0 = pad_x + margin + px * self.cell - self.left
                h, w = min(block.shape[0], shape[0] - y0), min(block.shape[1], shape[1] - x0)
                target = cov[y0:y0 + h, x0:x0 + w]
                if px == 0:
                    target[...] = block[:h, :w]
                else:  # Pillow merges a line's glyphs with "over": a + b - a*b/255, rounded
                    a, b = target.astype(np.uint16), block[:h, :w].astype(np.uint16)
                    target[...] = a + b - _div255(a * b)
            alpha = cov[pad_y:pad_y + size, pad_x:pad_x + size]
            if image is None:
                image = self.lut[alpha]
            else:  # a later line drawn over earlier ones, as ImageDraw blends it
                a = alpha.astype(np.uint32)
                image = _div255(image * (255 - a) + self.foreground * a).astype(np.uint8)
        return np.repeat(image[:, :, None], 3, axis=2)
