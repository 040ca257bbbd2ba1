"""Fonts travel with the code (bundled, hash-pinned, no host fallback), sketches are the
same bytes everywhere, runs render from their saved renderer config, and missing glyphs
are counted by reason with code points and locations."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import xla_flags
from data_pipelines import fonts
from data_pipelines.png import png_bytes
from data_pipelines.render import (RenderConfig, RenderRejected, SketchRenderer, renderer_for_config,
                                   renderer_from_saved)
from data_pipelines.render_stats import MAX_EXAMPLES, RenderStats, missing_reason
from vist2_jax.config import load_config
from vist2_jax.config.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CJK_FONT = ROOT / "tests" / "data" / "fonts" / "NotoSansMonoCJKsc-subset.otf"
TEXT = "Sketches are the same bytes\non every machine.\tWWW 0123"
# sha256 of `vist2 render` of TEXT at 64 px with the bundled DejaVu Sans Mono. It changes
# only if the font, the layout or Pillow's rasterizer changes: then every sketch changes.
PINNED_PNG_SHA256 = "03e4eba7270d466552a21db0f87a7d321118a2ef58653f9516ec4ac0d991dc0e"

_NO_SYSTEM_FONTS = """
import hashlib, os, sys
hidden = ("/usr/share/fonts", "/usr/local/share/fonts", "/etc/fonts", "/Library/Fonts",
          os.path.expanduser("~/.fonts"), os.path.expanduser("~/.local/share/fonts"))
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)) and os.fsdecode(args[0]).startswith(hidden):
        raise PermissionError("system fonts are hidden: " + os.fsdecode(args[0]))
    if event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn"):
        raise PermissionError("no helper programs (fc-match)")
sys.addaudithook(hook)
try:
    open("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf", "rb")
    sys.exit("the audit hook does not hide system fonts")
except PermissionError:
    pass
