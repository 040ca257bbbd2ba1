"""The row contract (docs/design.md §2): the one home of what every part agrees on.

A packed row of decoder length S is a set of arrays (``ROW_FIELDS`` plus ``images`` and
``image_mask``); the data pipelines write them, the model, the kernels, the loss and the
generator read them. This module holds the field names and dtypes, the modality codes,
the fixed special token ids and the chunk-id rule, and nothing that needs JAX, so the
data pipelines, PyTorch export and the tests import it alone.

Chunk-id rule: in OLM rows a text chunk and the image of that same text share one id
(``[T1][V1][T2]`` is ``1,1,2``; ``T2`` reads ``V1``). A text span that *reads* an image
(a caption, an OCR answer, a response after a rendered query) takes the next id after
that image (``[V_img][T_caption]`` is ``1,2``): ``reader_chunk_id``.

Markers: every text span opens with a marker whose output predicts its first token,
``<|chunk|>``, except a transcription (an OCR answer), which opens with the tokenizer's
``bos`` piece. Under the mask an OCR answer ``[V_a][T_a]`` and an OLM continuation
``[T1][V1][T2]`` look the same to their text (one image before it, at the same relative
positions; ``T2`` cannot see ``T1``), so only the marker tells "transcribe this image" from
"continue after it" once both are trained (stage 3 mixes them).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

# Modality codes of the ``modality`` field.
PAD, TEXT, VISUAL = 0, 1, 2

# Per-position fields: name -> dtype, each [B, S].
ROW_FIELDS: Mapping[str, type] = {
    "tokens": np.int32, "modality": np.int8, "chunk_id": np.int32, "segment_id": np.int32,
    "positions": np.int32, "targets": np.int32, "loss_mask": np.float32,
}
# Per-image fields: ``images`` uint8 [B, N, H, W, 3], ``image_mask`` bool [B, N], and
# ``glyphs`` uint8 [B, N, H/GLYPH_CELL, W/GLYPH_CELL]: which character each GLYPH_CELL-pixel
# cell of a sketch shows (the renderer knows; the dense target of the text-oriented vision
# objective, docs/design.md §4), GLYPH_UNKNOWN where nobody knows (photos, empty slots); and
# ``tile_tokens`` int32 [B, N, m, TILE_TOKENS]: with one tile per visual token, the ids of the
# text tokens drawn in visual token k's tile (the tile-token objective, §4), TILE_TOKEN_NONE
# in the unused entries and wherever nobody knows.
IMAGE_FIELDS: Mapping[str, type] = {"images": np.uint8, "image_mask": np.bool_, "glyphs": np.uint8,
                                    "tile_tokens": np.int32}
TILE_TOKENS, TILE_TOKEN_NONE = 6, -1
GLYPH_CELL = 4  # pixels per side of one glyph-target cell (narrower than any glyph: none is skipped)
GLYPH_BLANK, GLYPH_OTHER, GLYPH_UNKNOWN = 0, 95, 255  # 1..94: printable ASCII '!'..'~'
GLYPH_CLASSES = 96


def glyph_class(ch: str) -> int:
    """The glyph-target class of one character: blank for whitespace, 1..94 for printable
    ASCII, GLYPH_OTHER for anything else."""
    code = ord(ch)
    if ch.isspace():
        return GLYPH_BLANK
    return code - 0x20 if 0x21 <= code <= 0x7E else GLYPH_OTHER
ALL_FIELDS = (*ROW_FIELDS, *IMAGE_FIELDS)

# Special tokens: name -> piece, in id order starting at 0. The order is the on-disk
# contract of our tokenizers (never reorder); HF tokenizers map the names to their ids.
SPECIAL_TOKENS: Mapping[str, str] = {
    "pad": "<pad>", "eos": "</s>", "bos": "<s>", "chunk": "<|chunk|>",
    "system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "end": "<|end|>",
}
PAD_ID, EOS_ID, BOS_ID, CHUNK_ID = 0, 1, 2, 3  # CHUNK_ID: the ``<|chunk|>`` marker opening every text span
assert [*SPECIAL_TOKENS][:4] == ["pad", "eos", "bos", "chunk"]


def reader_chunk_id(image_chunk_id: int) -> int:
    """The chunk id of a text span that reads the image of ``image_chunk_id``."""
    return image_chunk_id + 1


def text_span_cost(num_tokens: int) -> int:
    """Positions a text span of ``num_tokens`` takes: the ``<|chunk|>`` marker plus the tokens."""
    return 1 + num_tokens


def stack_rows(rows):
    """Rows (dicts of per-row arrays) -> one batch with a leading [B] axis."""
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}


def strip_visual(row: Mapping[str, np.ndarray], carry: Mapping[str, np.ndarray] | None = None,
                 keep_chunks: bool = False) -> dict:
    """The row's text alone: visual spans removed, one chunk id per document and positions
    0.. per document, so each chunk reads the earlier chunks' text itself through plain
    causal attention (the native-LM reading of the same documents and targets: the
    ``data.text_only`` baseline and the memory evaluation's ``text`` control). ``carry``:
    other per-position arrays of the row to move with the text (returned under their keys).
    ``keep_chunks``: the chunk ids stay, so each chunk sees its own text only (no context:
    the memory evaluation's ``text_alone`` control)."""
    keep = row["modality"] != VISUAL
    seq_len, n = len(row["tokens"]), int(keep.sum())
    out = {name: np.zeros(seq_len, dtype) for name, dtype in ROW_FIELDS.items()}
    for name in ("tokens", "modality", "segment_id", "targets", "loss_mask"):
        out[name][:n] = row[name][keep]
    for name, values in (carry or {}).items():
        out[name] = np.zeros(seq_len, values.dtype)
        out[name][:n] = values[keep]
    out["chunk_id"][:n] = row["chunk_id"][keep] if keep_chunks else np.where(out["modality"][:n] != PAD, 1, 0)
    segments = out["segment_id"]
    segments[n:] = segments[:n].max(initial=0) + 1
    for segment in np.unique(segments):
        where = segments == segment
        out["positions"][where] = np.arange(where.sum())
    images = {name: row[name] for name in IMAGE_FIELDS if name in row}
    return {**images, **out, "image_mask": np.zeros_like(row["image_mask"])}


def validate_batch(batch: Mapping[str, np.ndarray], visual_len: int) -> None:
    """Check a batch against the contract; raises ValueError naming the first violation."""
    for name, dtype in ROW_FIELDS.items():
        if name not in batch:
            raise ValueError(f"row contract: missing field {name!r}")
        if batch[name].dtype != dtype or batch[name].ndim != 2:
            raise ValueError(f"row contract: {name} must be {np.dtype(dtype)} [B,S], "
                             f"got {batch[name].dtype} {batch[name].shape}")
    images, image_mask = batch["images"], batch["image_mask"]
    if images.dtype != np.uint8 or images.ndim != 5:
        raise ValueError(f"row contract: images must be uint8 [B,N,H,W,3], got {images.dtype} {images.shape}")
    visual = np.asarray(batch["modality"]) == VISUAL
    counts = visual.sum(axis=1)
    if np.any(counts % visual_len):
        raise ValueError(f"row contract: visual positions per row {counts.tolist()} are not "
                         f"multiples of m={visual_len}")
    if np.any(counts // visual_len > np.asarray(image_mask).sum(axis=1)):
        raise ValueError("row contract: more visual spans than real image slots")


def close_chunk(tokens, try_render):
    """The chunk rule, shared by training and generation: walking a document's tokens, a
    chunk closes when it holds L tokens, or before the token that would make its text too
    large for a sketch; the next chunk starts at that token. Text is never dropped or
    truncated, and every closed chunk is one the renderer accepts.

    ``tokens`` is the next window of a document (at most L tokens); ``try_render(prefix)``
    returns the sketch or None when the renderer rejects it. Returns ``(k, sketch)`` for the
    longest prefix that renders (the whole window when it does; found by bisection, as a
    longer text never fits where a shorter one does not)."""
    image = try_render(tokens)
    if image is not None:
        return len(tokens), image
    low, high, best = 1, len(tokens) - 1, None
    while low <= high:
        mid = (low + high) // 2
        found = try_render(tokens[:mid])
        if found is None:
            high = mid - 1
        else:
            low, best = mid + 1, (mid, found)
    if best is None:
        raise ValueError(f"the renderer rejects even the first token of the chunk {list(tokens[:1])}")
    return best
