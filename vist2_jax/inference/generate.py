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
from data_pipelines.render import RenderRejected
from vist2_jax.inference.cache import MODES, SEGMENT, CacheLayout, empty_cache, grow_cache, prefill_pieces
from vist2_jax.inference.sampling import SamplingConfig, sample
from vist2_jax.kernels.mask import RowMeta
from vist2_jax.row_contract import CHUNK_ID, PAD, TEXT, VISUAL, close_chunk
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
    ``detokenize(ids) -> str`` are injected; ``sketch_text(ids) -> str`` (default
    ``detokenize``) is the text a chunk is drawn from (``SketchRenderer.sketch_text``: token-aligned
    tiles need the token groups). ``prefill_chunk`` bounds the queries per
    prefill call (chunked prefill), so a long prompt never needs an [S, S] score matrix."""

    def __init__(self, config: ModelConfig, params, *, render_fn: Callable[[str], np.ndarray],
                 detokenize: Callable[[Sequence[int]], str], chunk_token: int = CHUNK_ID,
                 prefill_chunk: int = 1024, sketch_text: Callable[[Sequence[int]], str] | None = None):
        self.config = dataclasses.replace(config, remat_policy="none")
        self.model = Vist2Model(self.config)
        self.params = params
        self.render_fn, self.detokenize = render_fn, detokenize
        self.sketch_text = sketch_text or detokenize
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
        self._grow = jax.jit(grow_cache, static_argnums=(1, 2))

    # ---- host-side bookkeeping -------------------------------------------------------------
    def _try_render(self, tokens: Sequence[int]) -> np.ndarray | None:
        """The sketch of ``tokens``, or None when the renderer rejects it (does not fit)."""
        try:
            image = np.asarray(self.render_fn(self.sketch_text(list(tokens))), np.uint8)
        except RenderRejected:
            return None
        size = self.config.layout.image_size
        if image.shape != (size, size, 3):
            raise ValueError(f"render_fn returned {image.shape}, expected ({size}, {size}, 3)")
        return image

    def _prefill_rows(self, mode, prompts):
        """Per row: entries (modality, token, chunk, position, slot-or-text-index), prompt chunk
        images, and the row state after the prefill. Prompt chunks close by the chunk rule
        (``close_chunk``): at L tokens, or before the token that would not fit the sketch."""
        L, m, stride = self.config.layout.text_len, self.config.layout.visual_len, self.config.layout.visual_stride
        rows, images, states = [], [], []
        for prompt in prompts:
            n = len(prompt)
            if mode == "text":
                rows.append([(TEXT, t, 0, i, ("text", i)) for i, t in enumerate(prompt)])
                images.append([])
                states.append(dict(chunk=0, chunk_tokens=list(prompt), text_count=n, pos=n, marker=0,
                                   image=None))
                continue
            entries, row_images, start, position, chunk, open_image = [], [], 0, 0, 0, None
            while start < n:
                k, image = close_chunk(prompt[start:start + L], self._try_render)
                if k == n - start < L:  # the rest fits a sketch: it stays the open chunk's text
                    open_image = image
                    break
                chunk += 1
                visual_start = position + 1 + k  # after the chunk's marker and its k tokens
                entries += [(VISUAL, 0, chunk, visual_start + i * stride, ("visual", chunk, i)) for i in range(m)]
                row_images.append(image)
                start, position = start + k, visual_start + m * stride
            rest = list(prompt[start:])
            entries += [(TEXT, t, chunk + 1, position + i, ("text", i))
                        for i, t in enumerate([self.chunk_token] + rest)]
            rows.append(entries)
            images.append(row_images)
            states.append(dict(chunk=chunk + 1, chunk_tokens=rest, text_count=1 + len(rest),
                               pos=position + 1 + len(rest), marker=position, image=open_image))
        return rows, images, states

    @staticmethod
    def _slot(layout: CacheLayout, where) -> int:
        return layout.text_slot(where[1]) if where[0] == "text" else int(layout.visual_slots(where[1])[where[2]])

    def generate(self, prompts: Sequence[Sequence[int]], mode: str, max_new_tokens: int, *,
                 sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
                 forced_tokens: np.ndarray | None = None, record_logits: bool = False,
                 track_entries: bool = False, capacity_chunks: int | None = None,
                 on_token: Callable[[int, int], None] | None = None) -> GenerationResult:
        """Generate up to ``max_new_tokens`` per prompt. ``forced_tokens`` [B, M] replaces
        every sampled token (teacher forcing) while logits are still those of the model.

        In gcc a chunk closes at L tokens, or, by the chunk rule, before a sampled token that
        would make its text too large for a sketch: that token is then not emitted, and the
        next chunk's marker predicts again, exactly as in training. No text is ever dropped."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}; choose one of {', '.join(MODES)}")
        if max_new_tokens < 1 or not prompts or min(len(p) for p in prompts) < 1:
            raise ValueError("need at least one non-empty prompt and max_new_tokens >= 1")
        cfg, lay = self.config, self.config.layout
        L, m, batch = lay.text_len, lay.visual_len, len(prompts)
        start_time = time.perf_counter()
        rows, images, states = self._prefill_rows(mode, prompts)
        layout = CacheLayout.for_rows(mode, [len(im) for im in images], [len(s["chunk_tokens"]) for s in states],
                                      max_new_tokens, L, m, capacity_chunks if mode == "gcc" else None)
        dec = cfg.decoder
        cache = empty_cache(layout, batch, dec.num_layers, dec.num_kv_heads, dec.head_dim,
                            DTYPES[cfg.dtype])

        # ---- prefill: left-padded rows, cut into equal pieces ----
        pieces, piece = prefill_pieces(max(len(r) for r in rows), self.prefill_chunk)
        total = pieces * piece
        pad = (PAD, 0, 0, 0, layout.trash)
        grid = np.array([[pad] * (total - len(r)) + [(*e[:4], self._slot(layout, e[4])) for e in r]
                         for r in rows], np.int64)  # [B, S, 5]
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
        recorded = [[] for _ in range(batch)] if record_logits else None
        peak = int(self._live(cache)) if track_entries else None
        generated = [[] for _ in range(batch)]
        done = np.zeros(batch, bool)
        ttft = decode_time = 0.0
        steps = 0
        decode_start = time.perf_counter()
        while True:
            sampled = np.asarray(next_tok)
            if steps == 0:
                ttft = time.perf_counter() - start_time
                decode_start = time.perf_counter()
            closing = []  # gcc rows whose chunk closes now: full, or too large for the new token
            for b in np.flatnonzero(~done):
                s = states[b]
                tok = int(sampled[b]) if forced_tokens is None else int(forced_tokens[b, len(generated[b])])
                stops = (tok in sampling.stop_tokens and forced_tokens is None) \
                    or len(generated[b]) + 1 == max_new_tokens
                if mode == "gcc" and not stops and s["chunk_tokens"]:
                    image = self._try_render(s["chunk_tokens"] + [tok])
                    if image is None:  # the chunk closes before this token, which is predicted again
                        closing.append(b)
                        continue
                    s["image"] = image
                generated[b].append(tok)
                if record_logits:
                    recorded[b].append(np.asarray(logits[b]))
                history[b, hist_len[b]] = tok
                hist_len[b] += 1
                if on_token is not None:
                    on_token(int(b), tok)
                if stops:
                    done[b] = True
                    continue
                s["chunk_tokens"].append(tok)
                if mode == "gcc" and len(s["chunk_tokens"]) == L:
                    closing.append(b)
            if done.all():
                break
            # ---- close chunks: encode their sketch, write m visual entries, free their text ----
            if closing:
                cache, layout = self._compress(closing, states, layout, cache, batch)
            feed = np.zeros(batch, np.int32)
            step_mod, step_chunk, step_pos, step_slot = (np.zeros(batch, np.int64) for _ in range(4))
            step_slot[:] = layout.trash
            for b in np.flatnonzero(~done):
                s = states[b]
                feed[b] = self.chunk_token if b in closing else s["chunk_tokens"][-1]
                step_mod[b], step_chunk[b], step_pos[b] = TEXT, s["chunk"], s["pos"]
                step_slot[b] = layout.text_slot(s["text_count"])
                s["text_count"] += 1
                s["pos"] += 1
            steps += 1
            next_tok, logits, cache = self._decode(
                self.params, feed, _meta(step_mod, step_chunk, step_pos), step_slot.astype(np.int32),
                cache, history, hist_len, jax.random.fold_in(key, steps), sampling)
            if track_entries:
                peak = max(peak, int(self._live(cache)))
        jax.block_until_ready(next_tok)
        if steps:
            decode_time = time.perf_counter() - decode_start
        logits_out = None
        if record_logits:
            longest = max(len(r) for r in recorded)
            logits_out = np.zeros((batch, longest, np.asarray(logits).shape[-1]), np.float32)
            for b, r in enumerate(recorded):
                if r:
                    logits_out[b, :len(r)] = np.stack(r)
        return GenerationResult(generated, logits_out, peak, layout, ttft, decode_time, steps)

    def _compress(self, rows, states, layout, cache, batch):
        """Close the current chunk of each row in ``rows``: its sketch (rendered when its last
        token was accepted) becomes m visual entries, and its text slots are freed."""
        lay = self.config.layout
        m, size, stride = lay.visual_len, lay.image_size, lay.visual_stride
        needed = max(states[b]["chunk"] for b in rows)
        if needed > layout.visual_chunks:  # chunks closed early: more chunks than reserved
            grown = dataclasses.replace(layout, visual_chunks=needed + max(2, needed // 4))
            cache, layout = self._grow(cache, layout, grown), grown
        images = np.zeros((batch, size, size, 3), np.uint8)
        modality = np.full((batch, m), PAD)
        chunk, positions = np.zeros((batch, m)), np.zeros((batch, m))
        slots = np.full((batch, m), layout.trash, np.int32)
        free = np.zeros((batch, layout.capacity), bool)
        for b in rows:
            s = states[b]
            c = s["chunk"]
            image = s["image"] if s["image"] is not None else close_chunk(s["chunk_tokens"], self._try_render)[1]
            visual_start = s["marker"] + 1 + len(s["chunk_tokens"])
            images[b] = image
            modality[b], chunk[b] = VISUAL, c
            positions[b] = visual_start + stride * np.arange(m)
            slots[b] = layout.visual_slots(c)
            free[b, layout.text_base:layout.trash] = True
            s.update(chunk=c + 1, marker=visual_start + m * stride, pos=visual_start + m * stride, text_count=0,
                     chunk_tokens=[], image=None)
        cache = self._insert(self.params, images, _meta(modality, chunk, positions), slots, cache, free)
        return cache, layout
