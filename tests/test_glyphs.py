"""The text-oriented vision objectives: the renderer's glyph map, the rows that carry it,
and the glyph head trained by it; with one tile per visual token, the tokens each tile
shows (``tile_tokens``), token-aligned tiles, strided rows and the tile-token loss that
reads each visual token through the decoder's embedding table (docs/design.md §2, §4)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines.pipeline import build_pipeline
from data_pipelines.render import RenderConfig, SketchRenderer
from vist2_jax.config import load_config
from vist2_jax.config.schema import ConfigError
from vist2_jax.model.vist2 import Vist2Model, tile_token_loss
from vist2_jax.row_contract import (GLYPH_BLANK, GLYPH_CELL, GLYPH_UNKNOWN, TILE_TOKEN_NONE, TILE_TOKENS, VISUAL,
                                    glyph_class)
from vist2_jax.training.optimizer import make_optimizer

GLYPHS = ["model.vision.glyph_head=true", "data.glyph_targets=true", "train.glyph_loss_weight=1"]
TILES = ["model.vision.glyph_head=true", "data.glyph_targets=true", "data.sketch_tile=32",
         "train.tile_token_loss_weight=1"]
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
def test_missing_glyphs_are_counted_once_per_sketch_with_its_targets(tile):
    renderer = SketchRenderer(RenderConfig(image_size=128, tile=tile))
    text = "ink \u4e2d and \u6587"  # no CJK in DejaVu Sans Mono
    renderer.render(text)
    renderer.glyph_map(text, GLYPH_CELL)
    if tile:
        renderer.tile_token_ids(list(range(len(text))), lambda ids: "".join(text[i] for i in ids), 16, TILE_TOKENS)
    assert renderer.stats.missing_glyphs == 2 and renderer.stats.rendered == 1


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
    """data.ocr_shuffle: that fraction of OCR documents are windows with their tokens in
    random order (so only reading predicts them): adjacent tokens of a natural row are
    adjacent in the corpus, those of a shuffled row mostly are not, half-shuffled rows lie
    between; the sketches show the spans' text."""
    from data_pipelines.corpus import embedded_documents
    from data_pipelines.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    pairs = set()
    for document in embedded_documents():
        ids = tokenizer.encode(document)
        pairs.update(zip(ids, ids[1:]))
    share = {}
    for shuffle in (0.0, 0.5, 1.0):
        config = load_config(overrides=[*SMALL, f"data.tokenizer={tokenizer_path}", "data.stage=ocr",
                                        f"data.ocr_shuffle={shuffle}", "data.global_batch_size=8"])
        batch = next(iter(build_pipeline(config, tmp_path / str(shuffle)).train_dataset()))
        tokens, chunks = batch["tokens"].reshape(-1), batch["chunk_id"].reshape(-1)
        text = (batch["loss_mask"].reshape(-1) > 0) & (tokens < tokenizer.vocab_size)
        adjacent = [(a, b) for i, (a, b) in enumerate(zip(tokens, tokens[1:]))
                    if text[i] and text[i + 1] and chunks[i] == chunks[i + 1]]
        assert len(adjacent) > 20
        share[shuffle] = sum((int(a), int(b)) in pairs for a, b in adjacent) / len(adjacent)
        assert (batch["images"][batch["image_mask"]] < 128).any()  # ink: the spans were drawn
    assert share[0.0] > 0.9 > share[0.5] > share[1.0] + 0.1 and share[1.0] < 0.5, share


