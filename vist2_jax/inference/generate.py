"""Generation with global context compression (VIST2), prefill-only compression (Glyph-like)
and plain text, through one code path over a static-shape KV cache.

Every device call is ``Vist2Model`` applied through :func:`extend_cache`: new entries
(text embeddings or aligner outputs) are written at chosen cache slots and attend over
the cache under the training mask. The host loop only does bookkeeping (which slot,
which position, when a chunk is full) and the injected callables ``detokenize`` and
``render_fn``, which are the renderer's and tokenizer's business, not the model's.
See :mod:`vist2_jax.inference.cache` for the slot layout and the chunk arithmetic.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vist2_jax.config.schema import ModelConfig
from vist2_jax.inference.cache import (MODES, SEGMENT, CacheLayout, empty_cache, marker_position,
                                       prefill_pieces,
                                       visual_position)
from vist2_jax.inference.sampling import SamplingConfig, sample
from vist2_jax.kernels.mask import RowMeta
from vist2_jax.row_contract import CHUNK_ID, PAD, TEXT, VISUAL
from vist2_jax.model.layers import DTYPES
from vist2_jax.model.vist2 import Vist2Model, place_visual_tokens



def _meta(modality, chunk, positions) -> RowMeta:
    modality = np.asarray(modality, np.int8)
    segment = np.where(modality != PAD, SEGMENT, 0).astype(np.int32)
    return RowMeta(modality, np.asarray(chunk, np.int32), segment, np.asarray(positions, np.int32))


def extend_cache(module: Vist2Model, tokens, visual, meta: RowMeta, slots, cache, free, logits_at):
    """Embed new entries (token embeddings at TEXT, ``visual`` [B, S, D] at VISUAL, zeros at
    PAD), release the ``free`` [B, C] slots, run the cached decoder; logits of position
    ``logits_at`` (or None)."""
    x = module.decoder.embed(tokens)
    x = jnp.where((meta.modality == TEXT)[..., None], x, jnp.zeros_like(x))
    if visual is not None:
        x = jnp.where((meta.modality == VISUAL)[..., None], visual.astype(x.dtype), x)
    if free is not None:
        cache = cache._replace(meta=cache.meta._replace(
            modality=jnp.where(free, jnp.int8(PAD), cache.meta.modality)))
    hidden, cache = module.decoder.extend(x, meta, slots, cache)
    if logits_at is None:
        return None, cache
    return module.decoder.logits(hidden[:, logits_at:logits_at + 1])[:, 0], cache


def prefill_visual(module: Vist2Model, images, modality):
    """Aligner outputs of all prompt images, placed at the prefill row's visual spans."""
    visual = module.encode_images(images)
    dim = visual.shape[-1]
    zeros = jnp.zeros(modality.shape + (dim,), visual.dtype)
    return place_visual_tokens(zeros, visual, modality)


def insert_chunk(module: Vist2Model, images, meta, slots, cache, free):
    """Encode one finished chunk per row (ViT + aligner) and write its m visual tokens."""
    visual = module.encode_images(images[:, None])[:, 0]
    return extend_cache(module, jnp.zeros(slots.shape, jnp.int32), visual, meta, slots, cache,
                        free, None)[1]


def decode_step(module: Vist2Model, tokens, meta, slots, cache, history, hist_len, key,
                sampling: SamplingConfig):
    """The jitted decode step: one new text entry per row, its logits and the next token."""
    logits, cache = extend_cache(module, tokens[:, None], None,
                                 RowMeta(*(a[:, None] for a in meta)), slots[:, None], cache, None, 0)
    return sample(logits, history, hist_len, key, sampling), logits, cache


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]
    logits: np.ndarray | None  # [B, steps, V] when recorded (step t predicts token t)
    peak_entries: int | None  # measured max live cache entries per row, when tracked
    layout: CacheLayout
    ttft_s: float
    decode_s: float
    decode_steps: int


