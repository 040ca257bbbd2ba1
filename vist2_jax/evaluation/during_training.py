"""``train.eval_tasks`` inside the training loop: cheap evaluations every
``train.eval_every`` steps, their figures logged next to the losses (``eval_ocr_cer``,
``eval_memory_gain`` ...) in metrics.jsonl and TensorBoard."""

from __future__ import annotations

import logging

from vist2_jax.config.schema import Config
from vist2_jax.evaluation.context import EvalContext, final_point, row_maker
from vist2_jax.evaluation.memory import evaluate_memory
from vist2_jax.evaluation.ocr import evaluate_ocr

log = logging.getLogger(__name__)
OCR_KEYS = ("cer", "exact_match", "cer_blank_sketch")
MEMORY_KEYS = ("memory_gain", "memory_gain_lo", "memory_gain_hi", "compression_gap", "nll_true",
               "nll_blank", "nll_text", "visual_spread")


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