def _train_on_one_batch(tmp_path, tokenizer_path, objective: list[str], metric: str, steps: int = 6):
    """(initial params, final state, last metrics, ``metric`` per step): real train steps of the
    tower and aligner on one OCR batch at 3e-3."""
    from vist2_jax.training.step import make_train_step

    config = load_config(overrides=[*SMALL, *objective, f"data.tokenizer={tokenizer_path}", "data.stage=ocr",
                                    "train.trainable=[vision,aligner]", "train.steps=10", "train.warmup_steps=0",
                                    "train.learning_rate=3e-3"])
    batch = next(iter(build_pipeline(config, tmp_path).train_dataset()))
    params = nn.unbox(jax.jit(Vist2Model(config.model).init)(jax.random.key(0), batch))
    optimizer = make_optimizer(config.train, params)
    state = {"step": np.int32(0), "params": params, "opt_state": optimizer.init(params)}
    step = jax.jit(make_train_step(config, optimizer))
    values = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        values.append(float(metrics[metric]))
    return params, state, metrics, values


def test_glyph_loss_trains_the_tower_through_its_head(tmp_path, tokenizer_path):
    params, state, metrics, losses = _train_on_one_batch(tmp_path, tokenizer_path, GLYPHS, "glyph_loss")
    assert "glyph_head" in params["params"]
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
        assert abs(row["text_context_gain"] - (row["nll_text_only_model_alone"] - row["nll_text_only_model"])) < 1e-6
        assert row["text_foreign_gain_lo"] <= row["text_foreign_gain"] <= row["text_foreign_gain_hi"]
        assert 2 <= row["chunks_per_window"] <= config.data.images_per_row + 1  # what the rows hold
        assert set(row["first_target_nll"]) == {"true", "blank", "foreign", "text", "text_alone", "text_foreign"}
        assert all(value > 0 for value in row["first_target_nll"].values())
        assert abs(row["text_foreign_gain"] - (row["nll_text_foreign"] - row["nll_text_only_model"])) < 1e-6
    write_table(table, tmp_path, {"date": "today"})
    assert json.loads((tmp_path / "compression.json").read_text())["table"][1]["text_len"] == 32
    assert (tmp_path / "compression.png").stat().st_size > 1000
    assert len(table_lines(table)) == 7 and "text foreign-true" in table_lines(table)[0]


