"""The sketch renderer: fixed shapes, faithful layout (nothing dropped), the glyph atlas
matching Pillow pixel for pixel, counted fallbacks, and the render / bench-data commands."""

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipelines import fonts
from data_pipelines.corpus import embedded_documents
from data_pipelines.render import RenderConfig, RenderRejected, SketchRenderer, _wrap, _wrap_cols


@pytest.fixture(scope="module")
def renderer():
    return SketchRenderer(RenderConfig(image_size=256))


@pytest.fixture(scope="module")
def corpus_chunks():
    text = "\n".join(embedded_documents())
    return [text[i:i + 1024] for i in range(0, 40 * 1024, 1024)]


def _visible(text):
    return "".join(text.split())


def test_shape_dtype_and_empty_text(renderer):
    blank = renderer.render("")
    assert blank.shape == (256, 256, 3) and blank.dtype == np.uint8
    assert (blank == 255).all()
    small = SketchRenderer(RenderConfig(image_size=64)).render("hi")
    assert small.shape == (64, 64, 3) and (small < 128).any()


def test_renderer_config_records_the_font_hash(renderer):
    meta = renderer.renderer_config()
    assert meta["font_file"] == "bundled:DejaVuSansMono.ttf" and meta["font_family"] == "DejaVu Sans Mono"
    data = (Path(fonts.__file__).parent / "font_files" / "DejaVuSansMono.ttf").read_bytes()
    assert meta["font_sha256"] == hashlib.sha256(data).hexdigest() == fonts.BUNDLED["DejaVu Sans Mono"][1]
    assert meta["monospace"] and meta["image_size"] == 256


def test_no_fallback_font(tmp_path):
    with pytest.raises(fonts.FontError, match="font file .*missing.ttf") as err:
        SketchRenderer(RenderConfig(image_size=128, font_path=str(tmp_path / "missing.ttf")))
    assert "\n" not in str(err.value)
    with pytest.raises(fonts.FontError, match="'Arial' is not bundled"):
        SketchRenderer(RenderConfig(image_size=128, font_family="Arial"))
    (tmp_path / "notes.ttf").write_text("not a font")
    with pytest.raises(fonts.FontError, match="notes.ttf is not a TrueType"):
        SketchRenderer(RenderConfig(image_size=128, font_path=str(tmp_path / "notes.ttf")))
    with pytest.raises(fonts.FontError, match="has 1 face"):
        fonts.font_file(str(Path(fonts.__file__).parent / "font_files" / "DejaVuSans.ttf"), index=1)


@pytest.mark.parametrize("method", ["atlas", "pillow"])
def test_layout_never_drops_text(renderer, corpus_chunks, method):
    for chunk in corpus_chunks[:10]:
        try:
            size, lines, grid = renderer.layout(chunk)
        except RenderRejected:
            continue
        assert grid and len(lines) <= size.max_rows
        assert all(len(line) <= size.cols for line in lines)
        assert _visible("".join(lines)) == _visible(chunk)
        assert renderer.render(chunk, method=method).shape == (256, 256, 3)


def test_atlas_matches_pillow_exactly(corpus_chunks):
    # 10px DejaVu Sans Mono has glyphs (W, w, R) that spill into the next cell: the
    # multi-pass path must merge them exactly as Pillow does.
    for sizes in [(10, 9, 8, 7), (10,)]:
        r = SketchRenderer(RenderConfig(image_size=256, font_sizes=sizes))
        texts = corpus_chunks[:12] if len(sizes) > 1 else [c[:600] for c in corpus_chunks[:4]]
        texts += ["WWWwwwRRR Www ___ |||", "Tabs\tand\nnew\nlines", "Ünïcödé “quotes” — ✓"]
        compared = 0
        for text in texts:
            try:
                atlas, pillow = r.render(text, "atlas"), r.render(text, "pillow")
            except RenderRejected:
                continue
            np.testing.assert_array_equal(atlas, pillow)
            compared += 1
        assert compared >= 3 and r.counters["atlas_fallbacks"] == 0


def test_atlas_with_overlapping_lines_matches_pillow(corpus_chunks):
    # Negative line spacing makes lines overlap: the atlas composites rows in two passes.
    r = SketchRenderer(RenderConfig(image_size=256, line_spacing=-3))
    for chunk in corpus_chunks[:4]:
        atlas, pillow = r.render(chunk, "atlas"), r.render(chunk, "pillow")
        assert np.abs(atlas.astype(int) - pillow).max() <= 2
    assert max(s._atlas.ky for s in r.sizes if s._atlas) == 2


