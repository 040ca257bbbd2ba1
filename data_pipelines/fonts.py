"""Font resolution and glyph coverage for the sketch renderer (DESIGN §4).

A font is resolved once to its bytes, so the sha256 recorded in the renderer config is
the hash of exactly what was rasterized. Coverage comes from the font's own ``cmap``
table (Pillow has no glyph-lookup API, and a missing glyph would otherwise be drawn as
a box without anyone noticing).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass

import numpy as np

DEFAULT_FAMILIES = ("DejaVu Sans Mono", "DejaVu Sans")
COMMON_PATHS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
    "/usr/share/fonts/dejavu/DejaVuSansMono.ttf",
    "/usr/share/fonts/TTF/DejaVuSansMono.ttf",
    "/usr/local/share/fonts/DejaVuSansMono.ttf",
    "/Library/Fonts/DejaVuSansMono.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
)
NUM_CODEPOINTS = 0x110000


@dataclass(frozen=True)
class FontSource:
    """Where the font came from, its bytes, and their hash."""

    file: str  # a path, or "builtin" for Pillow's embedded font
    data: bytes
    sha256: str
    index: int = 0  # face index inside a .ttc collection


def _fc_match(family: str) -> str | None:
    if shutil.which("fc-match") is None:
        return None
    try:
        out = subprocess.run(["fc-match", "-f", "%{file}", family], capture_output=True,
                             text=True, timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    # fc-match always answers with *some* font; only accept the family we asked for.
    wanted = family.replace(" ", "").lower()
    return out if out and os.path.basename(out).lower().startswith(wanted) else None


def resolve_font(path: str | None = None, index: int = 0) -> FontSource:
    """The configured file; else DejaVu Sans Mono / Sans via fontconfig or common paths;
    else Pillow's built-in scalable font."""
    candidates = [path] if path else []
    if not path:
        candidates += [_fc_match(family) for family in DEFAULT_FAMILIES] + list(COMMON_PATHS)
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            with open(candidate, "rb") as f:
                data = f.read()
            return FontSource(os.path.abspath(candidate), data, hashlib.sha256(data).hexdigest(), index)
        if path:
            raise FileNotFoundError(f"font file not found: {path}")
    from PIL import ImageFont

    data = getattr(ImageFont.load_default(size=10), "font_bytes", None)
    if not data:
        raise RuntimeError("no font found and this Pillow has no FreeType built-in font")
    return FontSource("builtin", data, hashlib.sha256(data).hexdigest())


def _u16(data: bytes, at: int) -> int:
    return struct.unpack_from(">H", data, at)[0]


def _u32(data: bytes, at: int) -> int:
    return struct.unpack_from(">I", data, at)[0]


def _cmap_format4(data: bytes, at: int, covered: np.ndarray) -> None:
    seg_count = _u16(data, at + 6) // 2
    ends = np.frombuffer(data, ">u2", seg_count, at + 14).astype(np.int64)
    starts = np.frombuffer(data, ">u2", seg_count, at + 16 + 2 * seg_count).astype(np.int64)
    deltas = np.frombuffer(data, ">u2", seg_count, at + 16 + 4 * seg_count).astype(np.int64)
    range_at = at + 16 + 6 * seg_count
    offsets = np.frombuffer(data, ">u2", seg_count, range_at).astype(np.int64)
    for i in range(seg_count):
        chars = np.arange(starts[i], min(ends[i], 0xFFFE) + 1)
        if chars.size == 0:
            continue
        if offsets[i] == 0:
            glyphs = (chars + deltas[i]) & 0xFFFF
        else:
            where = range_at + 2 * i + offsets[i] + 2 * (chars - starts[i])
            raw = np.array([_u16(data, int(w)) if w + 2 <= len(data) else 0 for w in where])
            glyphs = np.where(raw != 0, (raw + deltas[i]) & 0xFFFF, 0)
        covered[chars[glyphs != 0]] = True


def _cmap_format12(data: bytes, at: int, covered: np.ndarray) -> None:
    groups = np.frombuffer(data, ">u4", 3 * _u32(data, at + 12), at + 16).reshape(-1, 3)
    for start, end, glyph in groups.astype(np.int64):
        covered[start + (1 if glyph == 0 else 0):min(end, NUM_CODEPOINTS - 1) + 1] = True


def glyph_coverage(source: FontSource) -> np.ndarray:
    """bool [0x110000]: which code points the font maps to a real glyph (not .notdef)."""
    data, table_dir = source.data, 0
    if data[:4] == b"ttcf":
        table_dir = _u32(data, 12 + 4 * source.index)
    cmap = None
    for k in range(_u16(data, table_dir + 4)):
        rec = table_dir + 12 + 16 * k
        if data[rec:rec + 4] == b"cmap":
            cmap = _u32(data, rec + 8)
    if cmap is None:
        raise ValueError(f"font {source.file} has no cmap table")
    covered = np.zeros(NUM_CODEPOINTS, bool)
    for k in range(_u16(data, cmap + 2)):
        platform, encoding, offset = struct.unpack_from(">HHI", data, cmap + 4 + 8 * k)
        if not (platform == 0 or (platform == 3 and encoding in (1, 10))):
            continue  # symbol / legacy encodings are not Unicode
        fmt = _u16(data, cmap + offset)
        if fmt == 4:
            _cmap_format4(data, cmap + offset, covered)
        elif fmt == 12:
            _cmap_format12(data, cmap + offset, covered)
    return covered