sys.path.insert(0, sys.argv[1])
from data_pipelines.png import png_bytes
from data_pipelines.render import RenderConfig, SketchRenderer
image = SketchRenderer(RenderConfig(image_size=64)).render(sys.argv[2])
sys.stdout.write(hashlib.sha256(png_bytes(image)).hexdigest())
"""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _parts(config):
    return config.data, config.model.layout.image_size


def test_bundled_fonts_match_their_pinned_hashes_and_carry_their_licence():
    folder = Path(fonts.__file__).parent / "font_files"
    for family, (name, pinned) in fonts.BUNDLED.items():
        assert _sha((folder / name).read_bytes()) == pinned
        assert fonts.bundled_font(family).sha256 == pinned
    assert "Bitstream Vera" in (folder / "LICENSE-DejaVu.txt").read_text()


def test_a_corrupted_bundled_font_is_refused(monkeypatch):
    monkeypatch.setitem(fonts.BUNDLED, "DejaVu Sans Mono", ("DejaVuSansMono.ttf", "ab" * 32))
    with pytest.raises(fonts.FontError, match="reinstall"):
        SketchRenderer(RenderConfig(image_size=64))


def test_wheel_ships_the_fonts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("vist2_jax", "data_pipelines"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with zipfile.ZipFile(next((tmp_path / "dist").glob("*.whl"))) as wheel:
        for name, pinned in fonts.BUNDLED.values():
            assert _sha(wheel.read(f"data_pipelines/font_files/{name}")) == pinned
        assert "data_pipelines/font_files/LICENSE-DejaVu.txt" in wheel.namelist()


def test_renders_the_same_bytes_without_any_system_font(tmp_path):
    env = {"PATH": "", "HOME": str(tmp_path), "FONTCONFIG_FILE": "/nonexistent", "FONTCONFIG_PATH": "/nonexistent"}
    proc = subprocess.run([sys.executable, "-c", _NO_SYSTEM_FONTS, str(ROOT), TEXT], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    here = _sha(png_bytes(SketchRenderer(RenderConfig(image_size=64)).render(TEXT)))
    assert proc.stdout == here == PINNED_PNG_SHA256


def test_render_cli_png_bytes_are_pinned(tmp_path):
    from vist2_jax.cli.main import main

    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    argv = ["render", "--text-file", str(tmp_path / "t.txt"), "--out", str(tmp_path / "a.png"),
            "model.layout.image_size=64", "model.layout.visual_len=4", "model.layout.text_len=8"]
    assert main(argv) == 0
    data = (tmp_path / "a.png").read_bytes()
    assert _sha(data) == PINNED_PNG_SHA256
    assert b"tIME" not in data and b"tEXt" not in data


def test_png_round_trips_exactly():
    from io import BytesIO

    from PIL import Image

    image = SketchRenderer(RenderConfig(image_size=256)).render("x " * 500)  # 3 stored blocks
    np.testing.assert_array_equal(np.asarray(Image.open(BytesIO(png_bytes(image)))), image)
    gray = image[:40, :30, 0]
    np.testing.assert_array_equal(np.asarray(Image.open(BytesIO(png_bytes(gray)))), gray)
    with pytest.raises(ValueError, match="uint8"):
        png_bytes(image.astype(np.float32))


def test_renderer_from_saved_reproduces_the_run(caplog):
    r = SketchRenderer(RenderConfig(image_size=128, font_sizes=(9, 8), line_spacing=1, margin=3))
    saved = json.loads(json.dumps(r.renderer_config()))
    again = renderer_from_saved(saved)
    assert again.renderer_config() == saved
    np.testing.assert_array_equal(again.render(TEXT), r.render(TEXT))
    legacy = dict(saved, font_family="", font_file="/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf")
    assert renderer_from_saved(legacy).source.file == "bundled:DejaVuSansMono.ttf"  # matched by hash
    assert not caplog.records
    renderer_from_saved(dict(saved, pillow="9.0.0"))
    assert "Pillow 9.0.0 / FreeType" in caplog.text


def test_renderer_from_saved_refuses_another_font(tmp_path):
    saved = SketchRenderer(RenderConfig(image_size=64)).renderer_config()
    with pytest.raises(fonts.FontError, match="was recorded") as err:
        renderer_from_saved(dict(saved, font_sha256="0" * 64))
    assert "\n" not in str(err.value) and "0" * 64 in str(err.value)
    with pytest.raises(fonts.FontError, match="lacks 'image_size'"):
        renderer_from_saved({k: v for k, v in saved.items() if k != "image_size"})


def test_configured_cjk_font_is_hashed_recorded_and_verified(tmp_path):
    font = tmp_path / "cjk.otf"
    shutil.copy(CJK_FONT, font)
    r = SketchRenderer(RenderConfig(image_size=64, font_path=str(font)))
    image = r.render("日本語 ok", where="doc:1")
    assert r.stats.missing_glyphs == 0 and (image < 128).any()
    saved = r.renderer_config()
    assert saved["font_family"] == "" and saved["font_sha256"] == _sha(CJK_FONT.read_bytes())
    moved = tmp_path / "elsewhere.otf"
    font.rename(moved)
    with pytest.raises(fonts.FontError, match="cjk.otf"):
        renderer_from_saved(saved)
    np.testing.assert_array_equal(renderer_from_saved(saved, str(moved)).render("日本語 ok"), image)
    moved.write_bytes(moved.read_bytes() + b"\0")
    with pytest.raises(fonts.FontError, match="was recorded"):
        renderer_from_saved(saved, str(moved))


def test_font_keys_are_validated_with_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.font_family: must be a bundled family"):
        load_config(overrides=["data.font_family=Arial"])
    with pytest.raises(ConfigError, match=r"^data\.font_sha256: "):
        load_config(overrides=["data.font_sha256=xyz"])
    with pytest.raises(ConfigError, match=r"^data\.font_path: font file .*nope\.ttf"):
        renderer_for_config(*_parts(load_config(overrides=[f"data.font_path={tmp_path / 'nope.ttf'}"])))
    with pytest.raises(ConfigError, match=r"^data\.font_sha256: .* was recorded"):
        renderer_for_config(*_parts(load_config(overrides=[f"data.font_path={CJK_FONT}", "data.font_sha256=" + "a" * 64])))
    pinned = load_config(overrides=[f"data.font_path={CJK_FONT}", "data.font_sha256=" + _sha(CJK_FONT.read_bytes()),
                                    "data.font_family=DejaVu Sans"])
    assert renderer_for_config(*_parts(pinned)).source.sha256 == pinned.data.font_sha256
    sans = renderer_for_config(*_parts(load_config(overrides=["data.font_family=DejaVu Sans"])))
    assert sans.renderer_config()["font_family"] == "DejaVu Sans"


def test_missing_glyphs_counted_by_reason_with_code_points_and_places():
    r = SketchRenderer(RenderConfig(image_size=128))
    r.render("日本 שלום 😀 bell\x07", where="a.jsonl:3")
    r.render("日日", where="b.jsonl:9")
    by = r.stats.as_dict()["missing_glyphs_by_reason"]
    assert by["cjk"] == {"count": 4, "chars": {"U+65E5": 3, "U+672C": 1}, "where": ["a.jsonl:3", "b.jsonl:9"]}
    assert by["hebrew"]["count"] == 4 and by["emoji"]["chars"] == {"U+1F600": 1}
    assert by["control"] == {"count": 1, "chars": {"U+0007": 1}, "where": ["a.jsonl:3"]}
    assert r.counters["missing_glyphs"] == r.stats.missing_glyphs == 10
    summary = r.stats.missing_summary()
    assert "cjk 4 (U+65E5 '日' x3, U+672C '本' x1) at a.jsonl:3, b.jsonl:9" in summary and "\n" not in summary
    assert r.stats.scalars()["render/missing_glyphs/cjk"] == 4
    assert [missing_reason(c) for c in (0x0645, 0xAC00, 0x1F600, 0x7F, 0xE9)] == ["arabic", "cjk", "emoji",
                                                                               "control", "other"]
    strict = SketchRenderer(RenderConfig(image_size=128, missing_glyphs="reject"))
    with pytest.raises(RenderRejected, match=r"U\+65E5 '日'"):
        strict.render("日", where="c:1")
    assert strict.stats.rejected_missing_glyphs == 1 and strict.stats.missing["cjk"].where == ["c:1"]


def test_render_stats_merge_and_round_trip():
    a, b = SketchRenderer(RenderConfig(image_size=64)), SketchRenderer(RenderConfig(image_size=64))
    a.render("日 x", where="a")
    b.render("".join(chr(0x4E00 + i) for i in range(2 * MAX_EXAMPLES)), where="b")
    b.try_render("word " * 500)
    total = RenderStats().merge(a.stats).merge(json.loads(json.dumps(b.stats.as_dict())))
    assert total.rendered == 2 and total.rejected_no_fit == 1 and total.by_size[10] == 2
    cjk = total.missing["cjk"]
    assert cjk.count == 1 + 2 * MAX_EXAMPLES and len(cjk.chars) == MAX_EXAMPLES and cjk.where == ["a", "b"]
    assert RenderStats.from_dict(total.as_dict()) == total


def test_generate_renders_from_the_saved_config_and_refuses_another_font(tmp_path, monkeypatch):
    from vist2_jax.checkpointing import runs
    from vist2_jax.checkpointing.checkpoints import RunCheckpoints
    from vist2_jax.cli.errors import UsageError
    from vist2_jax.cli.generate import load_checkpoint

    saved = SketchRenderer(RenderConfig(image_size=64, font_sizes=(8,))).renderer_config()
    state = {"params": {"w": np.zeros(2, np.float32)}, "opt_state": {"m": np.zeros(2, np.float32)}}
    run = tmp_path / "run"
    store = RunCheckpoints(run, keep=3, async_save=False)
    store.save(1, state, None, {}, {}, saved)
    store.save(2, state, None, {}, {}, dict(saved, font_sha256="f" * 64))
    store.close()
    (run / "config.yaml").write_text("{}\n")
    step = {"value": 1}

    def load_run(path):  # the real run loading, minus the model: only the renderer config matters here
        store = RunCheckpoints(path, keep=3, async_save=False)
        try:
            renderer = store.read_json(step["value"], "renderer")
        finally:
            store.close()
        return runs.LoadedRun(Path(path), step["value"], SimpleNamespace(model="model"), {}, None, renderer)

    monkeypatch.setattr(runs, "load_run", load_run)
    _, _, renderer, _ = load_checkpoint(str(run), "tiny", [])
    assert renderer.renderer_config() == saved
    step["value"] = 2
    with pytest.raises(UsageError, match="step 2: font bundled:DejaVuSansMono.ttf has sha256") as err:
        load_checkpoint(str(run), "tiny", [])
    assert "\n" not in str(err.value)



def test_data_preview_names_the_missing_characters_and_their_records(tmp_path, sp_tokenizer, capsys):
    from vist2_jax.cli.main import main

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "mixed.txt").write_text("Plain words, then 日本語 and שלום in the middle. " * 40)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: {stage: olm, seq_len: 256, global_batch_size: 2, images_per_row: 4}\n"
                      "train: {steps: 2, warmup_steps: 1}\n")
    assert main(["data", "preview", str(recipe), f"data.tokenizer={sp_tokenizer.path}",
                 f"data.source={tmp_path / 'docs'}", "--batches", "1", "--out", str(tmp_path / "out")]) == 0
    renderer = json.loads((tmp_path / "out" / "counters.json").read_text())["renderer"]
    cjk = renderer["missing_glyphs_by_reason"]["cjk"]
    assert set(cjk["chars"]) == {"U+65E5", "U+672C", "U+8A9E"} and "mixed.txt" in cjk["where"][0]
    assert "missing glyphs: cjk" in capsys.readouterr().out


def test_a_bad_font_fails_when_the_pipeline_is_built(tmp_path, sp_tokenizer):
    from data_pipelines.pipeline import build_pipeline

    config = load_config(overrides=[f"data.tokenizer={sp_tokenizer.path}", f"data.font_path={CJK_FONT}",
                                    "data.font_sha256=" + "b" * 64])
    with pytest.raises(ConfigError, match=r"^data\.font_sha256: font .*NotoSansMonoCJKsc-subset\.otf has sha256"):
        build_pipeline(config, tmp_path)


def test_row_maker_sums_its_threads_renderers(tmp_path, sp_tokenizer):
    import pickle
    import threading

    from data_pipelines.pipeline import build_pipeline

    maker = build_pipeline(load_config(overrides=[f"data.tokenizer={sp_tokenizer.path}", "data.seq_len=256"]),
                           tmp_path).row_maker
    thread = threading.Thread(target=lambda: maker.renderer.render("日", where="thread"))
    thread.start()
    thread.join()
    maker.renderer.render("本 and text", where="main")
    stats = maker.render_stats()
    assert stats.rendered == 2 and sorted(stats.missing["cjk"].where) == ["main", "thread"]
    assert stats.missing_glyphs == 2 and pickle.loads(pickle.dumps(maker)).render_stats().rendered == 0



@pytest.mark.slow
def test_trained_run_records_the_font_and_generate_refuses_a_tampered_hash(tmp_path, sp_tokenizer):
    from vist2_jax.checkpointing.runs import load_run

    pinned, run = fonts.BUNDLED["DejaVu Sans Mono"][1], tmp_path / "run"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
    (tmp_path / "recipe.yaml").write_text("preset: tiny\n")
    (tmp_path / "prompt.txt").write_text("The built-in functions are listed here. " * 4)
    vist2 = [sys.executable, "-m", "vist2_jax.cli.main"]
    trained = subprocess.run([*vist2, "train", str(tmp_path / "recipe.yaml"), "model.decoder.num_layers=1",
                              "model.vision.num_layers=1", "data.seq_len=256", "data.global_batch_size=2",
                              "data.images_per_row=4", "data.eval_rows=2", "train.steps=2", "train.warmup_steps=1",
                              "train.checkpoint_every=2", "train.eval_every=2", "train.eval_batches=1",
                              "run.progress=false", f"data.tokenizer={sp_tokenizer.path}", f"run.workdir={run}"],
                             env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert load_run(run).sketch_renderer().renderer_config()["font_sha256"] == pinned
    (saved,) = [p for p in (run / "checkpoints" / "2" / "renderer").rglob("*")
                if p.is_file() and pinned in p.read_text(errors="ignore")]
    saved.write_text(saved.read_text().replace(pinned, "c" * 64))
    # re-sign the changed renderer config, or the checkpoint's checksum refuses it as damaged first
    from vist2_jax.checkpointing.checkpoints import json_checksum

    sums = run / "checkpoints" / "2" / "checksums" / "metadata"
    record = json.loads(sums.read_text())
    record["checksums"]["renderer"] = json_checksum(json.loads(saved.read_text()))
    sums.write_text(json.dumps(record))
    generated = subprocess.run([*vist2, "generate", "--checkpoint", str(run), "--prompt-file",
                                str(tmp_path / "prompt.txt"), "--max-new-tokens", "2"],
                               env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    last = generated.stderr.strip().splitlines()[-1]
    assert generated.returncode != 0 and "c" * 64 + " was recorded" in last, generated.stderr[-2000:]