def test_tile_token_ids_name_the_tokens_each_tile_shows():
    pieces = ["The", " quick", " brown", "\n", "fox", " ", "jumps", "\t", "over", " the", " lazy",
              " dog", ".", "a", "b", "c", "d", "e", "f", "g", "h"]
    ids = list(range(len(pieces)))

    def decode(chosen):
        return "".join(pieces[i] for i in chosen)

    renderer = SketchRenderer(RenderConfig(image_size=128, tile=32))
    slots = (128 // 32) ** 2
    out = renderer.tile_token_ids(ids, decode, slots, TILE_TOKENS)
    assert out.shape == (slots, TILE_TOKENS) and out.dtype == np.int32
    # Expected, the other way round: which token owns each character of the drawn stream
    # (line breaks as one space, tabs expanded), and the tiles those characters fall in.
    size, lines, _ = renderer.layout(decode(ids))
    capacity = size.max_rows * size.cols
    owner, text, line_start, tab = [], "", 0, renderer.config.tab_size
    for i, piece in enumerate(pieces):
        if piece == "\n":
            piece, line_start = " ", len(text) + 1
        elif piece == "\t":
            piece = " " * (tab - (len(text) - line_start) % tab)
        owner += [i] * len(piece)
        text += piece
    stream = "".join(lines)
    assert stream.rstrip() == text.rstrip()  # the layout draws exactly these characters, in order
    for tile in range(slots):
        drawn = "".join(lines[tile * size.max_rows:(tile + 1) * size.max_rows])
        assert drawn == stream[tile * capacity:(tile + 1) * capacity]
        wanted = []
        for pos in range(tile * capacity, min(len(text), (tile + 1) * capacity)):
            if text[pos] != " " and owner[pos] not in wanted:
                wanted.append(owner[pos])
        got = [int(t) for t in out[tile] if t != TILE_TOKEN_NONE]
        assert got == wanted[:TILE_TOKENS], (tile, drawn)
    assert pieces.index(" quick") in out[0] and pieces.index(" quick") in out[1]  # cut by a tile edge: both
    assert pieces.index("\t") not in out and pieces.index(" ") not in out  # nothing drawn
    crowded = [i for i, t in enumerate(out) if (t != TILE_TOKEN_NONE).sum() == TILE_TOKENS]
    assert crowded  # eight one-letter tokens in a tile of eight characters: the first TILE_TOKENS kept
    with pytest.raises(ValueError, match="tile layout"):
        SketchRenderer(RenderConfig(image_size=128)).tile_token_ids(ids, decode, slots, TILE_TOKENS)


@pytest.mark.parametrize("tile", [0, 32], ids=["page", "tiles"])
def test_ocr_rows_carry_the_tokens_their_text_span_reads(tmp_path, tokenizer_path, tile):
    config = load_config(overrides=[*SMALL, "data.glyph_targets=true", f"data.tokenizer={tokenizer_path}",
                                    "data.stage=ocr", f"data.sketch_tile={tile}"])
    batch = next(iter(build_pipeline(config, tmp_path).train_dataset()))
    m = config.model.layout.visual_len
    assert batch["tile_tokens"].shape == (2, 2, m, TILE_TOKENS) and batch["tile_tokens"].dtype == np.int32
    assert (batch["tile_tokens"][~batch["image_mask"]] == TILE_TOKEN_NONE).all()
    if not tile:
        assert (batch["tile_tokens"] == TILE_TOKEN_NONE).all()  # a page has no per-token tiles
        return
    for b in range(2):
        visual = np.flatnonzero(batch["modality"][b] == VISUAL)
        for slot in range(int(batch["image_mask"][b].sum())):
            chunk = batch["chunk_id"][b][visual[slot * m]]
            read = set(batch["tokens"][b][batch["chunk_id"][b] == chunk + 1].tolist())  # the span reading it
            named = batch["tile_tokens"][b, slot]
            named = named[named != TILE_TOKEN_NONE]
            assert len(named) >= 5 and set(named.tolist()) <= read
            # reading order: the first tile names the span's first drawn tokens
            assert batch["tile_tokens"][b, slot, 0, 0] in batch["tokens"][b][batch["chunk_id"][b] == chunk + 1][1:4]


def test_tile_token_loss_is_the_mean_label_cross_entropy_and_leaves_the_table_alone():
    rng = np.random.default_rng(0)
    visual = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
    table = rng.normal(size=(11, 8)).astype(np.float32)
    labels = np.full((2, 3, 4, TILE_TOKENS), TILE_TOKEN_NONE, np.int32)
    labels[0, 0, 0, :2] = [3, 5]
    labels[1, 2, 3, :1] = [7]
    labels[0, 1, 2, :3] = [0, 10, 10]
    out = tile_token_loss(jnp.asarray(visual), jnp.asarray(table), jnp.asarray(labels))
    logits = visual @ table.T
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = [-logp[i, j, k, t] for (i, j, k) in np.argwhere((labels != TILE_TOKEN_NONE).any(-1))
           for t in labels[i, j, k] if t != TILE_TOKEN_NONE]
    assert float(out["tile_token_loss"]) == pytest.approx(np.mean(nll), rel=1e-5)
    assert float(out["tile_token_labels"]) == 6 and float(out["tile_token_tiles"]) == 3
    top = logits.argmax(-1)
    hits = [top[i, j, k] in labels[i, j, k] for (i, j, k) in np.argwhere((labels != TILE_TOKEN_NONE).any(-1))]
    assert float(out["tile_token_accuracy"]) == pytest.approx(np.mean(hits))
    grad_visual, grad_table = jax.grad(lambda v, t: tile_token_loss(v, t, jnp.asarray(labels))["tile_token_loss"],
                                       argnums=(0, 1))(jnp.asarray(visual), jnp.asarray(table))
    assert float(jnp.abs(grad_table).max()) == 0.0  # the decoder's space is the target, not moved
    assert float(jnp.abs(grad_visual[0, 0, 0]).max()) > 0 and float(jnp.abs(grad_visual[0, 0, 1]).max()) == 0


def test_tile_token_objective_moves_the_visual_tokens_into_the_token_space(tmp_path, tokenizer_path):
    params, state, metrics, losses = _train_on_one_batch(tmp_path, tokenizer_path, TILES, "tile_token_loss")
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.3, losses
    assert 0 <= float(metrics["tile_token_accuracy"]) <= 1
    assert np.array_equal(state["params"]["params"]["decoder"]["embedding"],
                          params["params"]["decoder"]["embedding"])  # frozen decoder: its table is the target


@pytest.mark.parametrize("change, key", [("data.sketch_tile=0", "data.sketch_tile=0 must equal patch_size x merge"),
                                         ("data.glyph_targets=false", "data.glyph_targets"),
                                         ("train.trainable=[decoder]", "train.trainable"),
                                         ("train.tile_token_loss_weight=-1", "must be >= 0")])
def test_tile_token_loss_without_what_it_needs_is_one_line(change, key):
    with pytest.raises(ConfigError, match=f"^train.tile_token_loss_weight: .*{key}"):
        load_config(overrides=[*TILES, change])


def test_token_aligned_tiles_show_r_tokens_each_and_keep_the_text_exact():
    pieces = ["The", " quick", " brown", "\n", "fox", "\t", "jumps", " over", " the", " lazy", " dog"]

    def decode(chosen):
        return "".join(pieces[i] for i in chosen)

    ids = list(range(len(pieces)))
    renderer = SketchRenderer(RenderConfig(image_size=128, tile=32, tile_tokens=2))
    drawn = renderer.sketch_text(ids, decode)
    groups = drawn.split("\x1d")
    assert "".join(groups) == decode(ids)  # the same characters, only cut into groups
    assert groups == [decode(ids[i:i + 2]) for i in range(0, len(ids), 2)]
    size, lines, _ = renderer.layout(drawn)
    for k, group in enumerate(groups):  # tile k shows group k, line breaks and tabs as in a page
        shown = "".join(lines[k * size.max_rows:(k + 1) * size.max_rows])
        assert shown == " ".join(p.expandtabs(renderer.config.tab_size) for p in group.splitlines())
    image = renderer.render(drawn)
    ink = (image[..., 0] < 128).reshape(4, 32, 4, 32).any(axis=(1, 3)).reshape(-1)
    assert ink[:len(groups)].all() and not ink[len(groups):].any()  # six tiles drawn, ten blank
    glyphs = renderer.glyph_map(drawn, 4)
    assert (glyphs[:8, :8] != 0).any() and (glyphs[-16:] == 0).all()  # tiles 8-15: nothing
    targets = renderer.tile_token_ids(ids, decode, 16, TILE_TOKENS)
    assert targets[:6, :2].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, TILE_TOKEN_NONE]]
    assert (targets[6:] == TILE_TOKEN_NONE).all() and (targets[:, 2:] == TILE_TOKEN_NONE).all()
    from data_pipelines.render import RenderRejected, renderer_from_saved

    assert renderer_from_saved(renderer.renderer_config()).config.tile_tokens == 2
    with pytest.raises(RenderRejected, match="token groups do not fit"):
        renderer.render(renderer.sketch_text([0] * 2 + [1] * 3, lambda c: "x" * 40 * len(c)))
    with pytest.raises(ValueError, match="tile layout"):
        RenderConfig(image_size=128, tile_tokens=2)


