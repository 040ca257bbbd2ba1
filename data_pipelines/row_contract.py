"""The row contract (DESIGN §2): field specs, a validator, and the OLM row packer.

A text chunk occupies ``1 + len(chunk)`` positions: the ``<|chunk|>`` marker, whose output
predicts the chunk's first token, then the chunk's tokens. Its target at position i is
the token at i+1 inside the same chunk; the chunk's last token carries no loss (the next
chunk's first token is predicted by that chunk's marker, which sees the visual memory).
In OLM rows chunk c's text and image share chunk id c, so ``[T1][V1][T2]`` is ``1,1,2``.
The last chunk of a document gets no image: no later chunk would read it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

PAD, TEXT, VISUAL = 0, 1, 2

ROW_FIELDS = {  # name -> (dtype, rank: 2 for [B,S] fields)
    "tokens": np.int32, "modality": np.int8, "chunk_id": np.int32, "segment_id": np.int32,
    "positions": np.int32, "targets": np.int32, "loss_mask": np.float32,
}


class RowOverflow(ValueError):
    """The documents do not fit in one row of the given length / image slots."""


def pack_olm_row(documents: Sequence[Sequence[Sequence[int]]],
                 images: Sequence[Sequence[np.ndarray]], *, seq_len: int, visual_len: int,
                 num_image_slots: int, image_shape: tuple[int, int], chunk_token: int
                 ) -> dict[str, np.ndarray]:
    """Pack documents (each a list of token-id chunks) into one OLM row.

    ``images[d][c]`` is the rendered sketch (uint8 [H, W, 3]) of chunk c of document d;
    only the first ``len(chunks) - 1`` are used.
    """
    row = {name: np.zeros((seq_len,), dtype) for name, dtype in ROW_FIELDS.items()}
    row_images = np.zeros((num_image_slots, *image_shape, 3), np.uint8)
    image_mask = np.zeros((num_image_slots,), bool)
    cursor, slot = 0, 0
    for segment, (chunks, doc_images) in enumerate(zip(documents, images), start=1):
        position = 0
        for chunk_index, chunk in enumerate(chunks):
            chunk_id = chunk_index + 1
            span = [chunk_token, *chunk]
            end = cursor + len(span)
            if end > seq_len:
                raise RowOverflow(f"document {segment} needs more than seq_len={seq_len} positions")
            sl = slice(cursor, end)
            row["tokens"][sl] = span
            row["modality"][sl] = TEXT
            row["chunk_id"][sl] = chunk_id
            row["segment_id"][sl] = segment
            row["positions"][sl] = np.arange(position, position + len(span))
            row["targets"][cursor:end - 1] = chunk
            row["loss_mask"][cursor:end - 1] = 1.0
            cursor, position = end, position + len(span)
            if chunk_index == len(chunks) - 1:
                continue
            if slot >= num_image_slots or cursor + visual_len > seq_len:
                raise RowOverflow(f"document {segment} needs more image slots or positions")
            sl = slice(cursor, cursor + visual_len)
            row["modality"][sl] = VISUAL
            row["chunk_id"][sl] = chunk_id
            row["segment_id"][sl] = segment
            row["positions"][sl] = np.arange(position, position + visual_len)
            row_images[slot] = doc_images[chunk_index]
            image_mask[slot] = True
            slot += 1
            cursor, position = cursor + visual_len, position + visual_len
    row["segment_id"][cursor:] = len(documents) + 1
    row["positions"][cursor:] = np.arange(seq_len - cursor)
    row["images"], row["image_mask"] = row_images, image_mask
    return row


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}


def validate_batch(batch: dict[str, np.ndarray], visual_len: int) -> None:
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
