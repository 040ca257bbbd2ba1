"""The text-oriented vision objective: the renderer's glyph map, the rows that carry it,
and the glyph head trained by it (docs/design.md §4)."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from data_pipelines.pipeline import build_pipeline
from data_pipelines.render import RenderConfig, SketchRenderer
from vist2_jax.config import load_config
from vist2_jax.config.schema import ConfigError
from vist2_jax.model.vist2 import Vist2Model
from vist2_jax.row_contract import GLYPH_BLANK, GLYPH_CELL, GLYPH_UNKNOWN, glyph_class
from vist2_jax.training.optimizer import make_optimizer

GLYPHS = ["model.vision.glyph_head=true", "data.glyph_targets=true", "train.glyph_loss_weight=1"]
SMALL = ["model.decoder.num_layers=1", "model.vision.num_layers=1", "data.seq_len=128", "data.global_batch_size=2",
         "data.images_per_row=2", "data.eval_rows=2", "run.progress=false", "mesh.fsdp=1"]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from data_pipelines.pipeline import resolve_tokenizer

    return str(resolve_tokenizer(load_config(), tmp_path_factory.mktemp("tok")).path)


def test_glyph_map_names_the_character_drawn_in_each_cell():
    renderer = SketchRenderer(RenderConfig(image_size=128))
    text = "Wq\n  x"
    image, glyphs = renderer.render(text), renderer.glyph_map(text, GLYPH_CELL)
    assert glyphs.shape == (128 // GLYPH_CELL,) * 2
    ink = image[..., 0] < 128
    for cls in (glyph_class("W"), glyph_class("q"), glyph_class("x")):
        ys, xs = np.nonzero(glyphs == cls)
        assert len(ys), cls
        cells = [ink[y * GLYPH_CELL:(y + 1) * GLYPH_CELL, x * GLYPH_CELL:(x + 1) * GLYPH_CELL].any()
                 for y, x in zip(ys, xs)]
        assert any(cells)  # the cells named after a glyph (its line box) hold its ink
    # the indented "x" of line 2 lies right of "W" (two spaces in), on the line below
    (wy, wx), (xy, xx) = (np.argwhere(glyphs == glyph_class(c)).min(0) for c in "Wx")
    assert xy > wy and xx > wx
    cells = 128 // GLYPH_CELL
    inked_cells = ink.reshape(cells, GLYPH_CELL, cells, GLYPH_CELL).any(axis=(1, 3))
    # where ink is, a glyph is named (a cell is labelled by the glyph box holding its centre, so the
    # edge of a glyph spilling into the next cell may go unnamed)
    assert (glyphs[inked_cells] != GLYPH_BLANK).mean() > 0.75
    assert glyphs.max() < GLYPH_UNKNOWN


@pytest.mark.parametrize("tile", [0, 32], ids=["page", "tiles"])
def test_rows_carry_glyph_maps_only_for_rendered_text(tmp_path, tokenizer_path, tile):
    for stage, known in (("ocr", True), ("caption", False)):
        config = load_config(overrides=[*SMALL, *GLYPHS, f"data.tokenizer={tokenizer_path}", f"data.stage={stage}",
                                        f"data.sketch_tile={tile}"])
        batch = next(iter(build_pipeline(config, tmp_path / stage).train_dataset()))
        real = batch["glyphs"][batch["image_mask"]]
        assert batch["glyphs"].dtype == np.uint8 and len(real)
        assert bool((real != GLYPH_UNKNOWN).all()) is known
        assert bool((batch["glyphs"][~batch["image_mask"]] == GLYPH_UNKNOWN).all())
        if known:
            assert (real != GLYPH_BLANK).mean() > 0.1


def test_shuffled_ocr_rows_hold_the_corpus_tokens_out_of_order(tmp_path, tokenizer_path):
    """data.ocr_shuffle: OCR text spans are document windows with their tokens in random
    order (so only reading predicts them): adjacent tokens of a natural row are adjacent in
    the corpus, those of a shuffled row mostly are not; the sketches show the spans' text."""
    from data_pipelines.corpus import embedded_documents
    from data_pipelines.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    pairs = set()
    for document in embedded_documents():
        ids = tokenizer.encode(document)
        pairs.update(zip(ids, ids[1:]))
    share = {}
    for shuffle in (False, True):
        config = load_config(overrides=[*SMALL, f"data.tokenizer={tokenizer_path}", "data.stage=ocr",
                                        f"data.ocr_shuffle={str(shuffle).lower()}"])
        batch = next(iter(build_pipeline(config, tmp_path / str(shuffle)).train_dataset()))
        tokens, chunks = batch["tokens"][0], batch["chunk_id"][0]
        text = (batch["loss_mask"][0] > 0) & (tokens < tokenizer.vocab_size)
        adjacent = [(a, b) for i, (a, b) in enumerate(zip(tokens, tokens[1:]))
                    if text[i] and text[i + 1] and chunks[i] == chunks[i + 1]]
        assert len(adjacent) > 20
        share[shuffle] = sum((int(a), int(b)) in pairs for a, b in adjacent) / len(adjacent)
        assert (batch["images"][0][batch["image_mask"][0]] < 128).any()  # ink: the spans were drawn
    assert share[False] > 0.9 and share[True] < 0.5, share


