"""Row makers: build one row of the docs/design.md §2 contract from a row index, per stage.

Every maker is a pure function of ``(seed, global row index)``, so any row can be rebuilt
at any time (random access, exact resume) and per-host sharding is just index slicing.
Layouts (docs/design.md §1):

* caption ``[V_img][T caption]`` (ids 1, 2), several samples packed as documents;
* ocr ``[V_a][T text_a][V_b][T text_b]...`` (multi-turn: each text reads its image and
  the earlier ones), loss on the reconstructed text;
* olm ``[T1][V1][T2][V2]...`` over a window of a document, several documents per row,
  with the stage-3 curriculum (L, chunks per window, OCR share) chosen by the row's step;
* sft ``[V query chunks...][T response chunk][V][T]...``, loss on the response only;
* ``data.text_only``: the olm rows with their visual spans removed (row_contract
  ``strip_visual``), the same text for a text-only model.

Chunks close by the chunk rule (``vist2_jax/row_contract.py:close_chunk``), as generation
closes them: at L tokens, or before the token the sketch cannot take (counted as
``closed_early``); text is never truncated or dropped. A document whose first token
cannot be drawn at all is skipped and counted (``bad_input=skip``) or stops the run
(``bad_input=fail``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Sequence

import numpy as np

from data_pipelines.images import ImageUnreadable, fit_image
from data_pipelines.prepared import DamagedRecord
from data_pipelines.records import BadInput, Sample
from data_pipelines.render import SketchRenderer, renderer_for_config
from data_pipelines.render_stats import RenderStats, sum_stats
from data_pipelines.rows import RowBuilder
from data_pipelines.shapes import captioned_shapes
from data_pipelines.split import DocumentSplit
from vist2_jax.config.schema import CurriculumPoint, DataConfig, LayoutConfig
from vist2_jax.row_contract import GLYPH_CELL, TILE_TOKENS, close_chunk, reader_chunk_id, strip_visual

log = logging.getLogger(__name__)
MAX_DOCS_PER_ROW = 16
MIN_TEXT_TOKENS = 4
MIXTURE_STREAM = 7919  # the third seed word of a row's mixture draw (rows use two)


def unweighted(data: DataConfig) -> DataConfig:
    """``data`` for evaluation rows: every target weighs 1 (no ``chunk_start_weight``)."""
    return dataclasses.replace(data, chunk_start_tokens=0, chunk_start_weight=1.0)


def curriculum_at(data: DataConfig, layout: LayoutConfig, step: int) -> CurriculumPoint:
    """The stage-3 curriculum point in force at ``step`` (the layout's L when there is none)."""
    if not data.curriculum:
        return CurriculumPoint(text_len=layout.text_len, max_chunks=data.images_per_row + 1)
    return [p for p in data.curriculum if p.start_step <= step][-1]


class RowMaker:
    """``index -> row`` for one stage and source. Picklable; the renderer is built lazily per
    worker, and a lazy source reads its records there. ``side``: the documents it draws,
    ``train`` (never a held-out one), ``held_out`` (only those) or None (all; ``--data``),
    by ``split`` (``data_pipelines/split.py``; computed here when not given)."""

    def __init__(self, data: DataConfig, layout: LayoutConfig, samples: Sequence[Sample], tokenizer,
                 seed: int, side: str | None = None, split: DocumentSplit | None = None):
        # A list (in memory) or a lazy sequence (a prepared source): only len() and [i] are used.
        samples = samples if hasattr(samples, "__getitem__") else list(samples)
        self.data, self.layout, self.samples, self.tokenizer, self.seed = data, layout, samples, tokenizer, seed
        self.side = side
        self.split = split if split is not None or side is None else DocumentSplit(samples)
        if not self.samples and (data.stage != "caption" or data.source != "embedded"):
            raise BadInput(f"data.source={data.source!r} yielded no usable records")
        self._local = threading.local()  # one renderer per thread: its glyph atlas grows lazily
        self._renderers: list[SketchRenderer] = []  # all of them, for render_stats()
        self.counters = {"rows": 0, "documents": 0, "skipped_render": 0, "skipped_image": 0,
                         "skipped_long_caption": 0, "skipped_damaged": 0, "images": 0, "closed_early": 0}
        self.examples: list[str] = []  # the first few skipped records: "location: problem"
        # Caption samples all carry an image (``record_problem``); other stages use none.
        self.captions = self.samples if data.stage == "caption" else ()
        self.renderer  # noqa: B018  a missing font or a wrong data.font_sha256 fails here, in one line

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_local", "_renderers")}

    def __setstate__(self, state):
        self.__dict__.update(state, _local=threading.local(), _renderers=[])

    @property
    def renderer(self) -> SketchRenderer:
        """This thread's renderer (Grain's read-ahead threads call the maker concurrently and
        the renderer's atlas is not thread-safe)."""
        renderer = getattr(self._local, "renderer", None)
        if renderer is None:
            renderer = self._local.renderer = renderer_for_config(self.data, self.layout.image_size)
            self._renderers.append(renderer)
        return renderer

    def render_stats(self) -> RenderStats:
        """Renderer counters summed over this process's threads (not other worker processes)."""
        return sum_stats(r.stats for r in list(self._renderers))

    def draw(self, rng) -> Sample | None:
        """The document (or caption) the next part of a row takes, on this maker's side of the
        split; None when its stored record is damaged (a prepared source checks each record it
        reads), skipped and counted, or BadInput under ``bad_input=fail``."""
        try:
            if self.split is None:
                return self.samples[rng.integers(len(self.samples))]
            return self.split.draw(rng, self.samples, self.side)
        except DamagedRecord as err:
            self._skip("skipped_damaged", err.location, err.problem)
            return None

    def builder(self) -> RowBuilder:
        data, layout = self.data, self.layout
        return RowBuilder(data.seq_len, layout.visual_len, data.images_per_row,
                          (layout.image_size, layout.image_size), self.tokenizer.chunk_id, layout.visual_stride)

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        rng = np.random.default_rng([self.seed, index])
        stage = self.data.stage
        step = index // self.data.global_batch_size
        if stage == "olm":
            point = curriculum_at(self.data, self.layout, step)
            if rng.random() < point.ocr_fraction:
                lengths = point.ocr_text_lens
                text_len = int(lengths[rng.integers(len(lengths))]) if lengths else point.text_len
                row = self._fill(rng, self._ocr, dataclasses.replace(point, text_len=text_len))
            else:
                if point.olm_text_lens:  # every L of the stage, so a later L does not unlearn the earlier
                    lengths = point.olm_text_lens
                    point = dataclasses.replace(point, text_len=int(lengths[rng.integers(len(lengths))]))
                row = self._fill(rng, self._olm, point)
        elif stage == "ocr":
            row = self._fill(rng, self._ocr, curriculum_at(self.data, self.layout, step))
        elif stage == "sft":
            row = self._fill(rng, self._sft, curriculum_at(self.data, self.layout, step))
        else:
            row = self._fill(rng, self._caption, None)
        self.counters["rows"] += 1
        return strip_visual(row) if self.data.text_only else row

    # -- packing ---------------------------------------------------------------------
    def _fill(self, rng, add_document, point) -> dict[str, np.ndarray]:
        row = self.builder()
        for _ in range(MAX_DOCS_PER_ROW):
            if row.free() < row.text_cost(MIN_TEXT_TOKENS) or row.slot >= len(row.image_mask):
                break
            if not add_document(rng, row, point):
                break
        return row.finish()

    def _rule_chunks(self, tokens, text_len: int, count: int, sample: Sample):
        """Up to ``count`` chunks from the start of ``tokens`` by the chunk rule (row_contract
        ``close_chunk``: at most L tokens, closed before a token the sketch cannot take), with
        their sketches and the renderer's targets for each (``add_image`` keyword arguments:
        the glyph map and, with tiles, the tile tokens, under ``data.glyph_targets``; empty
        otherwise); None (skipped and counted) when not even one token can be drawn."""
        drawn = {}  # prefix length -> the text its sketch is drawn from, for the targets

        def try_render(ids):
            drawn[len(ids)] = text = self.renderer.sketch_text(ids, self.tokenizer.decode)
            return self.renderer.try_render(text, where=sample.location)

        chunks, images, targets, start = [], [], [], 0
        while len(chunks) < count and start < len(tokens):
            window = tokens[start:start + text_len]
            try:
                k, image = close_chunk(window, try_render)
            except ValueError as err:
                if self.data.bad_input == "fail":
                    raise BadInput(f"{sample.location}: chunk cannot be rendered: {err}") from None
                self.counters["skipped_render"] += 1
                if len(self.examples) < 5:
                    self.examples.append(f"{sample.location}: chunk cannot be rendered: {err}")
                log.warning("skipping %s: chunk cannot be rendered (%s)", sample.location, err)
                return None
            if k < len(window):
                self.counters["closed_early"] += 1
            chunks.append(window[:k])
            images.append(image)
            targets.append(self._targets(window[:k], drawn[k]))
            start += k
        self.counters["images"] += len(images)
        return chunks, images, targets

    def _targets(self, chunk, text: str) -> dict[str, np.ndarray]:
        """What the renderer knows about a chunk's sketch (drawn from ``text``), as
        ``add_image`` keywords."""
        if not self.data.glyph_targets:
            return {}
        out = {"glyphs": self.renderer.glyph_map(text, GLYPH_CELL)}
        if self.renderer.config.tile:
            out["tile_tokens"] = self.renderer.tile_token_ids(chunk, self.tokenizer.decode, self.layout.visual_len,
                                                              TILE_TOKENS)
        return out

    def _window(self, rng, sample: Sample, text_len: int, max_chunks: int):
        tokens = sample.tokens
        span = text_len * max_chunks
        start = int(rng.integers(0, max(1, len(tokens) - span + 1)))
        return tokens[start:start + span]

    def _chunks_that_fit(self, row: RowBuilder, text_len: int, wanted: int, with_last_image: bool,
                         reserve_positions: int = 0, reserve_slots: int = 0) -> int:
        """How many chunks of L tokens (each followed by an image, except maybe the last) fit
        after ``reserve_positions`` positions and ``reserve_slots`` image slots are set aside."""
        m = row.visual_len
        per = row.text_cost(text_len) + m
        free = row.free() - reserve_positions
        slots = len(row.image_mask) - row.slot - reserve_slots
        by_space = (free + (0 if with_last_image else m)) // per
        by_slots = slots + (0 if with_last_image else 1)
        return max(0, min(wanted, by_space, by_slots))

    def _olm(self, rng, row: RowBuilder, point: CurriculumPoint) -> bool:
        sample = self.draw(rng)
        if sample is None:
            return True  # a damaged record, skipped and counted; try another document
        window = self._window(rng, sample, point.text_len, point.max_chunks)
        wanted = -(-len(window) // point.text_len)
        fit = self._chunks_that_fit(row, point.text_len, wanted, with_last_image=False)
        text_len = point.text_len
        if fit == 0:
            text_len = row.free() - 1  # a shorter single chunk still trains on text
            if text_len < MIN_TEXT_TOKENS:
                return False
            fit = 1
        made = self._rule_chunks(window, text_len, fit, sample)
        if made is None:
            return True  # skipped and counted; try another document
        row.add_olm_document(*made, start_weight=(self.data.chunk_start_tokens, self.data.chunk_start_weight))
        self.counters["documents"] += 1
        return True

    def _ocr(self, rng, row: RowBuilder, point: CurriculumPoint) -> bool:
        sample = self.draw(rng)
        if sample is None:
            return True  # a damaged record, skipped and counted; try another document
        window = self._window(rng, sample, point.text_len, point.max_chunks)
        if self.data.ocr_shuffle and rng.random() < self.data.ocr_shuffle:  # only reading predicts it
            window = rng.permutation(np.asarray(window))
        wanted = -(-len(window) // point.text_len)
        fit = self._chunks_that_fit(row, point.text_len, wanted, with_last_image=True)
        if fit == 0:
            return False
        made = self._rule_chunks(window, point.text_len, fit, sample)
        if made is None:
            return True
        row.start_document()
        for c, (chunk, image, targets) in enumerate(zip(*made)):
            row.add_image(image, chunk_id=2 * c + 1, **targets)
            row.add_text(chunk, chunk_id=reader_chunk_id(2 * c + 1), marker=self.tokenizer.bos_id)
        self.counters["documents"] += 1
        return True

    def _sft(self, rng, row: RowBuilder, point: CurriculumPoint) -> bool:
        sample = self.draw(rng)
        if sample is None:
            return True  # a damaged record, skipped and counted; try another document
        L, m = point.text_len, row.visual_len
        query_made = self._rule_chunks(sample.prompt, L, len(sample.prompt), sample)
        response_made = self._rule_chunks(sample.tokens, L, point.max_chunks, sample)
        if query_made is None or response_made is None:
            return True
        (query, query_images, query_targets), (response, response_images, response_targets) = query_made, response_made
        # Keep the most recent query chunks that leave room for one response chunk (left
        # truncation of an over-long context, counted).
        room = min((row.free() - row.text_cost(len(response[0]) if response else 0)) // m,
                   len(row.image_mask) - row.slot)
        if room < 1 or not response:
            return False
        if len(query) > room:
            self.counters["query_truncated"] = self.counters.get("query_truncated", 0) + 1
            query, query_images, query_targets = query[-room:], query_images[-room:], query_targets[-room:]
        n_resp = self._chunks_that_fit(row, L, len(response), with_last_image=False,
                                       reserve_positions=len(query) * m, reserve_slots=len(query))
        if n_resp == 0:
            return False
        response = response[:n_resp]
        row.start_document()
        for q, (image, targets) in enumerate(zip(query_images, query_targets)):
            row.add_image(image, chunk_id=q + 1, **targets)
        for r, chunk in enumerate(response):
            chunk_id = len(query) + r + 1
            row.add_text(chunk, chunk_id=chunk_id)
            if r < len(response) - 1:
                row.add_image(response_images[r], chunk_id=chunk_id, **response_targets[r])
        self.counters["documents"] += 1
        return True

    def _skip(self, counter: str, location: str, problem: str) -> None:
        """Count and log a record this row cannot use, or stop under ``bad_input=fail``."""
        if self.data.bad_input == "fail":
            raise BadInput(f"{location}: {problem} (data.bad_input=fail)")
        self.counters[counter] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{location}: {problem}")
        log.warning("skipping %s: %s", location, problem)

    def _caption(self, rng, row: RowBuilder, point) -> bool:
        """A real caption sample when the source has them, else synthetic shapes."""
        size = self.layout.image_size
        if not self.captions:
            image, caption = captioned_shapes(rng, size)
            tokens = self.tokenizer.encode(caption)
        else:
            sample = self.draw(rng)
            if sample is None:
                return True  # a damaged record, skipped and counted; try another document
            tokens = sample.tokens
            if row.visual_len + row.text_cost(len(tokens)) > row.seq_len:
                self._skip("skipped_long_caption", sample.location,
                           f"caption of {len(tokens)} tokens does not fit a row of {row.seq_len}")
                return True
            if row.free() < row.visual_len + row.text_cost(len(tokens)):
                return False
            try:
                image = fit_image(sample.image, size)
            except ImageUnreadable as err:
                self._skip("skipped_image", sample.location, f"image {err}")
                return True
        if row.free() < row.visual_len + row.text_cost(len(tokens)):
            return False
        row.start_document()
        row.add_image(image, chunk_id=1)
        row.add_text(tokens, chunk_id=2)
        self.counters["documents"] += 1
        return True


class MixtureMaker:
    """``index -> row`` from one of several row makers (a ``data.sources`` mixture): row i
    comes from maker k with probability ``weights[k] / sum``, drawn from its own stream of
    ``(seed, i)``, so the choice is as deterministic and random-access as the rows."""

    def __init__(self, makers: Sequence[RowMaker], weights: Sequence[float], seed: int):
        self.makers, self.seed = list(makers), seed
        self.cumulative = np.cumsum(np.asarray(weights, float)) / float(np.sum(weights))

    def source_of(self, index: int) -> int:
        draw = np.random.default_rng([self.seed, int(index), MIXTURE_STREAM]).random()
        return min(int(np.searchsorted(self.cumulative, draw, side="right")), len(self.makers) - 1)

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        return self.makers[self.source_of(index)](index)

    @property
    def renderer(self) -> SketchRenderer:
        return self.makers[0].renderer  # one render config for all sources

    @property
    def counters(self) -> dict[str, int]:
        """The makers' counters summed, and rows per source (``rows:<k>``)."""
        total: dict[str, int] = {}
        for k, maker in enumerate(self.makers):
            for key, value in maker.counters.items():
                total[key] = total.get(key, 0) + value
            total[f"rows:{k}"] = maker.counters["rows"]
        return total

    @property
    def examples(self) -> list[str]:
        return [e for maker in self.makers for e in maker.examples]

    def render_stats(self) -> RenderStats:
        return sum_stats(maker.render_stats() for maker in self.makers)
