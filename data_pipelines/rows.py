"""Building rows of the row contract (``vist2_jax/row_contract.py``): a row builder and the OLM packer.

Every text span starts with a marker (``<|chunk|>``; a transcription's: the tokenizer's
``bos``, row_contract), whose output predicts the span's
first token; the target at position i is the token at i+1 inside the same span and the
span's last token carries no loss (a following chunk's first token is predicted by that
chunk's own marker, which sees the visual memory). Visual spans are exactly m positions
and take the row's images in order. Positions are continuous inside a document (segment),
except that a visual token takes ``visual_stride`` positions (``model.layout.visual_stride``);
trailing padding gets its own segment id.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vist2_jax.row_contract import (GLYPH_CELL, GLYPH_UNKNOWN, ROW_FIELDS, TEXT, TILE_TOKEN_NONE, TILE_TOKENS,
                                    VISUAL, text_span_cost)


class RowOverflow(ValueError):
    """The spans do not fit in the row's positions or image slots."""


class RowBuilder:
    """Append text and image spans to one row of ``seq_len`` positions and ``num_slots`` images."""

    def __init__(self, seq_len: int, visual_len: int, num_slots: int, image_shape: tuple[int, int],
                 chunk_token: int, visual_stride: int = 1):
        self.seq_len, self.visual_len, self.chunk_token = seq_len, visual_len, chunk_token
        self.visual_stride = visual_stride  # positions per visual token (model.layout.visual_stride)
        self.fields = {name: np.zeros((seq_len,), dtype) for name, dtype in ROW_FIELDS.items()}
        self.images = np.zeros((num_slots, *image_shape, 3), np.uint8)
        self.image_mask = np.zeros((num_slots,), bool)
        glyph_shape = tuple(max(1, side // GLYPH_CELL) for side in image_shape)
        self.glyphs = np.full((num_slots, *glyph_shape), GLYPH_UNKNOWN, np.uint8)
        self.tile_tokens = np.full((num_slots, visual_len, TILE_TOKENS), TILE_TOKEN_NONE, np.int32)
        self.cursor = self.slot = self.segment = self.position = 0

    def free(self) -> int:
        return self.seq_len - self.cursor

    def text_cost(self, num_tokens: int) -> int:
        return text_span_cost(num_tokens)

    def start_document(self) -> None:
        self.segment += 1
        self.position = 0

    def _claim(self, length: int, modality: int, chunk_id: int, stride: int = 1) -> slice:
        if self.segment == 0:
            raise RuntimeError("start_document() before adding spans")
        if self.cursor + length > self.seq_len:
            raise RowOverflow(f"a span of {length} does not fit: {self.free()} of {self.seq_len} positions left")
        span = slice(self.cursor, self.cursor + length)
        self.fields["modality"][span] = modality
        self.fields["chunk_id"][span] = chunk_id
        self.fields["segment_id"][span] = self.segment
        self.fields["positions"][span] = self.position + stride * np.arange(length)
        self.cursor += length
        self.position += stride * length
        return span

    def add_text(self, tokens: Sequence[int], chunk_id: int, loss: bool = True, marker: int | None = None) -> None:
        """``<|chunk|>`` (or ``marker``: a transcription's, row_contract) + tokens; targets
        are the next tokens of this span."""
        tokens = list(tokens)
        span = self._claim(self.text_cost(len(tokens)), TEXT, chunk_id)
        self.fields["tokens"][span] = [self.chunk_token if marker is None else marker, *tokens]
        if tokens:
            self.fields["targets"][span.start:span.stop - 1] = tokens
            self.fields["loss_mask"][span.start:span.stop - 1] = 1.0 if loss else 0.0

    def add_image(self, image: np.ndarray, chunk_id: int, glyphs: np.ndarray | None = None,
                  tile_tokens: np.ndarray | None = None) -> None:
        """An image span; ``glyphs`` is the sketch's glyph map (``SketchRenderer.glyph_map``)
        and ``tile_tokens`` its [m, TILE_TOKENS] tile-token targets
        (``SketchRenderer.tile_token_ids``), each left unknown when not given."""
        if self.slot >= len(self.image_mask):
            raise RowOverflow(f"all {len(self.image_mask)} image slots are used")
        self._claim(self.visual_len, VISUAL, chunk_id, self.visual_stride)
        self.images[self.slot] = image
        self.image_mask[self.slot] = True
        if glyphs is not None:
            self.glyphs[self.slot] = glyphs
        if tile_tokens is not None:
            self.tile_tokens[self.slot] = tile_tokens
        self.slot += 1

    def add_olm_document(self, chunks: Sequence[Sequence[int]], images: Sequence[np.ndarray],
                         targets: Sequence[dict] | None = None, start_weight: tuple[int, float] = (0, 1.0)) -> None:
        """One document ``[T1][V1][T2]...``: chunk c's text and image share chunk id c; the
        last chunk gets no image (no later chunk would read it), so ``images[c]`` is used
        for every chunk but the last; ``targets[c]`` are its ``add_image`` keywords.
        ``start_weight`` (n, w): the first n targets of every chunk after the first weigh w."""
        self.start_document()
        first, weight = start_weight
        for index, chunk in enumerate(chunks):
            start = self.cursor
            self.add_text(chunk, chunk_id=index + 1)
            if index and first:
                self.fields["loss_mask"][start:min(start + first, self.cursor)] *= weight
            if index < len(chunks) - 1:
                self.add_image(images[index], chunk_id=index + 1, **(targets[index] if targets else {}))

    def finish(self) -> dict[str, np.ndarray]:
        rest = slice(self.cursor, self.seq_len)
        self.fields["segment_id"][rest] = self.segment + 1
        self.fields["positions"][rest] = np.arange(self.seq_len - self.cursor)
        return {**self.fields, "images": self.images, "image_mask": self.image_mask, "glyphs": self.glyphs,
                "tile_tokens": self.tile_tokens}


def pack_olm_row(documents: Sequence[Sequence[Sequence[int]]],
                 images: Sequence[Sequence[np.ndarray]], *, seq_len: int, visual_len: int,
                 num_image_slots: int, image_shape: tuple[int, int], chunk_token: int,
                 visual_stride: int = 1) -> dict[str, np.ndarray]:
    """Pack documents (each a list of token-id chunks) into one OLM row ``[T1][V1][T2]...``.

    ``images[d][c]`` is the sketch of chunk c of document d (see ``add_olm_document``).
    """
    row = RowBuilder(seq_len, visual_len, num_image_slots, image_shape, chunk_token, visual_stride)
    for chunks, doc_images in zip(documents, images):
        row.add_olm_document(chunks, doc_images)
    return row.finish()
