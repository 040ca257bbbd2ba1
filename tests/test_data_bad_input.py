"""Bad input never drops silently: each kind is skipped, counted and logged with its
location (``data.bad_input=skip``) or stops the run with a message naming it (``fail``)."""

import io
import re
import logging

import numpy as np
import pytest
from PIL import Image

from data_pipelines.images import fit_image
from data_pipelines.pipeline import build_pipeline, resolve_tokenizer
from vist2_jax.row_contract import validate_batch
from data_pipelines.sources import load_samples
from data_pipelines.records import BadInput
from vist2_jax.config import load_config

SMALL = ["model.decoder.num_layers=2", "model.vision.num_layers=2", "data.seq_len=256",
         "data.global_batch_size=2", "data.images_per_row=4", "train.steps=2", "train.warmup_steps=1"]
GOOD = "The quick brown fox jumps over the lazy dog. " * 8

# name -> (file name, bytes): each case is one bad record placed BEFORE a good file, so a
# source that stopped at the first bad record would lose the good one.
TEXT_CASES = {
    "empty document": ("a.txt", b"  \n\t "),
    "invalid utf-8": ("a.txt", b"caf\xe9 au lait"),
    "control characters": ("a.txt", b"bell \x07 in the text"),
    "malformed jsonl": ("a.jsonl", b'{"text": "ok"}\n{text: nope}\n'),
    "truncated jsonl": ("a.jsonl", b'{"text": "ok"}\n{"text": "cut off'),
    "missing fields": ("a.jsonl", b'{"text": "ok"}\n{"title": "no text"}\n'),
}
EXPECTED = {"empty document": "empty text", "invalid utf-8": "not valid UTF-8",
            "control characters": "control character U+0007", "malformed jsonl": "malformed",
            "truncated jsonl": "malformed or truncated", "missing fields": "neither 'text'"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return resolve_tokenizer(load_config(), tmp_path_factory.mktemp("tok"))


def png(size=(40, 20), color=(200, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_bad_text_records_are_skipped_and_counted_or_fail(case, tmp_path, tokenizer, caplog):
    name, data = TEXT_CASES[case]
    (tmp_path / name).write_bytes(data)
    (tmp_path / "b.txt").write_text(GOOD, encoding="utf-8")
    bad_location = f"{tmp_path / name}" + (":2" if name.endswith(".jsonl") else "")
    with caplog.at_level(logging.WARNING):
        samples, counters = load_samples(str(tmp_path), tokenizer, "olm", "skip")
    assert counters["skipped"] == 1, counters
    assert any(EXPECTED[case] in key for key in counters if key.startswith("skipped:")), counters
    assert any(s.location == str(tmp_path / "b.txt") for s in samples)  # the source went on
    assert bad_location in caplog.text and EXPECTED[case] in caplog.text
    with pytest.raises(BadInput, match=re.escape(EXPECTED[case])) as err:
        load_samples(str(tmp_path), tokenizer, "olm", "fail")
    assert bad_location in str(err.value)


def _pipeline(tmp_path, tokenizer, source, *extra, bad="skip", stage="olm"):
    config = load_config(overrides=[*SMALL, f"data.source={source}", f"data.stage={stage}",
                                    f"data.tokenizer={tokenizer.path}", f"data.bad_input={bad}", *extra])
    return build_pipeline(config, tmp_path / "work")


def test_word_longer_than_a_line_is_hard_broken_not_dropped(tmp_path, tokenizer):
    rng = np.random.default_rng(0)
    word = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 300))  # ~5 lines at 128 px
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "long_word.txt").write_text(f"{word} {word}", encoding="utf-8")
    pipeline = _pipeline(tmp_path, tokenizer, tmp_path / "docs")
    batch = next(iter(pipeline.train_dataset()))
    validate_batch(batch, pipeline.config.model.layout.visual_len)
    assert batch["image_mask"].any() and pipeline.row_maker.counters["skipped_render"] == 0