def test_strided_rows_give_each_visual_token_r_positions(tmp_path, tokenizer_path):
    config = load_config(overrides=[*SMALL, *TILES, f"data.tokenizer={tokenizer_path}", "data.stage=ocr",
                                    "data.sketch_tile_tokens=2", "model.layout.visual_stride=2",
                                    "data.curriculum=[{start_step: 0, text_len: 32, max_chunks: 2}]"])
    batch = next(iter(build_pipeline(config, tmp_path).train_dataset()))
    m = config.model.layout.visual_len
    positions, modality = batch["positions"][0], batch["modality"][0]
    visual = np.flatnonzero(modality == VISUAL)
    first = positions[visual[:m]]
    assert (np.diff(first) == 2).all()
    marker = visual[m - 1] + 1  # the reading span starts right after the span, 2 positions on
    assert positions[marker] == first[-1] + 2 and modality[marker] == 1
    tiles = batch["tile_tokens"][0, 0]
    text = batch["tokens"][0][marker + 1:marker + 1 + 2 * m]
    n = int((tiles[:, :2] != TILE_TOKEN_NONE).sum())
    assert n >= 8 and tiles[:, :2].reshape(-1)[:n].tolist() == text[:n].tolist()  # tile k: tokens 2k, 2k+1


def test_ocr_rows_mixed_into_olm_read_chunks_of_ocr_text_lens(tmp_path, tokenizer_path):
    """A curriculum point's ocr_text_lens are the L values of the OCR rows stage 3 mixes in,
    one drawn per row (empty: the point's own L), so every tile stays read at every ratio
    while the OLM chunks are short."""
    from data_pipelines.tokenizer import load_tokenizer
    from vist2_jax.row_contract import TEXT

    bos = load_tokenizer(tokenizer_path).bos_id
    lengths = {}
    for ocr_lens in ("[]", "[16, 32]"):
        point = f"{{start_step: 0, text_len: 16, max_chunks: 3, ocr_fraction: 1.0, ocr_text_lens: {ocr_lens}}}"
        config = load_config(overrides=[*SMALL, f"data.tokenizer={tokenizer_path}", "data.stage=olm",
                                        f"data.curriculum=[{point}]", "data.global_batch_size=8"])
        batch = next(iter(build_pipeline(config, tmp_path / str(len(ocr_lens))).train_dataset()))
        spans = []
        for tokens, chunks, modality in zip(batch["tokens"], batch["chunk_id"], batch["modality"]):
            for start in np.flatnonzero((tokens == bos) & (modality == TEXT)):  # each transcription
                span = (chunks == chunks[start]) & (modality == TEXT) & (np.arange(len(tokens)) > start)
                spans.append(int(span.sum()))
        assert spans, "no OCR span in a batch of ocr_fraction 1.0"
        lengths[ocr_lens] = set(spans)
    assert max(lengths["[]"]) == 16 and {16, 32} <= lengths["[16, 32]"], lengths


