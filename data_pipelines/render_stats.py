"""What the sketch renderer did (docs/design.md §4), as counters a trainer can log and merge.

Besides rendered / smaller-bucket / rejected counts, every character the font cannot
draw is counted by reason (control character, or the script the font lacks: CJK,
Hebrew, Arabic, emoji, ...), with the first few code points and the first few places
(``where``, a location string from the caller) it was seen.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MAX_EXAMPLES = 8  # distinct code points and locations kept per reason
_RANGES = (  # (first, last, reason); checked in order
    (0x00, 0x1F, "control"), (0x7F, 0x9F, "control"), (0xD800, 0xDFFF, "surrogate"),
    (0x0590, 0x05FF, "hebrew"), (0xFB1D, 0xFB4F, "hebrew"),
    (0x0600, 0x06FF, "arabic"), (0x0750, 0x077F, "arabic"), (0x08A0, 0x08FF, "arabic"),
    (0xFB50, 0xFDFF, "arabic"), (0xFE70, 0xFEFF, "arabic"),
    (0x1100, 0x11FF, "cjk"), (0x2E80, 0x9FFF, "cjk"), (0xA960, 0xA97F, "cjk"), (0xAC00, 0xD7FF, "cjk"),
    (0xF900, 0xFAFF, "cjk"), (0xFF00, 0xFFEF, "cjk"), (0x20000, 0x3FFFF, "cjk"),
    (0x2600, 0x27BF, "emoji"), (0x1F000, 0x1FAFF, "emoji"), (0xFE00, 0xFE0F, "emoji"),
)


def missing_reason(code: int) -> str:
    """Why a code point the font cannot draw is missing: its control class or script."""
    for first, last, reason in _RANGES:
        if first <= code <= last:
            return reason
    return "other"


def codepoint(code: int) -> str:
    return f"U+{code:04X}"


@dataclasses.dataclass
class MissingGlyphs:
    """Missing characters of one reason: total, first code points (-> count), first places."""

    count: int = 0
    chars: dict[int, int] = dataclasses.field(default_factory=dict)
    where: list[str] = dataclasses.field(default_factory=list)

    def add(self, code: int, count: int, where: str) -> None:
        self.count += count
        if code in self.chars or len(self.chars) < MAX_EXAMPLES:
            self.chars[code] = self.chars.get(code, 0) + count
        self.add_where(where)

    def add_where(self, where: str) -> None:
        if where and where not in self.where and len(self.where) < MAX_EXAMPLES:
            self.where.append(where)

    def as_dict(self) -> dict:
        return {"count": self.count, "chars": {codepoint(c): n for c, n in self.chars.items()},
                "where": list(self.where)}


@dataclasses.dataclass
class RenderStats:
    """Counters of one renderer; ``merge`` sums several (threads, workers, hosts)."""

    rendered: int = 0
    smaller_bucket: int = 0
    rejected_no_fit: int = 0
    rejected_missing_glyphs: int = 0
    atlas_fallbacks: int = 0
    by_size: dict[int, int] = dataclasses.field(default_factory=dict)
    missing: dict[str, MissingGlyphs] = dataclasses.field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return self.rejected_no_fit + self.rejected_missing_glyphs

    @property
    def missing_glyphs(self) -> int:
        return sum(m.count for m in self.missing.values())

    def add_missing(self, codes: np.ndarray, where: str = "") -> None:
        """Count the code points ``codes`` (one entry per occurrence) seen at ``where``."""
        values, counts = np.unique(codes, return_counts=True)
        for code, count in zip(values.tolist(), counts.tolist()):
            reason = missing_reason(code)
            self.missing.setdefault(reason, MissingGlyphs()).add(code, count, where)

    def merge(self, other: RenderStats | dict) -> RenderStats:
        """Add ``other`` (a RenderStats or its ``as_dict()``) into this one; returns self."""
        if isinstance(other, dict):
            other = RenderStats.from_dict(other)
        for name in ("rendered", "smaller_bucket", "rejected_no_fit", "rejected_missing_glyphs",
                     "atlas_fallbacks"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for size, n in other.by_size.items():
            self.by_size[size] = self.by_size.get(size, 0) + n
        for reason, theirs in other.missing.items():
            mine = self.missing.setdefault(reason, MissingGlyphs())
            mine.count += theirs.count - sum(theirs.chars.values())  # occurrences past the examples
            for code, n in theirs.chars.items():
                mine.add(code, n, "")
            for where in theirs.where:
                mine.add_where(where)
        return self

    def as_dict(self) -> dict:
        """JSON-able: for ``summary.json``, logs, or sending across processes."""
        return {"rendered": self.rendered, "smaller_bucket": self.smaller_bucket,
                "rejected": self.rejected, "rejected_no_fit": self.rejected_no_fit,
                "rejected_missing_glyphs": self.rejected_missing_glyphs,
                "atlas_fallbacks": self.atlas_fallbacks,
                "by_font_px": {str(s): n for s, n in sorted(self.by_size.items(), reverse=True)},
                "missing_glyphs": self.missing_glyphs,
                "missing_glyphs_by_reason": {r: m.as_dict() for r, m in sorted(self.missing.items())}}

    @classmethod
    def from_dict(cls, d: dict) -> RenderStats:
        missing = {r: MissingGlyphs(m["count"], {int(c[2:], 16): n for c, n in m["chars"].items()},
                                    list(m["where"]))
                   for r, m in d.get("missing_glyphs_by_reason", {}).items()}
        return cls(d["rendered"], d["smaller_bucket"], d["rejected_no_fit"], d["rejected_missing_glyphs"],
                   d["atlas_fallbacks"], {int(s): n for s, n in d["by_font_px"].items()}, missing)

    def scalars(self, prefix: str = "render/") -> dict[str, int]:
        """Flat integer counters, e.g. for one line of ``metrics.jsonl``."""
        out = {f"{prefix}{k}": v for k, v in self.as_dict().items() if isinstance(v, int)}
        out.update({f"{prefix}missing_glyphs/{r}": m.count for r, m in sorted(self.missing.items())})
        return out

    def missing_summary(self) -> str:
        """One log line naming the missing characters and where they were, e.g.
        ``cjk 12 (U+65E5 '日' x3, ...) at a.jsonl:4; emoji 1 (...)``; "none" when none."""
        parts = []
        for reason, m in sorted(self.missing.items()):
            chars = ", ".join(f"{codepoint(c)} {chr(c)!r} x{n}" for c, n in m.chars.items())
            where = f" at {', '.join(m.where)}" if m.where else ""
            parts.append(f"{reason} {m.count} ({chars}){where}")
        return "; ".join(parts) if parts else "none"


def sum_stats(parts) -> RenderStats:
    """One RenderStats from several (RenderStats or ``as_dict()`` records)."""
    total = RenderStats()
    for part in parts:
        total.merge(part)
    return total
