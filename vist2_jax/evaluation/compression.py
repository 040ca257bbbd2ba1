"""The compression table of a finished VIST2 run against a text-only model of the same
size trained on the same text with the same budget (the paper's comparison, visual
context vs. the native LM, in miniature; ``vist2 demo --proof``).

Per compression ratio L/m (the curriculum's L at fixed m, documents cut into the windows
of chunks the curriculum trains that L in): OCR CER of held-out chunks with
the true and with blank sketches, the memory gain (blank - true, nats/token) with its 95%
interval, and the compression gap: the VIST2 model's loss with the earlier chunks as
sketches minus the text-only model's loss with the same chunks as text, on the same
held-out documents and targets, with its 95% interval (bootstrap over documents); and the
text context gain: what the earlier chunks as raw text save the text-only model (its loss
with each chunk alone minus with all earlier text), the ceiling of any memory gain; and the
foreign controls of both models (the earlier chunks from another document: sketches for
VIST2, text for the text-only model), which say how much of a memory is its content.
"""

from __future__ import annotations

import json
import logging

from vist2_jax import storage
from vist2_jax.evaluation.context import EvalContext
from vist2_jax.evaluation.memory import evaluate_memory
from vist2_jax.evaluation.ocr import evaluate_ocr

log = logging.getLogger(__name__)


def compression_row(vist2: EvalContext, text_only: EvalContext, text_len: int, chunks: int, documents: int) -> dict:
    """The figures of one ratio: OCR on ``chunks`` held-out chunks of ``text_len`` tokens,
    memory and gap on ``documents`` held-out OLM rows whose chunks hold ``text_len`` tokens,
    in the window the run's curriculum trains that L in (``window_at``)."""
    m = vist2.config.model.layout.visual_len
    ocr = evaluate_ocr(vist2, chunks, text_lens=[text_len])
    memory = evaluate_memory(vist2, documents, text_model=text_only, text_len=text_len)
    row = {"ratio": text_len / m, "text_len": text_len, "visual_len": m,
           "chunks_per_window": memory["chunks_per_document"],
           "ocr_cer": ocr["cer"], "ocr_cer_blank": ocr["cer_blank_sketch"], "ocr_chunks": ocr["chunks"],
           **{k: v for k, v in memory.items() if k not in ("nll_text", "nll_text_alone")},
           "nll_text_only_model": memory["nll_text"], "nll_text_only_model_alone": memory["nll_text_alone"]}
    for key in ("cer_lo", "cer_hi", "cer_blank_sketch_lo", "cer_blank_sketch_hi"):
        if key in ocr:
            row["ocr_" + key.replace("_sketch", "")] = ocr[key]
    return row


def compression_table(vist2: EvalContext, text_only: EvalContext, ratios=(1, 2, 4), chunks: int = 96,
                      documents: int = 48) -> list[dict]:
    m = vist2.config.model.layout.visual_len
    table = []
    for ratio in ratios:
        row = compression_row(vist2, text_only, ratio * m, chunks, documents)
        log.info("compression %dx: %s", ratio, ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                                                          if isinstance(v, float)))
        table.append(row)
    return table


def table_lines(table: list[dict]) -> list[str]:
    """The table as text: one line per ratio, losses and gaps in nats/token."""
    def ci(row, key):
        return f"[{row[key + '_lo']:+.3f}, {row[key + '_hi']:+.3f}]"

    lines = [f"{'L/m':>4} {'chunks':>6} {'OCR CER':>8} {'blank':>6} {'memory gain (95% CI)':>27} "
             f"{'foreign-true':>12} {'gap vs text-only LM (95% CI)':>32} {'text context gain':>18} "
             f"{'text foreign-true':>18}"]
    for row in table:
        lines.append(f"{row['ratio']:>3.0f}x {row['chunks_per_window']:>6d} {row['ocr_cer']:>8.3f} {row['ocr_cer_blank']:>6.3f} "
                     f"{row['memory_gain']:>+8.3f} {ci(row, 'memory_gain'):>18} {row['memory_gain_foreign']:>+12.3f} "
                     f"{row['compression_gap']:>+8.3f} {ci(row, 'compression_gap'):>23} "
                     f"{row['text_context_gain']:>+18.3f} {row['text_foreign_gain']:>+18.3f}")
    lines.append("loss of the targets that open a chunk (only the memory can help there), nats: "
                 "VIST2 true / blank / foreign sketches | text-only LM with the earlier text / alone / another document's")
    for row in table:
        first = row["first_target_nll"]
        lines.append(f"{row['ratio']:>3.0f}x {first['true']:.3f} / {first['blank']:.3f} / {first['foreign']:.3f} | "
                     f"{first['text']:.3f} / {first['text_alone']:.3f} / {first['text_foreign']:.3f}")
    lines.append("(text context gain: what the earlier chunks, as raw text, save the text-only model per token: "
                 "the most a memory of them could give; foreign-true: what VIST2 loses when the earlier sketches "
                 "show another document, text foreign-true: what the text-only model loses when the earlier text "
                 "is another document's: the share of a memory that is its content)")
    return lines


def write_table(table: list[dict], folder, meta: dict) -> None:
    """``compression.json`` (local or gs://) and ``compression.png`` in ``folder``."""
    from vist2_jax.plotting import line_charts

    folder = storage.as_path(folder)
    storage.write_atomic(folder / "compression.json", json.dumps({**meta, "table": table}, indent=2))
    ratios = [row["ratio"] for row in table]
    panels = [
        {"title": "OCR CER of held-out chunks", "x_label": "compression L/m", "y_label": "CER",
         "series": {"true sketches": list(zip(ratios, [r["ocr_cer"] for r in table])),
                    "blank sketches": list(zip(ratios, [r["ocr_cer_blank"] for r in table]))}},
        {"title": "held-out loss of chunks >= 2", "x_label": "compression L/m", "y_label": "nats/token",
         "series": {"VIST2, true sketches": list(zip(ratios, [r["nll_true"] for r in table])),
                    "VIST2, blank sketches": list(zip(ratios, [r["nll_blank"] for r in table])),
                    "text-only LM, full text": list(zip(ratios, [r["nll_text_only_model"] for r in table])),
                    "text-only LM, chunk alone": list(zip(ratios, [r["nll_text_only_model_alone"] for r in table]))}},
    ]
    with storage.open_atomic(folder / "compression.png") as png:
        line_charts(panels, png)