class Generator:
    """Batched generation in one of ``MODES``; ``render_fn(text) -> uint8 [H, W, 3]`` and
    ``detokenize(ids) -> str`` are injected. ``prefill_chunk`` bounds the queries per
    prefill call (chunked prefill), so a long prompt never needs an [S, S] score matrix."""

    def __init__(self, config: ModelConfig, params, *, render_fn: Callable[[str], np.ndarray],
                 detokenize: Callable[[Sequence[int]], str], chunk_token: int = CHUNK_ID,
                 prefill_chunk: int = 1024):
        self.config = dataclasses.replace(config, remat_policy="none")
        self.model = Vist2Model(self.config)
        self.params = params
        self.render_fn, self.detokenize = render_fn, detokenize
        self.chunk_token, self.prefill_chunk = chunk_token, prefill_chunk
        apply = self.model.apply
        # The cache argument is donated: updated in place, never copied per step.
        self._extend = jax.jit(lambda p, *a: apply(p, *a, method=extend_cache), static_argnums=(7,),
                               donate_argnums=(5,))
        self._prefill_visual = jax.jit(lambda p, *a: apply(p, *a, method=prefill_visual))
        self._insert = jax.jit(lambda p, *a: apply(p, *a, method=insert_chunk), donate_argnums=(4,))
        self._decode = jax.jit(lambda p, *a: apply(p, *a, method=decode_step), static_argnums=(8,),
                               donate_argnums=(4,))
        self._sample = jax.jit(sample, static_argnums=(4,))
        self._live = jax.jit(lambda c: jnp.max(jnp.sum(c.meta.modality != PAD, axis=1)))

    # ---- host-side bookkeeping -------------------------------------------------------------
    def _render(self, tokens: Sequence[int]) -> np.ndarray:
        image = np.asarray(self.render_fn(self.detokenize(list(tokens))), np.uint8)
        size = self.config.layout.image_size
        if image.shape != (size, size, 3):
            raise ValueError(f"render_fn returned {image.shape}, expected ({size}, {size}, 3)")
        return image

    def _prefill_rows(self, mode, prompts, layout):
        """Per row: entries (modality, token, chunk, position, slot), prompt chunk images, and
        the row state after the prefill (current chunk, its tokens, next text slot, next position)."""
        L, m = self.config.layout.text_len, self.config.layout.visual_len
        rows, images, states = [], [], []
        for prompt in prompts:
            n = len(prompt)
            if mode == "text":
                rows.append([(TEXT, t, 0, i, layout.text_slot(i)) for i, t in enumerate(prompt)])
                images.append([])
                states.append(dict(chunk=0, chunk_tokens=list(prompt), text_count=n, pos=n))
                continue
            k = n // L
            entries = [(VISUAL, 0, c, visual_position(c, L, m) + i, s)
                       for c in range(1, k + 1) for i, s in enumerate(layout.visual_slots(c))]
            start = marker_position(k + 1, L, m)
            rest = list(prompt[k * L:])
            entries += [(TEXT, t, k + 1, start + i, layout.text_slot(i))
                        for i, t in enumerate([self.chunk_token] + rest)]
            rows.append(entries)
            images.append([self._render(prompt[(c - 1) * L:c * L]) for c in range(1, k + 1)])
            states.append(dict(chunk=k + 1, chunk_tokens=rest, text_count=1 + len(rest),
                               pos=start + 1 + len(rest)))
        return rows, images, states

    def generate(self, prompts: Sequence[Sequence[int]], mode: str, max_new_tokens: int, *,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                 forced_tokens: np.ndarray | None = None, record_logits: bool = False,
                 track_entries: bool = False, capacity_chunks: int | None = None,
                 on_token: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Generate up to ``max_new_tokens`` per prompt. ``forced_tokens`` [B, M] replaces
        every sampled token (teacher forcing) while logits are still those of the model."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}; choose one of {', '.join(MODES)}")
        if max_new_tokens < 1 or not prompts or min(len(p) for p in prompts) < 1:
            raise ValueError("need at least one non-empty prompt and max_new_tokens >= 1")
        cfg, lay = self.config, self.config.layout
        L, m, batch = lay.text_len, lay.visual_len, len(prompts)
        layout = CacheLayout.for_generation(mode, [len(p) for p in prompts], max_new_tokens, L, m,
                                            capacity_chunks if mode == "gcc" else None)
        dec = cfg.decoder
        cache = empty_cache(layout, batch, dec.num_layers, dec.num_kv_heads, dec.head_dim,
                            DTYPES[cfg.dtype])
        start_time = time.perf_counter()
        rows, images, states = self._prefill_rows(mode, prompts, layout)

        # ---- prefill: left-padded rows, cut into equal pieces ----
        pieces, piece = prefill_pieces(max(len(r) for r in rows), self.prefill_chunk)
        total = pieces * piece
        pad = (PAD, 0, 0, 0, layout.trash)
        grid = np.array([[pad] * (total - len(r)) + r for r in rows], np.int64)  # [B, S, 5]
        modality, tokens, chunk, positions, slots = (grid[..., i] for i in range(5))
        meta = _meta(modality, chunk, positions)
        num_images = max(len(im) for im in images)
        visual = None
        if num_images:
            size = lay.image_size
            stack = np.zeros((batch, num_images, size, size, 3), np.uint8)
            for b, ims in enumerate(images):
                if ims:
                    stack[b, :len(ims)] = np.stack(ims)
            visual = self._prefill_visual(self.params, stack, modality.astype(np.int8))
        for i in range(pieces):
            sl = slice(i * piece, (i + 1) * piece)
            logits, cache = self._extend(
                self.params, tokens[:, sl].astype(np.int32), None if visual is None else visual[:, sl],
                RowMeta(*(a[:, sl] for a in meta)), slots[:, sl].astype(np.int32), cache, None,
                piece - 1)

        history = np.zeros((batch, max(len(p) for p in prompts) + max_new_tokens), np.int32)
        hist_len = np.array([len(p) for p in prompts], np.int32)
        for b, p in enumerate(prompts):
            history[b, :len(p)] = p
        key = jax.random.key(seed)
        next_tok = self._sample(logits, history, hist_len, jax.random.fold_in(key, 0), sampling)
        recorded = [np.asarray(logits)] if record_logits else None
        peak = int(self._live(cache)) if track_entries else None
        generated = [[] for _ in range(batch)]
        done = np.zeros(batch, bool)
        ttft = decode_time = 0.0
        steps = 0
        for t in range(1, max_new_tokens + 1):
            chosen = np.asarray(next_tok) if forced_tokens is None else np.asarray(forced_tokens)[:, t - 1]
            if t == 1:
                jax.block_until_ready(next_tok)
                ttft = time.perf_counter() - start_time
                decode_start = time.perf_counter()
            for b in np.flatnonzero(~done):
                tok = int(chosen[b])
                generated[b].append(tok)
                history[b, hist_len[b]] = tok
                hist_len[b] += 1
                if on_token is not None:
                    on_token(int(b), tok)
                if tok in sampling.stop_tokens and forced_tokens is None:
                    done[b] = True
            if t == max_new_tokens or done.all():
                break
            # ---- chunk full: render, encode, write m visual entries, free its text ----
            full = [b for b in np.flatnonzero(~done) if mode == "gcc" and
                    len(states[b]["chunk_tokens"]) + 1 == L]
            feed = np.zeros(batch, np.int32)
            for b in np.flatnonzero(~done):
                states[b]["chunk_tokens"].append(int(chosen[b]))
                feed[b] = chosen[b]
            if full:
                cache = self._compress(full, states, layout, cache, batch)
                for b in full:
                    s = states[b]
                    s.update(chunk=s["chunk"] + 1, chunk_tokens=[], text_count=0,
                             pos=marker_position(s["chunk"] + 1, L, m))
                    feed[b] = self.chunk_token
            step_mod, step_chunk, step_pos, step_slot = (np.zeros(batch, np.int64) for _ in range(4))
            step_slot[:] = layout.trash
            for b in np.flatnonzero(~done):
                s = states[b]
                step_mod[b], step_chunk[b], step_pos[b] = TEXT, s["chunk"], s["pos"]
                step_slot[b] = layout.text_slot(s["text_count"])
                s["text_count"] += 1
                s["pos"] += 1
            next_tok, logits, cache = self._decode(
                self.params, feed, _meta(step_mod, step_chunk, step_pos), step_slot.astype(np.int32),
                cache, history, hist_len, jax.random.fold_in(key, t), sampling)
            steps += 1
            if record_logits:
                recorded.append(np.asarray(logits))
            if track_entries:
                peak = max(peak, int(self._live(cache)))
        jax.block_until_ready(next_tok)
        if steps:
            decode_time = time.perf_counter() - decode_start
        logits_out = np.stack(recorded, axis=1) if record_logits else None
        return GenerationResult(generated, logits_out, peak, layout, ttft, decode_time, steps)

    def _compress(self, rows, states, layout, cache, batch):
        lay = self.config.layout
        L, m, size = lay.text_len, lay.visual_len, lay.image_size
        images = np.zeros((batch, size, size, 3), np.uint8)
        modality = np.full((batch, m), PAD)
        chunk, positions = np.zeros((batch, m)), np.zeros((batch, m))
        slots = np.full((batch, m), layout.trash, np.int32)
        free = np.zeros((batch, layout.capacity), bool)
        for b in rows:
            c = states[b]["chunk"]
            images[b] = self._render(states[b]["chunk_tokens"])
            modality[b], chunk[b] = VISUAL, c
            positions[b] = visual_position(c, L, m) + np.arange(m)
            slots[b] = layout.visual_slots(c)
            free[b, layout.text_base:layout.trash] = True
        return self._insert(self.params, images, _meta(modality, chunk, positions), slots, cache, free)
