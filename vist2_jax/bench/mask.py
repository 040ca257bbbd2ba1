"""``vist2 bench mask``: how much of the vision-as-memory mask a block-sparse kernel visits.

Builds the metadata of a synthetic OLM row (``pack_olm_row`` with 1x1 placeholder images:
only metadata matters), classifies every (q block, kv block) pair with
:func:`vist2_jax.kernels.blocks.classify` in the natural and the visual-first order, and
compares with the exact block classes of the dense reference mask. A text chunk spans
``1 + text_len`` positions (its ``<|chunk|>`` marker, then ``text_len`` tokens), as in real
rows; documents get as many chunks as fit in ``seq_len // docs`` positions.

Wire-up: ``add_parser(bench_subparsers)`` adds the ``mask`` parser, ``run(args)``.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

# The target for S=8192, L=128, m=32, block 128, one document, visual-first order.
TARGET_FRACTION_OF_CAUSAL = 0.30
TARGET_OVER_EXACT = 1.1


def add_parser(bench_subparsers) -> argparse.ArgumentParser:
    parser = bench_subparsers.add_parser(
        "mask", help="block-sparsity of the vision-as-memory mask on a synthetic OLM row")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--text-len", type=int, default=128, help="text tokens per chunk (L)")
    parser.add_argument("--visual-len", type=int, default=32, help="visual tokens per image (m)")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--docs", type=int, default=1, help="documents packed into the row")
    parser.add_argument("--visual-attends-past-visual", action="store_true")
    parser.add_argument("--json", metavar="FILE", help="also write the report here")
    parser.set_defaults(func=run)
    return parser


def synthetic_meta(seq_len: int, text_len: int, visual_len: int, docs: int):
    """RowMeta [1, seq_len] of ``docs`` OLM documents, each filling ``seq_len // docs``."""
    import jax.numpy as jnp

    from data_pipelines.rows import pack_olm_row
    from data_pipelines.tokenizer import CHUNK_ID
    from vist2_jax.kernels.mask import RowMeta

    budget = seq_len // docs
    chunks = (budget + visual_len) // (1 + text_len + visual_len)
    if chunks < 1:
        raise ValueError(f"one chunk of 1+{text_len} positions does not fit in {budget}")
    image = np.zeros((1, 1, 3), np.uint8)
    row = pack_olm_row([[[4] * text_len] * chunks] * docs, [[image] * chunks] * docs,
                       seq_len=seq_len, visual_len=visual_len, num_image_slots=docs * chunks,
                       image_shape=(1, 1), chunk_token=CHUNK_ID)
    meta = RowMeta(*(jnp.asarray(row[name])[None]
                     for name in ("modality", "chunk_id", "segment_id", "positions")))
    return meta, chunks


def order_stats(meta, block: int, visual_attends_past_visual: bool) -> dict:
    """Visited / exact / partial block counts and mask density for one row order."""
    import jax

    from vist2_jax.kernels import blocks

    @jax.jit
    def stats(meta):
        classes = blocks.classify(meta, block, None, visual_attends_past_visual)
        exact, true = blocks.exact_classes(meta, block, None, visual_attends_past_visual,
                                           with_count=True)
        return dict(visited=(classes != blocks.EMPTY).sum(), partial=(classes == blocks.PARTIAL).sum(),
                    exact=(exact != blocks.EMPTY).sum(), exact_full=(exact == blocks.FULL).sum(),
                    unsound=blocks.soundness_violations(classes, exact).sum(), true=true.sum())

    s = {name: int(value) for name, value in stats(meta).items()}
    seq = meta.modality.shape[1]
    nblocks = -(-seq // block)
    causal_blocks = nblocks * (nblocks + 1) // 2
    return {
        "visited_blocks": s["visited"], "exact_blocks": s["exact"],
        "causal_blocks": causal_blocks, "total_blocks": nblocks * nblocks,
        "visited_fraction_of_causal": s["visited"] / causal_blocks,
        "visited_over_exact": s["visited"] / s["exact"],
        "partial_fraction_of_visited": s["partial"] / s["visited"],
        "exact_full_blocks": s["exact_full"],
        "unsound_pairs": s["unsound"],
        "mask_density_of_causal": s["true"] / (seq * (seq + 1) / 2),
    }


def bench(seq_len: int, text_len: int, visual_len: int, block: int, docs: int = 1,
          visual_attends_past_visual: bool = False) -> dict:
    from vist2_jax.kernels.reorder import permute_meta, visual_first_permutation

    meta, chunks = synthetic_meta(seq_len, text_len, visual_len, docs)
    perm, _ = visual_first_permutation(meta)
    report = {
        "seq_len": seq_len, "text_len": text_len, "text_span": 1 + text_len,
        "visual_len": visual_len, "block": block, "docs": docs, "chunks_per_doc": chunks,
        "visual_attends_past_visual": visual_attends_past_visual,
        "natural": order_stats(meta, block, visual_attends_past_visual),
        "visual_first": order_stats(permute_meta(meta, perm), block, visual_attends_past_visual),
    }
    vf = report["visual_first"]
    report["target"] = {
        "max_fraction_of_causal": TARGET_FRACTION_OF_CAUSAL, "max_over_exact": TARGET_OVER_EXACT,
        "met": (vf["visited_fraction_of_causal"] <= TARGET_FRACTION_OF_CAUSAL
                and vf["visited_over_exact"] <= TARGET_OVER_EXACT),
    }
    return report


def run(args) -> int:
    report = bench(args.seq_len, args.text_len, args.visual_len, args.block, args.docs,
                   args.visual_attends_past_visual)
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text, file=sys.stdout)
    return 0
