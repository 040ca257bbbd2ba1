"""The held-out documents of a source: a deterministic document-level split.

Evaluation must read documents the run never trained on, or a model could recite rather
than read. A document is held out when a stable hash of its location (``file:line``
without the folder, ``embedded:i``, a prepared record's stored location) falls below
``HELD_OUT_SHARE`` of the hash range, so the same document is held out whatever the stage, the sample order, the
process, and whether the source is read in memory or prepared. Training row makers redraw
a held-out document; evaluation row makers redraw until they hold one. Both stay pure
functions of ``(seed, i)``, and neither reads more than the documents it draws (a
prepared source is never scanned).

Small sources (at most ``SCAN_LIMIT`` documents) are scanned: when the share selects no
document, the one with the smallest hash is held out. A source of fewer than
``MIN_DOCUMENTS`` cannot spare one: it has no split, and evaluation reads the documents the
run trains on (logged).
"""

from __future__ import annotations

import logging
import zlib
from typing import Sequence

log = logging.getLogger(__name__)
HELD_OUT_SHARE = 0.05
MIN_DOCUMENTS = 16
SCAN_LIMIT = 4096
_RANGE = 2 ** 64
TRAIN, HELD_OUT = "train", "held_out"


def location_hash(location: str) -> int:
    """splitmix64 of the CRC-32 of the location's last path part (``doc3.txt:12``): stable
    across processes and Python versions, and wherever the source folder lives."""
    key = location.rsplit("/", 1)[-1]
    z = (zlib.crc32(key.encode("utf-8")) + 0x9E3779B97F4A7C15) % _RANGE
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % _RANGE
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % _RANGE
    return z ^ (z >> 31)


def _location(samples: Sequence, index: int) -> str:
    """A document's location; a prepared source reads it without tokenizing the record."""
    if hasattr(samples, "location"):
        return samples.location(index)
    return samples[index].location


class DocumentSplit:
    """Which documents of ``samples`` are held out: ``location_hash < threshold``. Picklable
    and small (one number)."""

    def __init__(self, samples: Sequence):
        count = len(samples)
        self.enabled = count >= MIN_DOCUMENTS
        self.threshold = int(HELD_OUT_SHARE * _RANGE)
        if 0 < count < MIN_DOCUMENTS:
            log.warning("the source has %d documents, too few to hold any out: evaluation reads documents "
                        "the run trains on", count)
        if self.enabled and count <= SCAN_LIMIT:
            hashes = sorted(location_hash(_location(samples, i)) for i in range(count))
            if hashes[0] >= self.threshold:
                self.threshold = hashes[0] + 1
            self.enabled = self.threshold <= hashes[-1]  # one location everywhere: no split

    def is_held_out(self, location: str) -> bool:
        return self.enabled and location_hash(location) < self.threshold

    def draw(self, rng, samples: Sequence, side: str | None):
        """The sample one row takes: any (``side`` None, or no split), a training one (redrawn
        while held out) or a held-out one (redrawn until it is)."""
        while True:
            sample = samples[int(rng.integers(len(samples)))]
            if side is None or not self.enabled or self.is_held_out(sample.location) == (side == HELD_OUT):
                return sample