def test_evaluation_rows_have_the_shape_the_run_ends_in(tmp_path, tokenizer_path):
    """A curriculum run's held-out rows (eval_loss, keep_best) are built at its last point:
    chunks of the final L, not the first point's shorter ones."""
    from vist2_jax.row_contract import TEXT

    longest = {}
    for steps in (4, 12):  # the curriculum moves from L=16 to L=32 at step 6
        config = load_config(overrides=[
            *SMALL, f"data.tokenizer={tokenizer_path}", "data.stage=olm", f"train.steps={steps}", "train.warmup_steps=0",
            "data.curriculum=[{start_step: 0, text_len: 16, max_chunks: 2}, {start_step: 6, text_len: 32, max_chunks: 2}]"])
        batch = build_pipeline(config, tmp_path / str(steps)).eval_batches()[0]
        text = (batch["modality"] == TEXT) & (batch["chunk_id"] > 0)
        rows = np.broadcast_to(np.arange(len(text))[:, None], text.shape)
        chunks = np.stack([rows, batch["segment_id"], batch["chunk_id"]], -1)[text]  # (row, document, chunk)
        longest[steps] = np.unique(chunks, axis=0, return_counts=True)[1].max()
    assert longest[4] <= 16 + 1 < longest[12] <= 32 + 1, longest  # L tokens, and the first chunk a BOS
