"""Evaluation inside the training loop, logged next to the losses in metrics.jsonl and
TensorBoard: ``train.eval_tasks`` every ``train.eval_every`` steps (``eval_ocr_cer``,
``eval_memory_gain`` ...), and the collapse guard (``visual_spread``) every
``run.log_every`` steps."""

from __future__ import annotations

import logging

import numpy as np

from vist2_jax.config.schema import Config
from vist2_jax.evaluation.context import EvalContext, final_point, row_maker
from vist2_jax.evaluation.memory import evaluate_memory, spread_fn
from vist2_jax.evaluation.ocr import evaluate_ocr

log = logging.getLogger(__name__)
OCR_KEYS = ("cer", "cer_lo", "cer_hi", "exact_match", "cer_blank_sketch", "cer_blank_sketch_lo",
            "cer_blank_sketch_hi", "cer_gap", "cer_gap_lo", "cer_gap_hi")
MEMORY_KEYS = ("memory_gain", "memory_gain_lo", "memory_gain_hi", "memory_gain_foreign", "memory_gain_foreign_lo",
               "memory_gain_foreign_hi", "compression_gap", "nll_true", "nll_blank", "nll_foreign", "nll_text",
               "visual_spread")
COLLAPSE_IMAGES = 16


class CollapseGuard:
    """``visual_spread`` (``memory.spread_of``) of a fixed set of held-out sketches: the
    image-dependent share of the visual tokens, which falls towards 0 when the ViT and
    aligner collapse to image-independent outputs (the decoder then reads nothing from
    its sketches). One jitted ViT + aligner forward on ``COLLAPSE_IMAGES`` sketches, so it
    is cheap enough for every logged step. ``check`` says in one line when the value is
    below ``train.collapse_threshold``."""

    def __init__(self, config: Config, eval_maker):
        self.config, images = config, []
        for i in range(4 * COLLAPSE_IMAGES):  # the first evaluation rows' sketches
            row = eval_maker(i)
            images += list(row["images"][row["image_mask"]])
            if len(images) >= COLLAPSE_IMAGES:
                break
        self.images = np.stack(images[:COLLAPSE_IMAGES]) if len(images) >= 2 else None

    @property
    def active(self) -> bool:
        return self.images is not None and self.config.train.collapse_threshold > 0

    def __call__(self, params) -> float:
        from vist2_jax.training.distributed import to_host

        return float(to_host(spread_fn(self.config.model)(params, self.images)))

    def check(self, step: int, spread: float) -> str | None:
        """The warning when ``spread`` is below the threshold, else None."""
        threshold = self.config.train.collapse_threshold
        if spread >= threshold:
            return None
        return (f"step {step}: visual_spread {spread:.4f} is below train.collapse_threshold={threshold}: "
                "the visual tokens barely depend on the sketch (the vision side collapsed)")


class TrainingEval:
    """Call with the current parameters; returns the figures of ``config.train.eval_tasks``.
    Held-out chunks and rows are fixed for the whole run, so the figures are comparable."""

    def __init__(self, config: Config, tokenizer):
        self.config, self.tokenizer = config, tokenizer
        self.tasks, self.limit = config.train.eval_tasks, config.train.eval_task_limit
        self._rows = None

    def __call__(self, params) -> dict[str, float]:
        ctx = EvalContext(self.config, params, self.tokenizer)
        point = final_point(self.config)
        out = {}
        if "ocr" in self.tasks:
            result = evaluate_ocr(ctx, self.limit, text_lens=[point.text_len])
            out.update({f"eval_ocr_{k}": result[k] for k in OCR_KEYS})
        if "memory" in self.tasks:
            if self._rows is None:
                point = type(point)(text_len=point.text_len, max_chunks=max(point.max_chunks, 2))
                maker = row_maker(ctx, "olm", point)
                self._rows = [maker(i) for i in range(self.limit)]
            result = evaluate_memory(ctx, rows=self._rows)
            out.update({(f"eval_{k}" if k.startswith("memory") else f"eval_memory_{k}"): result[k]
                        for k in MEMORY_KEYS})
        log.info("eval tasks: %s", ", ".join(f"{k} {v:.4f}" for k, v in out.items()))
        return out