def test_tokenized_chunks_render(sp_tokenizer, renderer):
    ids = sp_tokenizer.encode("\n".join(embedded_documents()[10:14]))
    chunks = [sp_tokenizer.decode(ids[i:i + 256]) for i in range(0, 256 * 6, 256)]
    for chunk in chunks:
        image = renderer.try_render(chunk)
        if image is not None:
            np.testing.assert_array_equal(image, renderer.render(chunk, "pillow"))


def test_atlas_is_much_faster_than_pillow(corpus_chunks):
    r = SketchRenderer(RenderConfig(image_size=256))
    chunks = [c for c in corpus_chunks[:20] if r.try_render(c) is not None]
    timings = {}
    for method in ("atlas", "pillow"):
        start = time.perf_counter()
        for chunk in chunks:
            r.render(chunk, method)
        timings[method] = time.perf_counter() - start
    assert timings["pillow"] > 2 * timings["atlas"], timings


def test_tabs_and_newlines(renderer):
    np.testing.assert_array_equal(renderer.render("a\tb"), renderer.render("a   b"))
    np.testing.assert_array_equal(renderer.render("one\r\ntwo"), renderer.render("one\ntwo"))
    _, lines, _ = renderer.layout("one\n\nthree")
    assert lines == ["one", "", "three"]


def test_control_characters_are_counted_and_replaced():
    r = SketchRenderer(RenderConfig(image_size=128))
    image = r.render("bell\x07 nul\x00")
    assert r.counters["missing_glyphs"] == 2
    np.testing.assert_array_equal(image, r.render(f"bell{r.replacement} nul{r.replacement}"))
    strict = SketchRenderer(RenderConfig(image_size=128, missing_glyphs="reject"))
    with pytest.raises(RenderRejected, match="missing"):
        strict.render("esc\x1b")
    assert strict.counters["rejected"] == 1 and strict.counters["rendered"] == 0


def test_missing_glyphs_are_never_boxes():
    r = SketchRenderer(RenderConfig(image_size=128))
    assert not r.covered[ord("日")]  # DejaVu Sans Mono has no CJK
    image = r.render("日本 text")
    assert r.counters["missing_glyphs"] == 2
    np.testing.assert_array_equal(image, r.render(r.replacement * 2 + " text"))
    strict = SketchRenderer(RenderConfig(image_size=128, missing_glyphs="reject"))
    assert strict.try_render("日本") is None and strict.counters["rejected"] == 1


def test_word_longer_than_a_line_is_hard_broken(renderer):
    word = "x" * 300 + "END"
    size, lines, _ = renderer.layout("start " + word + " tail")
    assert lines[0] == "start"
    assert all(len(line) <= size.cols for line in lines)
    assert "".join(lines[1:]).replace(" ", "") == word + "tail"
    assert renderer.render(word).shape == (256, 256, 3)


def test_wrap_rules():
    assert _wrap_cols("aaaa bbbb", 4) == ["aaaa", "bbbb"]
    assert _wrap_cols("aaaa   ", 4) == ["aaaa"]
    assert _wrap_cols("  indented words here", 10) == ["  indented", "words here"]
    assert _wrap_cols("abcdefghij", 4) == ["abcd", "efgh", "ij"]
    assert _wrap_cols("", 4) == [""]
    width = len
    split = lambda w: (w[:4], w[4:])  # noqa: E731
    assert _wrap("aaaa bbbb cc", 4, width, split) == ["aaaa", "bbbb", "cc"]
    assert _wrap("abcdefghij", 4, width, split) == ["abcd", "efgh", "ij"]


def test_smaller_bucket_then_reject():
    r = SketchRenderer(RenderConfig(image_size=128))
    r.render("short")
    assert r.counters["smaller_bucket"] == 0
    r.render("word " * 40)  # 10 lines of 20 columns at 10px > 9 rows; fits at 9px
    assert r.counters["smaller_bucket"] == 1 and r.by_size[9] == 1
    with pytest.raises(RenderRejected, match="do not fit"):
        r.render("word " * 2000)
    assert r.counters == {"rendered": 2, "smaller_bucket": 1, "rejected": 1, "missing_glyphs": 0,
                          "atlas_fallbacks": 0}


def test_proportional_font_uses_pillow():
    r = SketchRenderer(RenderConfig(image_size=128, font_family="DejaVu Sans"))
    assert r.renderer_config()["font_sha256"] == fonts.BUNDLED["DejaVu Sans"][1]
    size, lines, grid = r.layout("The proportional font wraps by pixel width " * 3)
    assert not grid and all(r.sizes[0].font.getlength(line) <= size.max_width for line in lines)
    assert r.render("The proportional font").shape == (128, 128, 3)