def test_chunks_too_large_for_the_sketch_close_early(tmp_path, tokenizer):
    """The chunk rule: at 40 px no chunk of 64 tokens fits a 128 px sketch, so chunks close
    before the first token that does not fit; every token still lands in the row."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "doc.txt").write_text(GOOD * 4, encoding="utf-8")
    pipeline = _pipeline(tmp_path, tokenizer, tmp_path / "docs", "data.font_sizes=[40]")
    row = pipeline.row_maker(0)
    counters = pipeline.row_maker.counters
    assert counters["closed_early"] > 0 and counters["skipped_render"] == 0
    text = row["modality"] == 1
    spans = np.split(row["chunk_id"][text], np.flatnonzero(np.diff(row["chunk_id"][text])) + 1)
    assert max(len(span) for span in spans[:-1]) < 1 + pipeline.config.model.layout.text_len


def test_unrenderable_chunk_is_counted_or_stops(tmp_path, tokenizer, caplog):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "doc.txt").write_text(GOOD * 4, encoding="utf-8")
    huge_font = "data.font_sizes=[200]"  # not even one character fits a 128 px sketch
    pipeline = _pipeline(tmp_path, tokenizer, tmp_path / "docs", huge_font)
    with caplog.at_level(logging.WARNING):
        pipeline.row_maker(0)
    assert pipeline.row_maker.counters["skipped_render"] > 0
    assert f"{tmp_path / 'docs' / 'doc.txt'}: chunk cannot be rendered" in caplog.text.replace("skipping ", "")
    strict = _pipeline(tmp_path, tokenizer, tmp_path / "docs", huge_font, bad="fail")
    with pytest.raises(BadInput, match="doc.txt: chunk cannot be rendered"):
        strict.row_maker(0)


def test_document_far_longer_than_a_row_is_windowed(tmp_path, tokenizer):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "book.txt").write_text(GOOD * 400, encoding="utf-8")  # ~100x a row
    pipeline = _pipeline(tmp_path, tokenizer, tmp_path / "docs")
    batch = next(iter(pipeline.train_dataset()))
    validate_batch(batch, pipeline.config.model.layout.visual_len)
    assert (batch["loss_mask"].sum(axis=1) > 100).all()
    assert pipeline.row_maker.counters["skipped_render"] == 0


def test_fit_image_keeps_aspect_and_pads():
    image = fit_image(png((40, 20)), 64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert (image[32, 32] == (200, 0, 0)).all() and (image[2, 32] == 255).all()  # padded top band


def _caption_folder(folder, *, good=True):
    folder.mkdir()
    if good:
        (folder / "good.png").write_bytes(png())
        (folder / "good.txt").write_text("a red rectangle", encoding="utf-8")
    (folder / "garbage.jpg").write_bytes(b"not a jpeg at all")
    (folder / "garbage.txt").write_text("never seen", encoding="utf-8")
    (folder / "truncated.png").write_bytes(png((64, 64))[:60])
    (folder / "truncated.txt").write_text("cut short", encoding="utf-8")
    (folder / "orphan.png").write_bytes(png())  # no caption beside it


def test_undecodable_images_are_skipped_and_counted_or_stop(tmp_path, tokenizer, caplog):
    _caption_folder(tmp_path / "caps")
    pipeline = _pipeline(tmp_path, tokenizer, tmp_path / "caps", stage="caption")
    assert pipeline.source_counters["skipped"] == 1  # orphan.png, found while listing
    with caplog.at_level(logging.WARNING):
        rows = [pipeline.row_maker(i) for i in range(4)]
    counters = pipeline.row_maker.counters
    assert counters["skipped_image"] > 0 and counters["documents"] > 0
    assert "garbage.jpg" in caplog.text and "truncated.png" in caplog.text and "orphan.png" in caplog.text
    assert "does not decode" in caplog.text
    assert all(r["image_mask"].any() for r in rows)
    _caption_folder(tmp_path / "bad_only", good=False)
    (tmp_path / "bad_only" / "orphan.png").unlink()
    strict = _pipeline(tmp_path, tokenizer, tmp_path / "bad_only", stage="caption", bad="fail")
    with pytest.raises(BadInput, match=r"(garbage\.jpg|truncated\.png).*image does not decode"):
        strict.row_maker(0)


def test_captions_jsonl_with_missing_file_and_fields(tmp_path, tokenizer, caplog):
    folder = tmp_path / "caps"
    folder.mkdir()
    (folder / "img.png").write_bytes(png())
    (folder / "captions.jsonl").write_text(
        '{"file": "img.png", "caption": "a red box"}\n{"file": "gone.png", "caption": "x"}\n'
        '{"file": "img.png"}\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        samples, counters = load_samples(str(folder), tokenizer, "caption", "skip")
    assert len(samples) == 1 and counters["skipped"] == 2
    assert "captions.jsonl:2" in caplog.text and "captions.jsonl:3" in caplog.text
    with pytest.raises(BadInput, match="gone.png does not exist"):
        load_samples(str(folder), tokenizer, "caption", "fail")


def test_source_of_only_bad_records_stops_with_the_key(tmp_path, tokenizer):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_bytes(b"")
    with pytest.raises(BadInput, match="yielded no usable records"):
        _pipeline(tmp_path, tokenizer, tmp_path / "docs")
