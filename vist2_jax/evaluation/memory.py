"""``memory``: does the visual memory carry the text? Per-token loss of held-out OLM rows
``[T1][V1][T2][V2]...`` three ways, on the same (input, target) pairs:

* ``true``: the rows as trained, each chunk reading the sketches of the earlier ones;
* ``blank``: every sketch replaced by an all-white image (the memory holds no text);
* ``foreign``: every sketch replaced by a sketch of another document's chunk (an image like
  those trained on, but of the wrong text: blank pages are never seen in training, so
  ``blank`` alone also counts the harm of an unfamiliar image);
* ``text``: the uncompressed reference, visual spans removed and each document one causal
  text span, so a chunk reads the earlier chunks' text itself;
* ``text_alone``: the same text model with each chunk reading only its own text: what the
  earlier chunks are worth at all, ``text_context_gain`` = text_alone - text, the most any
  memory of them could give (a long chunk predicts much of itself);
* ``text_foreign`` (with a separate ``text_model``, the compression table): the text model
  with each chunk reading another document's text in place of its own earlier chunks
  (``context_rows``), the raw-text twin of ``foreign``: ``text_foreign_gain`` = text_foreign
  - text is what a reader that uses the earlier text's content loses to a wrong one, the
  yardstick for ``memory_gain_foreign``; and ``first_target_nll``, the six readings' loss
  on the targets that open a chunk, where only the memory can help.

Only targets of chunks >= 2 count (chunk 1 has no memory, identical in all three).
``memory_gain`` = blank - true, ``memory_gain_foreign`` = foreign - true (what the true
sketches' own text is worth) and ``compression_gap`` = true - text, in nats/token,
each with a bootstrap 95% interval over documents. ``visual_spread`` says why a gain is
missing: the image-dependent share of the aligner outputs (0: every sketch reaches the
decoder as the same vectors).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vist2_jax.config.schema import ConfigError
from vist2_jax.evaluation.context import EvalContext, final_point, row_maker, window_at
from vist2_jax.evaluation.metrics import bootstrap_ratio
from vist2_jax.row_contract import ROW_FIELDS, TEXT, stack_rows, strip_visual
from vist2_jax.training.distributed import to_host

WHITE = 255


def memory_weights(row: dict) -> np.ndarray:
    """Loss weight of the targets that have a visual memory (text of chunk >= 2)."""
    return row["loss_mask"] * ((row["modality"] == TEXT) & (row["chunk_id"] >= 2))


def first_targets(row: dict) -> np.ndarray:
    """The memory targets that open a chunk (its marker's prediction of the chunk's first
    token): where the chunk's own text says nothing yet and only the memory can help."""
    weight = memory_weights(row)
    starts = np.flatnonzero(weight > 0)
    opens = np.zeros(len(weight), np.float32)
    keys = row["segment_id"] * (row["chunk_id"].max(initial=0) + 1) + row["chunk_id"]
    for key in np.unique(keys[starts]):
        opens[starts[keys[starts] == key][0]] = weight[starts[keys[starts] == key][0]]
    return opens


def blank_row(row: dict) -> dict:
    images = np.where(row["image_mask"][:, None, None, None], np.uint8(WHITE), row["images"])
    return {**row, "images": images}


def foreign_rows(rows: list[dict]) -> list[dict]:
    """The rows with every sketch swapped for one from half the pool of real sketches away
    (the pool: all real slots of all rows, in order), so each reads another document."""
    slots = [(i, k) for i, row in enumerate(rows) for k in np.flatnonzero(row["image_mask"])]
    if len(slots) < 2:
        raise ConfigError("memory: the foreign-sketch control needs at least two sketches")
    images = [row["images"].copy() for row in rows]
    shift = len(slots) // 2
    for n, (i, k) in enumerate(slots):
        source_row, source_slot = slots[(n + shift) % len(slots)]
        images[i][k] = rows[source_row]["images"][source_slot]
    return [{**row, "images": image} for row, image in zip(rows, images)]


