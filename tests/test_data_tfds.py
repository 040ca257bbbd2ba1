"""TFDS builders write ArrayRecord with no TensorFlow installed and ``data.source=tfds:NAME``
reads them through ``tfds.data_source``; manual_dir builders say where their files go."""

import importlib.util
import io
import json

import pytest
from PIL import Image

from data_pipelines.pipeline import build_pipeline, resolve_tokenizer
from vist2_jax.row_contract import validate_batch
from data_pipelines.sources import load_samples
from data_pipelines.records import BadInput
from data_pipelines.tfds_builders import BUILDERS
from vist2_jax.config import load_config

SMALL = ["model.decoder.num_layers=2", "model.vision.num_layers=2", "data.seq_len=256",
         "data.global_batch_size=2", "data.images_per_row=4", "train.steps=2", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return resolve_tokenizer(load_config(), tmp_path_factory.mktemp("tok"))


def test_text_folder_builder_matches_the_folder_source(tmp_path, tokenizer):
    assert importlib.util.find_spec("tensorflow") is None  # the point: no TensorFlow
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("First document, plain text.", encoding="utf-8")
    (folder / "b.jsonl").write_text('{"text": "second"}\n{"broken\n{"prompt": "q", "response": "r"}\n')
    direct, direct_counts = load_samples(str(folder), tokenizer, "olm", "skip")
    via, via_counts = load_samples("tfds:text_folder", tokenizer, "olm", "skip",
                                   str(tmp_path / "tfds"), str(folder))
    assert sorted(s.location for s in direct) == sorted(s.location.split(" ", 1)[1] for s in via)
    assert sorted(s.tokens.tolist() for s in direct) == sorted(s.tokens.tolist() for s in via)
    assert via_counts["skipped"] == direct_counts["skipped"] == 1  # bad records stored, counted on read
    assert list((tmp_path / "tfds").rglob("*.array_record-*"))
    with pytest.raises(BadInput, match="b.jsonl:2"):  # the policy applies on read
        load_samples("tfds:text_folder", tokenizer, "olm", "fail", str(tmp_path / "tfds"), str(folder))


@pytest.mark.parametrize("name", ["gutenberg", "arxiv", "wudao", "narrativexl", "coco_captions"])
def test_manual_builders_say_where_files_go(name, tmp_path, tokenizer):
    manual = tmp_path / "manual"
    manual.mkdir()
    (manual / "unrelated.bin").write_bytes(b"x")
    with pytest.raises(BadInput) as err:
        load_samples(f"tfds:{name}", tokenizer, "olm", "skip", str(tmp_path / "tfds"), str(manual))
    message = str(err.value)
    assert str(manual) in message and BUILDERS[name].PATTERNS[0] in message and "data.manual_dir" in message
    with pytest.raises(BadInput, match=str(tmp_path / "tfds" / "manual" / name)):  # the default place
        load_samples(f"tfds:{name}", tokenizer, "olm", "skip", str(tmp_path / "tfds"), "")


def test_wudao_builder_reads_title_and_content(tmp_path, tokenizer):
    manual = tmp_path / "wudao"
    manual.mkdir()
    items = [{"title": "标题", "content": "这是一段中文文本。"}, {"title": "no content"}]
    (manual / "part-0.json").write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    samples, counters = load_samples("tfds:wudao", tokenizer, "olm", "skip", str(tmp_path / "tfds"), str(manual))
    assert len(samples) == 1 and counters["skipped"] == 1
    assert tokenizer.decode(samples[0].tokens.tolist()) == "标题\n这是一段中文文本。"


def test_coco_captions_builder_feeds_stage_one(tmp_path, tokenizer):
    manual = tmp_path / "coco"
    (manual / "annotations").mkdir(parents=True)
    (manual / "val2017").mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (0, 90, 200)).save(buffer, "JPEG")
    (manual / "val2017" / "000001.jpg").write_bytes(buffer.getvalue())
    (manual / "annotations" / "captions_val2017.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "000001.jpg"}, {"id": 2, "file_name": "missing.jpg"}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "A blue\nbox."},
                        {"id": 11, "image_id": 1, "caption": "Blue rectangle."}]}))
    config = load_config(overrides=[*SMALL, "data.stage=caption", "data.source=tfds:coco_captions",
                                    f"data.data_dir={tmp_path / 'tfds'}", f"data.manual_dir={manual}",
                                    f"data.tokenizer={tokenizer.path}"])
    pipeline = build_pipeline(config, tmp_path / "work")
    assert pipeline.source_counters["skipped"] == 1  # the image that is not there
    assert len(pipeline.row_maker.captions) == 2  # one sample per caption, the image shared
    batch = next(iter(pipeline.train_dataset()))
    validate_batch(batch, config.model.layout.visual_len)
    assert batch["image_mask"].any() and pipeline.row_maker.counters["skipped_image"] == 0