def test_tile_layout_puts_each_character_by_its_position_in_the_chunk(corpus_chunks):
    """With ``tile``, character i of the (whitespace-joined) chunk is drawn in tile
    i // (cols * rows), row-major, so where it lands depends on its position alone; the
    glyph map follows the same boxes; atlas and Pillow agree; the saved config rebuilds it."""
    from data_pipelines.render import renderer_from_saved
    from vist2_jax.row_contract import GLYPH_BLANK, glyph_class

    r = SketchRenderer(RenderConfig(image_size=128, tile=32))
    text = "abcdefghij" * 3 + "\nXYZ"
    size, lines, grid = r.layout(text)
    per_tile = size.cols * size.max_rows
    assert grid and "".join(lines) == text.replace("\n", " ")
    image, glyphs = r.render(text), r.glyph_map(text, 4)
    ink = image[..., 0] < 128
    tiles_with_ink = [bool(ink[y:y + 32, x:x + 32].any()) for y in range(0, 128, 32) for x in range(0, 128, 32)]
    assert tiles_with_ink == [i < -(-len(text) // per_tile) for i in range(16)]
    for i, ch in enumerate(text.replace("\n", " ")):
        if ch == " ":
            continue
        top, left = divmod(i // per_tile, 4)
        assert (glyphs[top * 8:(top + 1) * 8, left * 8:(left + 1) * 8] == glyph_class(ch)).any(), (i, ch)
    assert (glyphs[24:, :] == GLYPH_BLANK).all()  # the last row of tiles holds nothing
    np.testing.assert_array_equal(r.render(text, method="pillow"), image)
    for chunk in corpus_chunks[:3]:
        try:
            np.testing.assert_array_equal(r.render(chunk[:150], method="pillow"), r.render(chunk[:150]))
        except RenderRejected:
            pass
    again = renderer_from_saved(r.renderer_config())
    assert again.config.tile == 32 and np.array_equal(again.render(text), image)
    with pytest.raises(RenderRejected, match="tiles"):
        r.render("x" * 16 * 64)
    with pytest.raises(ValueError, match="must divide"):
        RenderConfig(image_size=128, tile=48)
    with pytest.raises(fonts.FontError, match="monospace"):
        SketchRenderer(RenderConfig(image_size=128, tile=32, font_family="DejaVu Sans"))


def _parser():
    from vist2_jax.cli.main import build_parser

    return build_parser()


def test_render_cli_writes_png(tmp_path, capsys):
    text = tmp_path / "chunk.txt"
    text.write_text("Rendered by the CLI.\n\tIndented line.", encoding="utf-8")
    out = tmp_path / "sketch.png"
    args = _parser().parse_args(["render", "--text-file", str(text), "--out", str(out),
                                 "model.layout.image_size=64", "model.layout.visual_len=4",
                                 "model.layout.text_len=8"])
    assert args.func(args) == 0
    image = np.asarray(Image.open(out))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert "64x64x3" in capsys.readouterr().out


def test_render_cli_draws_token_aligned_tiles_with_the_tokenizer(tmp_path, sp_tokenizer):
    from vist2_jax.cli.errors import UsageError

    text = tmp_path / "chunk.txt"
    text.write_text("Four per tile.", encoding="utf-8")  # at most 4 tiles x 4 tokens
    tiles = ["model.layout.image_size=64", "model.layout.visual_len=4", "model.layout.text_len=8",
             "data.sketch_tile=32", "data.sketch_tile_tokens=4"]
    args = _parser().parse_args(["render", "--text-file", str(text), "--out", str(tmp_path / "x.png"), *tiles])
    with pytest.raises(UsageError, match="data.tokenizer"):
        args.func(args)
    args = _parser().parse_args(["render", "--text-file", str(text), "--out", str(tmp_path / "x.png"), *tiles,
                                 f"data.tokenizer={sp_tokenizer.path}"])
    assert args.func(args) == 0
    ink = (np.asarray(Image.open(tmp_path / "x.png"))[..., 0] < 128).reshape(2, 32, 2, 32).any(axis=(1, 3))
    groups = -(-len(sp_tokenizer.encode(text.read_text())) // 4)
    assert ink.reshape(-1)[:groups].all() and not ink.reshape(-1)[groups:].any()


def test_render_cli_errors(tmp_path):
    from vist2_jax.cli.errors import UsageError

    big = tmp_path / "big.txt"
    big.write_text("word " * 3000)
    for argv in (["--text-file", str(tmp_path / "missing.txt")], ["--text-file", str(big)]):
        args = _parser().parse_args(["render", *argv, "--out", str(tmp_path / "x.png")])
        with pytest.raises(UsageError):
            args.func(args)


def test_bench_data_cli(tmp_path):
    out = tmp_path / "bench.json"
    args = _parser().parse_args(["bench", "data", "--chunks", "4", "--repeats", "1", "--json", str(out)])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert result["atlas"]["images_per_s_median"] > 0 and result["pillow"]["images_per_s_median"] > 0
    assert result["renderer_config"]["font_sha256"]
