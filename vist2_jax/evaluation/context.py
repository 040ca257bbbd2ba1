"""What every evaluation reads from a run: config, parameters, tokenizer, the saved
renderer config, and document samples with a renderer that draws the run's sketches."""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

from vist2_jax import storage
from vist2_jax.config.schema import Config, ConfigError, CurriculumPoint

log = logging.getLogger(__name__)
EVAL_SEED = 7_919  # added to the run seed: evaluation rows never repeat training rows' draws
RENDER_KEYS = ("font_sha256", "font_sizes_px", "image_size", "margin", "line_spacing", "background")


@dataclasses.dataclass
class EvalContext:
    config: Config
    params: dict  # {"params": {"vision", "aligner", "decoder"}}
    tokenizer: object
    step: int = 0
    renderer: dict | None = None  # the renderer config saved with the checkpoint

    def detokenize(self, ids) -> str:
        vocab = self.tokenizer.vocab_size  # the model's vocabulary may be padded past it
        return self.tokenizer.decode([int(i) for i in ids if 0 <= i < vocab])


def load_context(run_dir: str | Path) -> EvalContext:
    """A run's newest readable checkpoint, its tokenizer and its saved renderer config."""
    from vist2_jax.checkpointing.runs import load_run

    run = load_run(run_dir, what="RUN_DIR")
    return EvalContext(run.config, run.params, run.tokenizer, run.step, run.renderer)


def final_point(config: Config) -> CurriculumPoint:
    """The layout a run ends with: its last curriculum point (L, chunks), without OCR mixing."""
    from data_pipelines.row_makers import curriculum_at

    point = curriculum_at(config.data, config.model.layout, config.train.steps)
    return dataclasses.replace(point, ocr_fraction=0.0)


def window_at(config: Config, text_len: int) -> CurriculumPoint:
    """The document window a run reads chunks of ``text_len`` tokens in: the chunks per
    window of its last curriculum point at that L (a curriculum gives each L its own
    window: 8 chunks of 16 tokens, 3 of 64), else the final point's; at least 2 chunks,
    so there is a memory to measure. A cap: a row's positions and image slots may hold
    fewer (``evaluate_memory`` reports the chunks its documents hold)."""
    points = [p for p in config.data.curriculum if p.text_len == text_len] or [final_point(config)]
    return CurriculumPoint(text_len=text_len, max_chunks=max(points[-1].max_chunks, 2))


@functools.lru_cache(maxsize=4)
def _samples(source: str, data_dir: str, manual_dir: str, tokenizer, held_out: bool) -> tuple:
    """(documents, their held-out split or None): a prepared folder read lazily, any other
    source loaded; the same sequence either way (a chat's response counts as a document)."""
    from data_pipelines.prepared import PreparedSamples, is_prepared
    from data_pipelines.sources import load_samples
    from data_pipelines.split import DocumentSplit

    if is_prepared(source):
        samples = PreparedSamples(source, "olm", tokenizer)
    else:
        samples = tuple(load_samples(source, tokenizer, "olm", "skip", data_dir, manual_dir)[0])
    return samples, DocumentSplit(samples) if held_out else None


def row_maker(ctx: EvalContext, stage: str, point: CurriculumPoint, data: str | None = None):
    """A RowMaker of ``stage`` rows (``ocr`` or ``olm``) at one curriculum point, with an
    evaluation seed, over the held-out documents of the run's source (documents it never
    trained on, ``data_pipelines/split.py``) or over all of the folder ``data``; its
    renderer must draw what the run's saved renderer config describes."""
    from data_pipelines.row_makers import RowMaker, unweighted
    from data_pipelines.split import HELD_OUT

    config = ctx.config
    source = data or config.data.source
    if data and not storage.as_path(data).exists():
        raise ConfigError(f"--data: no such file or folder {data}")
    samples, split = _samples(source, config.data.data_dir, config.data.manual_dir, ctx.tokenizer, not data)
    if not len(samples):
        raise ConfigError(f"{'--data' if data else 'data.source'}: {source} holds no documents")
    eval_data = dataclasses.replace(unweighted(config.data), stage=stage, source=source, sources=(), curriculum=(point,))
    maker = RowMaker(eval_data, config.model.layout, samples, ctx.tokenizer, config.run.seed + EVAL_SEED,
                     HELD_OUT if split else None, split)
    check_renderer(ctx, maker.renderer.renderer_config())
    return maker


def check_renderer(ctx: EvalContext, drawn: dict) -> None:
    """Evaluation sketches must be drawn like the run's: same font file, sizes, geometry."""
    if not ctx.renderer:
        return
    for key in RENDER_KEYS:
        if key in ctx.renderer and drawn.get(key) != ctx.renderer[key]:
            raise ConfigError(f"renderer.{key}: the run drew sketches with {ctx.renderer[key]!r}, "
                              f"this host would draw {drawn.get(key)!r}")


class RunRenderer:
    """The run's sketch renderer for generation, rebuilt from the renderer config saved with
    the checkpoint (its font hash checked). A text it cannot draw raises RenderRejected,
    counted in ``rejected``, so the generator closes the chunk early by the chunk rule."""

    def __init__(self, ctx: EvalContext):
        from data_pipelines.render import renderer_for_config, renderer_from_saved

        self.renderer = (renderer_from_saved(ctx.renderer) if ctx.renderer else
                         renderer_for_config(ctx.config.data, ctx.config.model.layout.image_size))
        check_renderer(ctx, self.renderer.renderer_config())
        self.rejected = self.drawn = 0

    def __call__(self, text: str):
        from data_pipelines.render import RenderRejected

        try:
            image = self.renderer.render(text, where="evaluation")
        except RenderRejected:
            self.rejected += 1
            raise
        self.drawn += 1
        return image
