"""The sketch renderer (docs/design.md §4): a text chunk -> uint8 [H, W, 3], sizes in pixels.

The image shows exactly the chunk's text: word-wrapped (over-long words hard-broken),
newlines and tabs honoured, never truncated. A chunk that does not fit at the largest
font size is tried at the next smaller size bucket, and rejected (``RenderRejected``)
when none fits; both are counted. Characters the font lacks (and control characters)
are counted by reason with the first code points and where they came from
(``RenderStats``) and, by policy, replaced with a visible marker or rejected; they are
never drawn as .notdef boxes. The font is the bundled DejaVu Sans Mono unless configured
(``fonts.py``); its sha256 goes into ``renderer_config()``, and ``renderer_from_saved``
rebuilds a run's renderer from that record, refusing a font with another hash.

Two paths share one layout: Pillow draws each line (any font), and for monospace fonts
a pre-rasterized glyph atlas assembles the image with numpy gathers, many times faster
and pixel-identical (it composites glyph coverage with Pillow's own max-and-blend rule).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import re
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont, features

from data_pipelines.fonts import (BUNDLED, DEFAULT_FAMILY, FontError, FontHashMismatch, FontSource,
                                  bundled_with_hash, glyph_coverage, resolve_font)
from data_pipelines.glyph_atlas import GlyphAtlas
from data_pipelines.render_stats import RenderStats, codepoint

log = logging.getLogger(__name__)
_TOKENS = re.compile(r" +|[^ ]+")
GROUP_SEPARATOR = "\x1d"  # between the token groups of token-aligned tiles (never drawn)
_CONTROL = np.zeros(0x110000, bool)
_CONTROL[0x00:0x20] = _CONTROL[0x7F:0xA0] = True


def _prefix_ends(ids, decode, view=lambda text: text, step: int = 1) -> np.ndarray:
    """For i = 0, step, 2*step, ... and len(ids): how many characters of ``view(decode(ids))``
    the first i tokens produce (non-decreasing, even where a prefix decodes to a partial
    character)."""
    cuts = [*range(0, len(ids), step), len(ids)]
    lengths = [len(view(decode(ids[:i]))) for i in cuts]
    return np.minimum.accumulate(lengths[::-1])[::-1]


class RenderRejected(ValueError):
    """The chunk cannot be rendered faithfully (does not fit, or lacks glyphs under 'reject')."""


@dataclasses.dataclass(frozen=True)
class RenderConfig:
    """Renderer settings; everything in pixels. ``font_sizes`` are tried largest first.
    ``font_path`` (a .ttf/.otf/.ttc file, face ``font_index``) replaces the bundled
    ``font_family``; with ``font_sha256`` the font must hash to it."""

    image_size: int = 256
    font_path: str | None = None
    font_family: str = DEFAULT_FAMILY
    font_index: int = 0
    font_sha256: str | None = None
    font_sizes: tuple[int, ...] = (10, 9, 8, 7)
    margin: int = 2
    line_spacing: int = 0
    tab_size: int = 4
    missing_glyphs: Literal["replace", "reject"] = "replace"
    replacement: str = "\ufffd"  # '?' when the font lacks it
    foreground: int = 0
    background: int = 255
    fast: bool = True  # use the glyph atlas when the font is monospace
    # 0: one text box over the page (the paper's sketch). t > 0: the page is a grid of t x t
    # tiles filled in reading order (row-major), the text wrapped at the tile's width with
    # no word wrap, so where a character lands depends only on its position in the chunk.
    tile: int = 0
    # r > 0 (tiles only): token-aligned tiles, each showing exactly r tokens of the chunk (the
    # text of tokens k*r .. k*r + r - 1 fills tile k); the text comes in groups split by
    # GROUP_SEPARATOR (``SketchRenderer.sketch_text``).
    tile_tokens: int = 0

    def __post_init__(self):
        if self.image_size <= 2 * self.margin or not self.font_sizes or min(self.font_sizes) <= 0:
            raise ValueError(f"bad render config: {self}")
        if self.tile and (self.tile < 0 or self.image_size % self.tile or self.tile <= 2 * self.margin):
            raise ValueError(f"tile {self.tile} px must divide the {self.image_size} px sketch and exceed "
                             f"twice its {self.margin} px margin")
        if self.tile_tokens and (self.tile_tokens < 0 or not self.tile):
            raise ValueError(f"tile_tokens={self.tile_tokens} needs the tile layout (tile > 0)")
        if self.missing_glyphs not in ("replace", "reject"):
            raise ValueError(f"missing_glyphs must be 'replace' or 'reject', got {self.missing_glyphs!r}")


class _Size:
    """One font size bucket: the Pillow font, metrics, advances and (lazily) its atlas."""

    def __init__(self, source: FontSource, size: int, config: RenderConfig):
        self.size = size
        self.font = ImageFont.truetype(io.BytesIO(source.data), size, index=source.index,
                                       layout_engine=ImageFont.Layout.BASIC)
        ascent, descent = self.font.getmetrics()
        self.pitch = ascent + descent + config.line_spacing
        if self.pitch <= 0:
            raise ValueError(f"line_spacing={config.line_spacing} leaves no line pitch at {size}px")
        inner = config.image_size - 2 * config.margin
        self.max_width, self.max_rows = inner, max(0, (inner + config.line_spacing) // self.pitch)
        self._advances: dict[str, float] = {}
        ascii_adv = {self.advance(chr(c)) for c in range(0x20, 0x7F)}
        self.cell = int(ascii_adv.pop()) if len(ascii_adv) == 1 else 0  # 0: proportional
        self.cols = self.max_width // self.cell if self.cell else 0
        self._atlas: GlyphAtlas | None = None

    def advance(self, ch: str) -> float:
        adv = self._advances.get(ch)
        if adv is None:
            adv = self._advances[ch] = self.font.getlength(ch)
        return adv

    def is_grid(self, chars: set[str]) -> bool:
        """True when every character takes exactly one monospace cell."""
        return bool(self.cell) and all(self.advance(c) == self.cell for c in chars)

    def atlas(self, config: RenderConfig) -> GlyphAtlas:
        if self._atlas is None:
            self._atlas = GlyphAtlas(self.font, self.cell, self.pitch - config.line_spacing,
                                     self.pitch, config.foreground, config.background)
        return self._atlas


def _wrap(paragraph: str, max_width: float, width, split) -> list[str]:
    """Greedy word wrap. Spaces at a break are consumed; leading indentation is kept; a
    word wider than a line is hard-broken by ``split(word) -> (head, rest)``."""
    lines, line, used = [], "", 0.0
    for tok in _TOKENS.findall(paragraph):
        w = width(tok)
        if tok[0] == " ":
            if line and used + w <= max_width:
                line, used = line + tok, used + w
            elif not line and not lines:  # indentation at the start of a paragraph
                while tok and width(tok) > max_width:
                    tok = tok[:-1]
                line, used = tok, width(tok)
            elif line:
                lines.append(line)
                line, used = "", 0.0
            continue
        if used + w > max_width:
            if line:
                lines.append(line.rstrip(" "))
            line, used = "", 0.0
            while w > max_width:
                head, tok = split(tok)
                lines.append(head)
                w = width(tok)
        line, used = line + tok, used + w
    if line or not lines:
        lines.append(line)
    return lines


def _wrap_cols(paragraph: str, cols: int) -> list[str]:
    """``_wrap`` for a monospace grid, a line at a time (the hot path): break at the last
    space that fits, else hard-break the word, filling the line."""
    rest = paragraph.lstrip(" ")
    first_word = rest.find(" ")
    first_word = len(rest) if first_word < 0 else first_word
    line = " " * min(len(paragraph) - len(rest), max(0, cols - first_word))
    lines, avail = [], cols - len(line)
    while len(rest) > avail:
        cut = rest.rfind(" ", 0, avail + 1)
        if cut > 0:
            lines.append((line + rest[:cut]).rstrip(" "))
            rest = rest[cut:]
        else:
            lines.append(line + rest[:avail])
            rest = rest[avail:]
        rest, line, avail = rest.lstrip(" "), "", cols
    if rest or not lines:
        lines.append(line + rest)
    return lines


class SketchRenderer:
    """Renders chunks to fixed-shape uint8 [S, S, 3] images and counts what happened."""

    def __init__(self, config: RenderConfig = RenderConfig()):
        self.config = config
        self.source = resolve_font(config.font_path, config.font_index, config.font_family, config.font_sha256)
        self.covered = glyph_coverage(self.source)
        self.drawable = self.covered & ~_CONTROL
        self.sizes = [_Size(self.source, s, dataclasses.replace(config, image_size=config.tile or config.image_size))
                      for s in sorted(set(config.font_sizes), reverse=True)]
        if config.tile and not self.sizes[0].cell:
            raise FontError(f"the tile layout needs a monospace font; {self.source.family or self.source.file} "
                            "is proportional")
        rep = config.replacement
        self.replacement = rep if rep and all(self.drawable[ord(c)] for c in rep) else "?"
        self.stats = RenderStats(by_size={s.size: 0 for s in self.sizes})

    @property
    def tiles(self) -> int:
        """Tiles per sketch (1 for the page)."""
        return (self.config.image_size // self.config.tile) ** 2 if self.config.tile else 1

    @property
    def counters(self) -> dict[str, int]:
        """The headline counts (``stats`` has the detail)."""
        st = self.stats
        return {"rendered": st.rendered, "smaller_bucket": st.smaller_bucket, "rejected": st.rejected,
                "missing_glyphs": st.missing_glyphs, "atlas_fallbacks": st.atlas_fallbacks}

    @property
    def by_size(self) -> dict[int, int]:
        return self.stats.by_size

    def renderer_config(self) -> dict:
        """What to save next to a run so its sketches can be reproduced."""
        c = self.config
        return {"font_family": self.source.family, "font_file": self.source.file,
                "font_sha256": self.source.sha256, "font_index": self.source.index,
                "font_sizes_px": [s.size for s in self.sizes],
                "image_size": c.image_size, "tile": c.tile, "tile_tokens": c.tile_tokens, "margin": c.margin,
                "line_spacing": c.line_spacing,
                "tab_size": c.tab_size, "missing_glyphs": c.missing_glyphs,
                "replacement": self.replacement, "foreground": c.foreground,
                "background": c.background, "monospace": bool(self.sizes[0].cell),
                "layout_engine": "pillow-basic", "pillow": Image.__version__,
                "freetype": features.version("freetype2")}

    # ---- text preparation -------------------------------------------------------------
    def _paragraphs(self, text: str, where: str = "", count: bool = True) -> list[str]:
        """Split lines, expand tabs, and apply the missing-glyph policy (counted unless
        ``count`` is false: a second look at a text already drawn)."""
        paragraphs = [p.expandtabs(self.config.tab_size) for p in text.splitlines()]
        codes = np.frombuffer("".join(paragraphs).encode("utf-32-le", "surrogatepass"), np.uint32)
        bad = ~self.drawable[codes] if codes.size else np.zeros(0, bool)
        bad &= codes != 0x20
        missing = int(bad.sum())
        if not missing:
            return paragraphs
        if count:
            self.stats.add_missing(codes[bad], where)
        if self.config.missing_glyphs == "reject":
            self.stats.rejected_missing_glyphs += count
            chars = ", ".join(f"{codepoint(c)} {chr(c)!r}" for c in np.unique(codes[bad])[:5].tolist())
            raise RenderRejected(f"{missing} characters missing from the font: {chars}")
        drawable = self.drawable
        return ["".join(ch if drawable[ord(ch)] or ch == " " else self.replacement for ch in p)
                for p in paragraphs]

    def sketch_text(self, ids, decode) -> str:
        """The text a chunk of token ``ids`` is drawn from: ``decode(ids)``; with token-aligned
        tiles (``tile_tokens`` = r) the same characters cut after every r tokens by
        GROUP_SEPARATOR, so that each group fills a tile of its own."""
        ids = list(ids)
        r = self.config.tile_tokens
        if not r:
            return decode(ids)
        if len(ids) > r * self.tiles:  # can never fit: cut cheaply, the layout rejects it at once
            return GROUP_SEPARATOR.join(decode(ids[i:i + r]) for i in range(0, len(ids), r))
        text = decode(ids)
        cuts = np.minimum(_prefix_ends(ids, decode, step=r), len(text)).tolist()
        return GROUP_SEPARATOR.join(text[a:b] for a, b in zip(cuts, cuts[1:]))

    def layout(self, text: str, where: str = "", count: bool = True) -> tuple[_Size, list[str], bool]:
        """(size bucket, lines, grid) for the largest size at which the text fits; ``where``
        (e.g. ``file.jsonl:12``) is recorded with any missing glyphs (not with ``count=False``:
        a second look at a drawn text). With tiles, the lines of tile ``i`` are
        ``lines[i * size.max_rows:(i + 1) * size.max_rows]``."""
        if self.config.tile_tokens:
            groups = text.split(GROUP_SEPARATOR)
            if len(groups) > self.tiles:
                self.stats.rejected_no_fit += 1
                raise RenderRejected(f"{len(groups)} token groups do not fit {self.tiles} tiles")
            return self._group_layout([" ".join(self._paragraphs(group, where, count)) for group in groups])
        paragraphs = self._paragraphs(text, where, count)
        if self.config.tile:
            return self._tile_layout(" ".join(paragraphs))
        chars = set("".join(paragraphs))
        for size in self.sizes:
            if size.max_rows == 0:
                continue
            grid = size.is_grid(chars)
            if grid:
                cols = size.cols
                if sum(-(-len(p) // cols) or 1 for p in paragraphs) > size.max_rows:
                    continue  # a lower bound on the rows already overflows
                wrap = lambda p, n=cols: _wrap_cols(p, n)  # noqa: E731
            else:
                adv, max_width = size.advance, size.max_width
                width = lambda s, adv=adv: sum(adv(c) for c in s)  # noqa: E731
                split = lambda w, adv=adv, m=max_width: _split_px(w, adv, m)  # noqa: E731
                wrap = lambda p, m=max_width, w=width, s=split: _wrap(p, m, w, s)  # noqa: E731
            lines: list[str] = []
            for p in paragraphs:
                lines += wrap(p)
                if len(lines) > size.max_rows:
                    break
            else:
                return size, lines, grid
        self.stats.rejected_no_fit += 1
        raise RenderRejected(f"{len(text)} characters do not fit a {self.config.image_size}px sketch "
                             f"even at {self.sizes[-1].size}px")

    def _tile_layout(self, stream: str) -> tuple[_Size, list[str], bool]:
        tiles = (self.config.image_size // self.config.tile) ** 2
        for size in self.sizes:
            if size.max_rows and size.cols and size.is_grid(set(stream)) and \
                    len(stream) <= tiles * size.max_rows * size.cols:
                return size, [stream[i:i + size.cols] for i in range(0, len(stream), size.cols)] or [""], True
        self.stats.rejected_no_fit += 1
        raise RenderRejected(f"{len(stream)} characters do not fit {tiles} tiles of {self.config.tile}px "
                             f"even at {self.sizes[-1].size}px")

    def _group_layout(self, groups: list[str]) -> tuple[_Size, list[str], bool]:
        """Token-aligned tiles: group k alone in tile k, at the largest size where every group
        fits its tile (each tile gets exactly ``max_rows`` lines, so tile i's lines are
        ``lines[i * max_rows:(i + 1) * max_rows]`` as for the character-filled tiles)."""
        tiles = self.tiles
        chars = set("".join(groups))
        for size in self.sizes:
            capacity = size.max_rows * size.cols
            if len(groups) <= tiles and capacity and size.is_grid(chars) and \
                    all(len(group) <= capacity for group in groups):
                return size, [group[i * size.cols:(i + 1) * size.cols] for group in groups
                              for i in range(size.max_rows)], True
        self.stats.rejected_no_fit += 1
        longest = max(groups, key=len)
        raise RenderRejected(f"{len(groups)} token groups do not fit {tiles} tiles of {self.config.tile}px "
                             f"even at {self.sizes[-1].size}px (longest: {len(longest)} characters)")

    def _boxes(self, size: _Size, lines: list[str]):
        """(top, left, box size, lines) of each text box: the page, or each filled tile."""
        c = self.config
        if not c.tile:
            yield 0, 0, c.image_size, lines
            return
        per_row = c.image_size // c.tile
        for index in range(0, -(-len(lines) // size.max_rows)):
            top, left = divmod(index, per_row)
            yield top * c.tile, left * c.tile, c.tile, lines[index * size.max_rows:(index + 1) * size.max_rows]

    # ---- drawing ------------------------------------------------------------------------
    def render(self, text: str, method: Literal["auto", "atlas", "pillow"] = "auto",
               where: str = "") -> np.ndarray:
        """The sketch of ``text`` as uint8 [S, S, 3]; raises RenderRejected (counted)."""
        size, lines, grid = self.layout(text, where)
        c = self.config
        image = np.full((c.image_size, c.image_size, 3), c.background, np.uint8)
        for top, left, box, box_lines in self._boxes(size, lines):
            drawn = None
            if method == "atlas" or (method == "auto" and c.fast and grid):
                if grid:
                    drawn = size.atlas(c).draw(box_lines, size.cols, size.max_rows, box, c.margin)
                if drawn is None:
                    self.stats.atlas_fallbacks += 1
            if drawn is None:
                drawn = self._draw_pillow(size, box_lines, box)
            image[top:top + box, left:left + box] = drawn
        self.stats.rendered += 1
        self.stats.smaller_bucket += size is not self.sizes[0]
        self.stats.by_size[size.size] += 1
        return image

    def glyph_map(self, text: str, cell: int) -> np.ndarray:
        """uint8 [S/cell, S/cell]: the glyph class (``row_contract.glyph_class``) of the
        character whose box holds each ``cell``-pixel square's centre, on the same layout
        ``render`` draws (line ``r`` at ``margin + r * pitch``, characters advancing by their
        widths); blank where no character is. The dense target of the vision objective."""
        from vist2_jax.row_contract import GLYPH_BLANK, glyph_class

        size, lines, _ = self.layout(text, count=False)  # render() counted this text's missing glyphs
        grid = self.config.image_size // cell
        out = np.full((grid, grid), GLYPH_BLANK, np.uint8)
        for top, left, box, box_lines in self._boxes(size, lines):
            if top % cell or left % cell or box % cell:
                raise ValueError(f"glyph cells of {cell}px do not tile {box}px text boxes")
            view = out[top // cell:(top + box) // cell, left // cell:(left + box) // cell]
            view[...] = self._glyph_cells(size, box_lines, box, cell)
        return out

    def tile_token_ids(self, ids, decode, slots: int, per_slot: int) -> np.ndarray:
        """int32 [slots, per_slot]: with the tile layout, the ids of the tokens whose (non-space)
        characters tile k shows, in reading order; a token cut by a tile edge counts in both
        tiles, a tile keeps its first ``per_slot``; ``TILE_TOKEN_NONE`` elsewhere. ``decode``
        turns ids into the text the sketch shows. The target of the tile-token objective
        (docs/design.md §4): the renderer knows which tokens each visual token must carry.
        With token-aligned tiles (``tile_tokens`` = r) tile k's are tokens k*r .. k*r + r - 1."""
        from vist2_jax.row_contract import TILE_TOKEN_NONE

        if not self.config.tile:
            raise ValueError("tile tokens need the tile layout (data.sketch_tile > 0)")
        ids = list(ids)
        out = np.full((slots, per_slot), TILE_TOKEN_NONE, np.int32)
        if self.config.tile_tokens:  # token-aligned tiles: tile k shows tokens k*r .. k*r + r - 1
            r = self.config.tile_tokens
            for i, token in enumerate(ids[:slots * r]):
                if i % r < per_slot:
                    out[i // r, i % r] = token
            return out
        text = decode(ids)
        size, _, _ = self.layout(text, count=False)
        capacity = size.max_rows * size.cols
        tab = self.config.tab_size

        def stream(piece: str) -> str:  # the characters _tile_layout lays out, in order
            return " ".join(p.expandtabs(tab) for p in piece.splitlines())

        full = stream(text)
        ends = np.minimum(_prefix_ends(ids, decode, stream), len(full))
        used = np.zeros(slots, np.int64)
        for i, token in enumerate(ids):
            start, stop = int(ends[i]), int(ends[i + 1])
            chars = full[start:stop]
            lead = len(chars) - len(chars.lstrip(" "))
            if lead == len(chars):
                continue  # spaces only: nothing to see
            for tile in range((start + lead) // capacity, min(slots, (stop - 1) // capacity + 1)):
                if used[tile] < per_slot:
                    out[tile, used[tile]] = token
                    used[tile] += 1
        return out

    def _glyph_cells(self, size: _Size, lines: list[str], box: int, cell: int) -> np.ndarray:
        from vist2_jax.row_contract import GLYPH_BLANK, glyph_class

        grid = box // cell
        out = np.full((grid, grid), GLYPH_BLANK, np.uint8)
        centres = np.arange(grid) * cell + cell / 2
        margin = self.config.margin
        for row, line in enumerate(lines):
            top = margin + row * size.pitch
            ys = np.flatnonzero((centres >= top) & (centres < top + size.pitch))
            if not len(ys):
                continue
            x = float(margin)
            edges = [x]
            for ch in line:
                x += size.advance(ch)
                edges.append(x)
            which = np.searchsorted(np.asarray(edges), centres, side="right") - 1
            inside = (which >= 0) & (which < len(line))
            classes = np.asarray([glyph_class(ch) for ch in line] or [GLYPH_BLANK], np.uint8)
            out[ys[:, None], np.flatnonzero(inside)[None, :]] = classes[which[inside]][None, :]
        return out

    def try_render(self, text: str, where: str = "") -> np.ndarray | None:
        """Like ``render`` but returns None for a rejected chunk (still counted)."""
        try:
            return self.render(text, where=where)
        except RenderRejected:
            return None

    def _draw_pillow(self, size: _Size, lines: list[str], box: int) -> np.ndarray:
        c = self.config
        canvas = Image.new("L", (box, box), c.background)
        draw = ImageDraw.Draw(canvas)
        for row, line in enumerate(lines):
            if line.strip(" "):
                draw.text((c.margin, c.margin + row * size.pitch), line, fill=c.foreground, font=size.font)
        gray = np.asarray(canvas)
        return np.repeat(gray[:, :, None], 3, axis=2)


def _split_px(word: str, advance, max_width: float) -> tuple[str, str]:
    used, n = 0.0, 0
    for n, ch in enumerate(word):
        used += advance(ch)
        if used > max_width:
            break
    n = max(n, 1)  # a glyph wider than the line still makes progress
    return word[:n], word[n:]


def render_config_for(data, image_size: int) -> RenderConfig:
    """The RenderConfig of a run's ``DataConfig`` (``data.font_*``) at the model's image size."""
    return RenderConfig(image_size=image_size, font_path=data.font_path or None,
                        font_family=data.font_family, font_index=data.font_index,
                        font_sha256=data.font_sha256 or None, font_sizes=tuple(data.font_sizes),
                        tile=data.sketch_tile, tile_tokens=data.sketch_tile_tokens)


def renderer_for_config(data, image_size: int) -> SketchRenderer:
    """The run's renderer (``data``: its DataConfig); a font problem is a ConfigError naming the key."""
    from vist2_jax.config.schema import ConfigError

    try:
        return SketchRenderer(render_config_for(data, image_size))
    except FontError as err:
        key = "data.font_sha256" if isinstance(err, FontHashMismatch) else (
            "data.font_path" if data.font_path else "data.font_family")
        raise ConfigError(f"{key}: {err}") from None


def renderer_from_saved(saved: dict, font_path: str | None = None) -> SketchRenderer:
    """The renderer a run drew its sketches with, from ``renderer_config()`` as saved in its
    checkpoint. The font must hash to the recorded sha256 (FontError, one line, otherwise):
    a bundled font is matched by hash; a configured file is read from the recorded path,
    or from ``font_path`` when it lives elsewhere on this machine."""
    try:
        sha256, recorded = saved["font_sha256"], saved["font_file"]
        family = saved.get("font_family") or ""
        if recorded == "builtin" and not font_path:
            raise FontError("this run was rendered with Pillow's built-in font, which the renderer no "
                            "longer uses; pass the font file explicitly")
        if not font_path and not family:
            bundled = bundled_with_hash(sha256)
            family = bundled.family if bundled else ""
        path = font_path or (None if family in BUNDLED else recorded)
        config = RenderConfig(
            image_size=saved["image_size"], font_path=path, font_family=family or DEFAULT_FAMILY,
            font_index=saved.get("font_index", 0), font_sha256=sha256,
            font_sizes=tuple(saved["font_sizes_px"]), margin=saved["margin"], tile=saved.get("tile", 0),
            tile_tokens=saved.get("tile_tokens", 0),
            line_spacing=saved["line_spacing"], tab_size=saved["tab_size"],
            missing_glyphs=saved["missing_glyphs"], replacement=saved["replacement"],
            foreground=saved["foreground"], background=saved["background"])
    except KeyError as err:
        raise FontError(f"saved renderer config lacks {err.args[0]!r}") from None
    renderer = SketchRenderer(config)
    then = {k: saved.get(k) for k in ("pillow", "freetype")}
    now = {k: renderer.renderer_config()[k] for k in then}
    if then != now:  # same font and layout; the rasterizer may round a few pixels differently
        log.warning("the run drew its sketches with Pillow %s / FreeType %s, this is Pillow %s / FreeType %s",
                    then["pillow"], then["freetype"], now["pillow"], now["freetype"])
    return renderer