def context_rows(rows: list[dict], foreign: bool = True) -> tuple[list[dict], np.ndarray]:
    """The text analogue of the foreign-sketch control, for the text-only model: one causal
    text row per (document, chunk k >= 2) in which chunk k reads, in place of its own
    document's earlier chunks, as many tokens of another document's text (from half the pool
    of all the rows' text away). ``foreign=False`` keeps the true earlier text: those rows'
    losses then sum to the ``text`` control's. Returns the rows and, per row, the index of
    its document in ``document_sums``' order, to add the rows' sums up per document."""
    documents = []  # (tokens, targets, memory weights, chunk ids) of each document with memory
    for row in rows:
        text = strip_visual(row, carry={"memory": memory_weights(row).astype(np.float32), "chunk": row["chunk_id"]})
        for segment in np.unique(text["segment_id"][text["memory"] > 0]):
            where = text["segment_id"] == segment
            documents.append(tuple(text[k][where] for k in ("tokens", "targets", "memory", "chunk")))
    pool = np.concatenate([tokens for tokens, *_ in documents])
    starts = np.cumsum([0] + [len(tokens) for tokens, *_ in documents])
    seq_len, template = len(rows[0]["tokens"]), rows[0]
    out, owners = [], []
    for d, (tokens, targets, memory, chunk) in enumerate(documents):
        for k in np.unique(chunk[memory > 0]):
            own, before = np.flatnonzero(chunk == k), int((chunk < k).sum())
            n = before + len(own)
            context = pool[(starts[d] + len(pool) // 2 + np.arange(before)) % len(pool)] if foreign else tokens[:before]
            row = {name: np.zeros(seq_len, dtype) for name, dtype in ROW_FIELDS.items()}
            row["tokens"][:n] = np.concatenate([context, tokens[own]])
            row["targets"][before:n] = targets[own]
            row["memory"] = np.zeros(seq_len, np.float32)
            row["memory"][before:n] = memory[own]
            row["loss_mask"][:] = row["memory"] > 0
            row["first"] = np.zeros(seq_len, np.float32)
            row["first"][before] = row["memory"][before]
            row["modality"][:n], row["chunk_id"][:n] = TEXT, 1
            row["segment_id"][:n], row["segment_id"][n:] = 1, 2
            row["positions"][:n], row["positions"][n:] = np.arange(n), np.arange(seq_len - n)
            out.append({**row, "images": template["images"], "image_mask": np.zeros_like(template["image_mask"])})
            owners.append(d)
    return out, np.asarray(owners)


def text_row(row: dict, alone: bool = False) -> dict:
    """The same documents with their visual spans removed and one chunk id per document
    (plain causal attention over all earlier text); ``memory`` weights move with the text.
    ``alone``: the chunk ids stay, each chunk reads its own text only."""
    return strip_visual(row, carry={"memory": memory_weights(row).astype(np.float32), "first": first_targets(row)},
                        keep_chunks=alone)


@functools.lru_cache(maxsize=8)
def _nll_fn(model_config):
    from vist2_jax.model.vist2 import Vist2Model

    model = Vist2Model(model_config)

    def nll(params, batch):
        logits = model.apply(params, batch)["logits"]
        logz = jax.nn.logsumexp(logits, axis=-1)
        return logz - jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    return jax.jit(nll)


def spread_of(tokens: jax.Array) -> jax.Array:
    """Visual tokens [N, m, D] of N sketches -> the mean distance of each token from its
    mean over the sketches (per token slot), over the mean token norm: the image-dependent
    share of the visual tokens (0: every sketch reaches the decoder as the same vectors)."""
    tokens = tokens.astype(jnp.float32)
    spread = jnp.linalg.norm(tokens - tokens.mean(0), axis=-1).mean()
    return spread / jnp.maximum(jnp.linalg.norm(tokens, axis=-1).mean(), 1e-12)


@functools.lru_cache(maxsize=8)
def spread_fn(model_config):
    """Jitted ``(params, images [N, H, W, 3]) -> visual_spread``: the ViT and aligner only."""
    from vist2_jax.model.vist2 import Vist2Model

    model = Vist2Model(model_config)
    return jax.jit(lambda params, images: spread_of(
        model.apply(params, images[None], method=Vist2Model.encode_images)[0]))


def visual_spread(ctx: EvalContext, rows: list[dict], max_images: int = 64) -> float:
    """``spread_of`` the visual tokens of (at most ``max_images`` of) the rows' sketches."""
    images = np.concatenate([r["images"][r["image_mask"]] for r in rows])[:max_images]
    if len(images) < 2:
        return float("nan")
    return float(to_host(spread_fn(ctx.config.model)(ctx.params, images)))


def reading_sums(ctx: EvalContext, rows: list[dict], batch_size: int = 8) -> tuple[np.ndarray, ...]:
    """One forward pass over ``rows``; per (row, document): summed NLL over the memory
    targets and their count, then the same over the targets that open a chunk."""
    nll = _nll_fn(ctx.config.model)
    fields = (*ROW_FIELDS, "images", "image_mask")
    sums = ([], [], [], [])
    for i in range(0, len(rows), batch_size):
        part = rows[i:i + batch_size]
        batch = stack_rows([{k: r[k] for k in fields} for r in part])
        values = to_host(nll(ctx.params, batch)).astype(np.float64)
        for row, value in zip(part, values):
            weight = row.get("memory", memory_weights(row))
            opens = row["first"] if "first" in row else first_targets(row)
            for segment in np.unique(row["segment_id"][weight > 0]):
                for k, w in enumerate((weight, opens)):
                    where = (row["segment_id"] == segment) & (w > 0)
                    sums[2 * k].append(float((value * w)[where].sum()))
                    sums[2 * k + 1].append(float(w[where].sum()))
    return tuple(np.asarray(values) for values in sums)


def document_sums(ctx: EvalContext, rows: list[dict], batch_size: int = 8,
                  first: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per (row, document): summed NLL over the memory targets (``first``: only those that
    open a chunk), and their count."""
    sums, counts, first_sums, first_counts = reading_sums(ctx, rows, batch_size)
    return (first_sums, first_counts) if first else (sums, counts)


def evaluate_memory(ctx: EvalContext, limit: int = 16, data: str | None = None, rows=None,
                    text_model: EvalContext | None = None, text_len: int = 0) -> dict:
    """The five losses, the memory gain, the compression gap and the text context gain over
    ``limit`` held-out rows whose chunks hold ``text_len`` tokens (0: the run's final L), in
    the window the run's curriculum trains that L in (``window_at``). ``text_model`` reads
    the raw-text rows instead of the run's own model (the gap then is against a text-only
    model of the same size: the compression table)."""
    if rows is None:
        point = window_at(ctx.config, text_len or final_point(ctx.config).text_len)
        maker = row_maker(ctx, "olm", point, data)
        rows = [maker(i) for i in range(limit)]
    readings = {"true": (ctx, rows), "blank": (ctx, [blank_row(r) for r in rows]),
                "foreign": (ctx, foreign_rows(rows)), "text": (text_model or ctx, [text_row(r) for r in rows]),
                "text_alone": (text_model or ctx, [text_row(r, alone=True) for r in rows])}
    context, owners = context_rows(rows) if text_model is not None else (None, None)
    if context is not None:  # the compression table: the text analogue of the foreign control
        readings["text_foreign"] = (text_model, context)
    scored = {name: reading_sums(model, reading) for name, (model, reading) in readings.items()}
    (true_sum, tokens), (blank_sum, blank_tokens), (foreign_sum, foreign_tokens), (text_sum, text_tokens), \
        (alone_sum, alone_tokens) = (scored[name][:2] for name in ("true", "blank", "foreign", "text", "text_alone"))
    if not len(tokens):
        raise ConfigError("--data: the memory rows hold no chunk after a sketch (documents too short?)")
    assert all(np.array_equal(tokens, other) for other in (blank_tokens, foreign_tokens, text_tokens, alone_tokens))
    extra = {}
    if context is not None:
        part_sums, part_tokens = scored["text_foreign"][:2]
        foreign_text_sum = np.bincount(owners, part_sums, len(tokens))
        assert np.array_equal(np.bincount(owners, part_tokens, len(tokens)), tokens)
        value, lo, hi = bootstrap_ratio(foreign_text_sum - text_sum, tokens)
        # the six readings on the targets that open a chunk (``first_targets``): there the
        # chunk's own text says nothing yet, so a memory that is read brings ``true`` toward
        # ``text``, one that is not leaves it at ``text_alone``
        first = {name: float(sums[2].sum() / max(sums[3].sum(), 1.0)) for name, sums in scored.items()}
        extra = {"nll_text_foreign": float(foreign_text_sum.sum() / tokens.sum()), "text_foreign_gain": value,
                 "text_foreign_gain_lo": lo, "text_foreign_gain_hi": hi, "first_target_nll": first}
    gain, gain_lo, gain_hi = bootstrap_ratio(blank_sum - true_sum, tokens)
    own, own_lo, own_hi = bootstrap_ratio(foreign_sum - true_sum, tokens)
    gap, gap_lo, gap_hi = bootstrap_ratio(true_sum - text_sum, tokens)
    context, context_lo, context_hi = bootstrap_ratio(alone_sum - text_sum, tokens)
    chunks = [len(np.unique(r["chunk_id"][(r["segment_id"] == s) & (r["modality"] == TEXT)]))
              for r in rows for s in np.unique(r["segment_id"][memory_weights(r) > 0])]
    total = tokens.sum()
    return {"nll_true": float(true_sum.sum() / total), "nll_blank": float(blank_sum.sum() / total),
            "nll_text": float(text_sum.sum() / total), "memory_gain": gain, "memory_gain_lo": gain_lo,
            "memory_gain_hi": gain_hi, "memory_gain_foreign": own, "memory_gain_foreign_lo": own_lo,
            "memory_gain_foreign_hi": own_hi, "nll_foreign": float(foreign_sum.sum() / total),
            "compression_gap": gap, "compression_gap_lo": gap_lo,
            "compression_gap_hi": gap_hi, "nll_text_alone": float(alone_sum.sum() / total),
            "text_context_gain": context, "text_context_gain_lo": context_lo, "text_context_gain_hi": context_hi,
            "documents": len(tokens), "tokens": int(total), "chunks_per_document": max(chunks),
            "visual_spread": visual_spread(ctx, rows), **extra}
