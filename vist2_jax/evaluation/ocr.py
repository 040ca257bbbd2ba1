"""``ocr``: greedy reconstruction of held-out chunks from their sketches alone.

Each chunk becomes the stage-2 row ``[V][<|chunk|> t1..tL]`` (text reads the image:
``reader_chunk_id``); the decoder writes L tokens greedily and the detokenized output is
compared with the chunk's text: character error rate (edit distance / reference length)
and exact match, overall, per font-size bucket the renderer chose, and per compression
ratio L/m. ``cer_blank_sketch`` is the control: the same decoding from all-white images,
i.e. what the language prior alone reaches; reading shows as ``cer`` below it, and
``cer_gap`` = blank - true (paired per chunk). The three come with bootstrap 95% intervals
over chunks (``_lo``, ``_hi``): a gap whose interval holds 0 is noise."""

from __future__ import annotations

import functools
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from vist2_jax.config.schema import ConfigError, CurriculumPoint
from vist2_jax.evaluation.context import EvalContext, row_maker
from vist2_jax.evaluation.metrics import bootstrap_ratio, char_error_rate, exact_match
from vist2_jax.evaluation.memory import WHITE
from vist2_jax.row_contract import reader_chunk_id, stack_rows, text_span_cost
from vist2_jax.training.distributed import to_host


def held_out_chunks(maker, text_len: int, count: int, seed: int = 0):
    """(tokens, text, image, font px) for ``count`` chunks of exactly ``text_len`` tokens
    drawn from the documents the maker draws from (the held-out ones of a run's source);
    documents shorter than a chunk and chunks the renderer rejects are skipped."""
    from data_pipelines.render import RenderRejected

    rng = np.random.default_rng([seed, text_len])
    chunks, tries = [], 0
    while len(chunks) < count and tries < 20 * count:
        tries += 1
        tokens = maker.draw(rng).tokens
        if len(tokens) < text_len:
            continue
        start = int(rng.integers(0, len(tokens) - text_len + 1))
        piece = tokens[start:start + text_len]
        text = maker.tokenizer.decode(piece)
        drawn = maker.renderer.sketch_text(piece, maker.tokenizer.decode)  # = text, in tile groups if any
        try:
            image = maker.renderer.render(drawn)
        except RenderRejected:
            continue
        chunks.append((piece, text, image, maker.renderer.layout(drawn, count=False)[0].size))  # counted by render
    return chunks


@functools.lru_cache(maxsize=8)
def _greedy_fn(model_config, start: int, length: int):
    """Jitted: the tokens after ``start`` (the marker) filled greedily, one forward per token."""
    from vist2_jax.model.vist2 import Vist2Model

    model = Vist2Model(model_config)

    def greedy(params, batch):
        def body(t, tokens):
            logits = model.apply(params, {**batch, "tokens": tokens})["logits"]
            nxt = jnp.argmax(logits[:, start + t], axis=-1).astype(tokens.dtype)
            return tokens.at[:, start + t + 1].set(nxt)
        return jax.lax.fori_loop(0, length, body, batch["tokens"])
    return jax.jit(greedy)


def reconstruct(ctx: EvalContext, chunks, batch_size: int = 16) -> list[str]:
    """The model's greedy reading of each chunk's sketch, detokenized."""
    from data_pipelines.rows import RowBuilder

    m, L = ctx.config.model.layout.visual_len, len(chunks[0][0])
    run = _greedy_fn(ctx.config.model, m, L)
    size = ctx.config.model.layout.image_size
    rows = []
    for tokens, _, image, _ in chunks:
        builder = RowBuilder(m + text_span_cost(L), m, 1, (size, size), ctx.tokenizer.chunk_id,
                             ctx.config.model.layout.visual_stride)
        builder.start_document()
        builder.add_image(image, chunk_id=1)
        builder.add_text(np.zeros_like(tokens), chunk_id=reader_chunk_id(1),  # nothing to copy from
                         marker=ctx.tokenizer.bos_id)  # transcribe, not continue (row_contract)
        rows.append(builder.finish())
    outputs = []
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        part += [part[-1]] * (batch_size - len(part)) if len(rows) > batch_size else []
        filled = to_host(run(ctx.params, stack_rows(part)))
        outputs += [ctx.detokenize(row[m + 1:]) for row in filled]
    return outputs[:len(rows)]


def evaluate_ocr(ctx: EvalContext, limit: int = 32, text_lens=None, data: str | None = None) -> dict:
    """CER and exact match per compression ratio and font size; ``text_lens`` default to the
    L values of the run's curriculum (or the layout's L)."""
    config = ctx.config
    m = config.model.layout.visual_len
    if text_lens is None:
        text_lens = sorted({p.text_len for p in config.data.curriculum} or {config.model.layout.text_len})
    groups, samples = defaultdict(list), []
    for L in text_lens:
        maker = row_maker(ctx, "ocr", CurriculumPoint(text_len=L, max_chunks=1), data)
        chunks = held_out_chunks(maker, L, limit, seed=config.run.seed)
        if not chunks:
            continue
        blank = [(tokens, text, np.full_like(image, WHITE), px) for tokens, text, image, px in chunks]
        for (_, text, _, px), pred, guess in zip(chunks, reconstruct(ctx, chunks), reconstruct(ctx, blank)):
            groups["blank"].append((char_error_rate(guess, text), exact_match(guess, text)))
            scores = (char_error_rate(pred, text), exact_match(pred, text))
            for key in ("all", f"ratio_{L // m}x", f"font_{px}px"):
                groups[key].append(scores)
            if len(samples) < 3:
                samples.append({"reference": text, "prediction": pred})
    if not groups:
        raise ConfigError(f"--data: no chunk of {text_lens} tokens could be drawn from its documents")
    result = {"exact_match": float(np.mean([e for _, e in groups["all"]])), "chunks": len(groups["all"])}
    true, blank = (np.asarray([c for c, _ in groups[key]]) for key in ("all", "blank"))
    for name, values in (("cer", true), ("cer_blank_sketch", blank), ("cer_gap", blank - true)):
        estimate, low, high = bootstrap_ratio(values, np.ones_like(values))  # the mean over chunks
        result.update({name: estimate, f"{name}_lo": low, f"{name}_hi": high})
    for key, scores in sorted(groups.items()):
        if key not in ("all", "blank"):
            result[f"cer_{key}"] = float(np.mean([c for c, _ in scores]))
            result[f"exact_match_{key}"] = float(np.mean([e for _, e in scores]))
            result[f"chunks_{key}"] = len(scores)
    result["samples"] = samples
    return result
