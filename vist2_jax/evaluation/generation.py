"""Generation benchmarks (LongBench, LooGLE, GSM8K): greedy generation in ``gcc`` (VIST2
compression), ``pcc`` (prompt compressed, Glyph-like) or ``text`` mode, then each
example's official metric; figures are means x 100 per dataset / task and overall."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from vist2_jax.evaluation.benchmarks import Example, score
from vist2_jax.evaluation.context import EvalContext, RunRenderer


def truncate_middle(ids: list[int], limit: int) -> list[int]:
    """LongBench's truncation: keep the first and last ``limit/2`` tokens."""
    if limit <= 0 or len(ids) <= limit:
        return ids
    half = limit // 2
    return ids[:half] + ids[len(ids) - (limit - half):]


def evaluate_generation(ctx: EvalContext, examples: Sequence[Example], mode: str = "gcc",
                        batch_size: int = 8, max_prompt_tokens: int = 8192,
                        max_new_tokens: int = 0) -> dict:
    """Generate for every example and score it; ``max_new_tokens`` > 0 caps each task's own."""
    from vist2_jax.inference.generate import Generator
    from vist2_jax.inference.sampling import SamplingConfig

    tokenizer = ctx.tokenizer
    render = RunRenderer(ctx) if mode != "text" else None
    blank = lambda text: np.zeros((ctx.config.model.layout.image_size,) * 2 + (3,), np.uint8)  # noqa: E731
    sketch_text = (lambda ids: render.renderer.sketch_text(ids, ctx.detokenize)) if render else None  # noqa: E731
    generator = Generator(ctx.config.model, ctx.params, render_fn=render or blank,
                          detokenize=ctx.detokenize, chunk_token=tokenizer.special_ids["chunk"],
                          sketch_text=sketch_text)
    stop = tuple(i for name, i in tokenizer.special_ids.items() if name in ("eos", "end"))
    sampling = SamplingConfig(stop_tokens=stop)
    scores, predictions = defaultdict(list), []
    budget = {i: min(e.max_new_tokens, max_new_tokens) if max_new_tokens > 0 else e.max_new_tokens
              for i, e in enumerate(examples)}
    order = sorted(range(len(examples)), key=budget.get)
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    batches = [[i for i in b if budget[i] == n] for b in batches for n in sorted({budget[i] for i in b})]
    for indices in batches:  # one answer length per batch: each example gets exactly its own
        part = [examples[i] for i in indices]
        prompts = [truncate_middle(tokenizer.encode(e.prompt), max_prompt_tokens) or [tokenizer.bos_id]
                   for e in part]
        new = budget[indices[0]]
        result = generator.generate(prompts, mode, new, sampling=sampling)
        for example, tokens in zip(part, result.tokens):
            tokens = tokens[:next((k for k, t in enumerate(tokens) if t in stop), len(tokens))]
            text = ctx.detokenize(tokens)
            value = score(example, text)
            scores[example.group].append(value)
            predictions.append({"group": example.group, "prediction": text, "answers": list(example.answers),
                                "score": value})
    out = {f"score_{group}": 100 * float(np.mean(v)) for group, v in sorted(scores.items())}
    out.update(score=100 * float(np.mean([s for v in scores.values() for s in v])), examples=len(predictions),
               mode=mode, predictions=predictions)
    if render is not None:
        out.update(sketches_drawn=render.drawn, sketches_rejected=render.rejected)
    return out
