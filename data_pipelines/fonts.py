"""Font resolution and glyph coverage for the sketch renderer (docs/design.md §4).

The fonts ship inside the package (``font_files/``, licence beside them) with their
sha256 pinned here; there is no lookup of host fonts and no fallback. A font is read
once to its bytes, so the sha256 recorded in the renderer config is the hash of exactly
what was rasterized; a configured file (e.g. Noto Sans CJK) is hashed the same way and,
given an expected hash, refused when it differs. Coverage comes from the font's own
``cmap`` table, so a missing glyph is never drawn as a .notdef box.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from importlib import resources

import numpy as np

from vist2_jax import storage

# family -> (file under data_pipelines/font_files, sha256 of its bytes)
BUNDLED = {
    "DejaVu Sans Mono": ("DejaVuSansMono.ttf", "0f5db4f1749979d961019838b160bec74abdf7f9eca69553fe1aa856bbff49a4"),
    "DejaVu Sans": ("DejaVuSans.ttf", "abdc775b21b1bc470d50c97e790d276f2054b7504e56e5bd3e64f48d68582322"),
}
DEFAULT_FAMILY = "DejaVu Sans Mono"
NUM_CODEPOINTS = 0x110000
_MAGIC = (b"\x00\x01\x00\x00", b"OTTO", b"true", b"ttcf")  # .ttf, .otf (CFF), Apple, .ttc


class FontError(ValueError):
    """A configured font is missing, unknown, or not the file (hash) that was expected."""


class FontHashMismatch(FontError):
    """The font's bytes are not the ones recorded (another version or file)."""


@dataclass(frozen=True)
class FontSource:
    """Where the font came from, its bytes, and their hash."""

    file: str  # "bundled:<file>" or the absolute path of a configured file
    data: bytes
    sha256: str
    index: int = 0  # face index inside a .ttc collection
    family: str = ""  # the bundled family; "" for a configured file


def bundled_font(family: str = DEFAULT_FAMILY) -> FontSource:
    """A font shipped with the package, checked against its pinned hash."""
    if family not in BUNDLED:
        raise FontError(f"font family {family!r} is not bundled (bundled: {', '.join(BUNDLED)})")
    name, pinned = BUNDLED[family]
    data = resources.files("data_pipelines").joinpath("font_files", name).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != pinned:
        raise FontError(f"bundled font {name} has sha256 {digest}, expected {pinned}: reinstall the package")
    return FontSource(f"bundled:{name}", data, digest, 0, family)


def font_file(path: str, index: int = 0) -> FontSource:
    """A configured font file (.ttf / .otf / .ttc face ``index``), hashed."""
    try:
        data = storage.as_path(path).read_bytes()
    except OSError as err:
        raise FontError(f"font file {path}: {err.strerror or err}") from None
    if data[:4] not in _MAGIC:
        raise FontError(f"font file {path} is not a TrueType / OpenType font or collection")
    faces = _u32(data, 8) if data[:4] == b"ttcf" and len(data) >= 12 else 1
    if not 0 <= index < faces:
        raise FontError(f"font file {path} has {faces} face(s); index {index} does not exist")
    return FontSource(os.fspath(storage.absolute(path)), data, hashlib.sha256(data).hexdigest(), index)


def bundled_with_hash(sha256: str) -> FontSource | None:
    """The bundled font whose bytes hash to ``sha256``, if any (maps a run recorded with a
    system copy of DejaVu to the identical bundled file)."""
    for family, (_, pinned) in BUNDLED.items():
        if pinned == sha256:
            return bundled_font(family)
    return None


def resolve_font(path: str | None = None, index: int = 0, family: str = DEFAULT_FAMILY,
                 sha256: str | None = None) -> FontSource:
    """The configured file, else the bundled ``family``; with ``sha256`` the font must hash
    to it (FontError otherwise, one line)."""
    source = font_file(path, index) if path else bundled_font(family)
    if sha256 and source.sha256 != sha256:
        raise FontHashMismatch(f"font {source.file} has sha256 {source.sha256}, but {sha256} was "
                               "recorded: render with the same font file the run used")
    return source


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