def test_glyph_loss_trains_the_tower_through_its_head(tmp_path, tokenizer_path):
    from vist2_jax.training.step import make_train_step

    config = load_config(overrides=[*SMALL, *GLYPHS, f"data.tokenizer={tokenizer_path}", "data.stage=ocr",
                                    "train.trainable=[vision,aligner]", "train.steps=10", "train.warmup_steps=0",
                                    "train.learning_rate=3e-3"])
    batch = next(iter(build_pipeline(config, tmp_path).train_dataset()))
    params = nn.unbox(jax.jit(Vist2Model(config.model).init)(jax.random.key(0), batch))
    assert "glyph_head" in params["params"]
    optimizer = make_optimizer(config.train, params)
    state = {"step": np.int32(0), "params": params, "opt_state": optimizer.init(params)}
    step = jax.jit(make_train_step(config, optimizer))
    losses = []
    for _ in range(6):
        state, metrics = step(state, batch)
        losses.append(float(metrics["glyph_loss"]))
    assert losses[-1] < 0.8 * losses[0]  # the head and the tower learn the glyphs of the batch
    assert float(metrics["grad_norm_vision"]) > 0
    head = jax.tree_util.tree_leaves(state["params"]["params"]["glyph_head"])
    assert any(not np.allclose(a, b) for a, b in zip(head, jax.tree_util.tree_leaves(params["params"]["glyph_head"])))


@pytest.mark.parametrize("missing, key", [("model.vision.glyph_head=false", "model.vision.glyph_head"),
                                          ("data.glyph_targets=false", "data.glyph_targets"),
                                          ("train.trainable=[aligner]", "train.trainable")])
def test_glyph_loss_without_what_it_needs_is_one_line(missing, key):
    with pytest.raises(ConfigError, match=f"^train.glyph_loss_weight: .*{key}"):
        load_config(overrides=[*GLYPHS, missing])


def test_a_sketch_tile_that_does_not_divide_the_sketch_is_one_line():
    with pytest.raises(ConfigError, match="^data.sketch_tile: 48 px must be 0 .* the 128 px sketch"):
        load_config(overrides=["preset=tiny", "data.sketch_tile=48"])


def test_compression_table_compares_with_a_text_only_model(tmp_path, tokenizer_path):
    """The proof run's table on two untrained tiny models: every ratio has OCR with its blank
    control, a memory gain and a gap to the other model with 95% intervals, JSON + PNG."""
    import json

    from data_pipelines.tokenizer import load_tokenizer
    from vist2_jax.evaluation.compression import compression_table, table_lines, write_table
    from vist2_jax.evaluation.context import EvalContext
    from vist2_jax.model.vist2 import example_batch

    config = load_config(overrides=[*SMALL, f"data.tokenizer={tokenizer_path}", "model.layout.text_len=16",
                                    "data.seq_len=256"])
    tokenizer = load_tokenizer(tokenizer_path)
    model = Vist2Model(config.model)
    contexts = [EvalContext(config, nn.unbox(model.init(jax.random.key(seed), example_batch(config.model))), tokenizer)
                for seed in (0, 1)]
    table = compression_table(*contexts, ratios=(1, 2), chunks=3, documents=3)
    assert [row["ratio"] for row in table] == [1, 2]
    for row in table:
        assert 0 <= row["ocr_cer"] and 0 <= row["ocr_cer_blank"] and row["documents"] >= 1
        assert row["memory_gain_lo"] <= row["memory_gain"] <= row["memory_gain_hi"]
        assert row["compression_gap_lo"] <= row["compression_gap"] <= row["compression_gap_hi"]
        assert abs(row["compression_gap"] - (row["nll_true"] - row["nll_text_only_model"])) < 1e-6
    write_table(table, tmp_path, {"date": "today"})
    assert json.loads((tmp_path / "compression.json").read_text())["table"][1]["text_len"] == 32
    assert (tmp_path / "compression.png").stat().st_size > 1000
    assert len(table_lines(table)) == 3
