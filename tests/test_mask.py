"""The reference vision-as-memory mask against an independent brute-force loop."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vist2_jax.kernels.mask import PAD, TEXT, VISUAL, RowMeta, vision_memory_mask


def brute_force_mask(modality, chunk, segment, positions, past_visual):
    """docs/design.md §3 written as plain Python branches, one (q, k) pair at a time."""
    size = len(modality)
    mask = np.zeros((size, size), bool)
    for qi in range(size):
        for ki in range(size):
            if modality[qi] == PAD:
                mask[qi, ki] = qi == ki
                continue
            if modality[ki] == PAD or segment[qi] != segment[ki] or positions[ki] > positions[qi]:
                continue
            if modality[qi] == TEXT and modality[ki] == TEXT:
                mask[qi, ki] = chunk[qi] == chunk[ki]
            elif modality[qi] == TEXT and modality[ki] == VISUAL:
                mask[qi, ki] = chunk[ki] < chunk[qi]
            elif modality[qi] == VISUAL and modality[ki] == VISUAL:
                mask[qi, ki] = chunk[qi] == chunk[ki] or (past_visual and chunk[ki] < chunk[qi])
            else:  # visual query, text key
                mask[qi, ki] = False
    return mask


@st.composite
def packed_rows(draw):
    """Random packed rows: documents of text/visual spans (any order, OLM-, caption- or
    OCR-like), increasing chunk ids and continuous positions, then trailing padding."""
    modality, chunk, segment, positions = [], [], [], []
    for doc in range(1, draw(st.integers(1, 3)) + 1):
        chunk_id, position = 0, 0
        for _ in range(draw(st.integers(1, 5))):
            kind = draw(st.sampled_from([TEXT, VISUAL]))
            chunk_id += draw(st.integers(0, 1))  # ids may repeat (OLM: T1 V1 share an id)
            for _ in range(draw(st.integers(1, 4))):
                modality.append(kind)
                chunk.append(chunk_id)
                segment.append(doc)
                positions.append(position)
                position += 1
    pad = draw(st.integers(0, 4))
    modality += [PAD] * pad
    chunk += [0] * pad
    segment += [max(segment) + 1] * pad
    positions += list(range(pad))
    return [np.asarray(a, np.int32) for a in (modality, chunk, segment, positions)]


@settings(max_examples=60, deadline=None)
@given(packed_rows(), st.booleans())
def test_reference_matches_brute_force(row, past_visual):
    modality, chunk, segment, positions = row
    meta = RowMeta(*(a[None] for a in (modality.astype(np.int8), chunk, segment, positions)))
    got = np.asarray(vision_memory_mask(meta, past_visual))[0]
    want = brute_force_mask(modality, chunk, segment, positions, past_visual)
    np.testing.assert_array_equal(got, want)
    assert got.any(axis=1).all(), "every query must attend to something (no NaN softmax rows)"


def test_olm_example_by_hand():
    # [T1 T1][V1 V1][T2 T2] in one document, then one pad.
    modality = np.array([[1, 1, 2, 2, 1, 1, 0]], np.int8)
    chunk = np.array([[1, 1, 1, 1, 2, 2, 0]])
    segment = np.array([[1, 1, 1, 1, 1, 1, 2]])
    positions = np.array([[0, 1, 2, 3, 4, 5, 0]])
    mask = np.asarray(vision_memory_mask(RowMeta(modality, chunk, segment, positions)))[0]
    expected = np.array([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 1, 0, 0],  # T2 reads V1 and itself, not T1
        [0, 0, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 1],  # padding: itself only
    ], bool)
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("past_visual", [False, True])
def test_mask_is_invariant_to_a_permutation_of_the_row(past_visual):
    rng = np.random.default_rng(0)
    modality = np.array([1, 1, 2, 2, 1, 1, 2, 2, 1, 0, 0], np.int8)
    chunk = np.array([1, 1, 1, 1, 2, 2, 2, 2, 3, 0, 0])
    segment = np.array([1] * 9 + [2, 2])
    positions = np.array(list(range(9)) + [0, 1])
    meta = RowMeta(*(a[None] for a in (modality, chunk, segment, positions)))
    base = np.asarray(vision_memory_mask(meta, past_visual))[0]
    perm = rng.permutation(len(modality))
    permuted = RowMeta(*(np.asarray(a)[:, perm] for a in meta))
    got = np.asarray(vision_memory_mask(permuted, past_visual))[0]
    np.testing.assert_array_equal(got, base[np.ix_(perm, perm)])
