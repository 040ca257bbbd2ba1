"""The config schema: presets, recipes, overrides and key-naming errors."""

import subprocess
import sys

import pytest

from vist2_jax.config import PRESETS, ConfigError, load_config, parse_overrides

# Published Qwen3 dense decoder shapes (config.json of Qwen/Qwen3-*):
# hidden, layers, heads, kv heads, intermediate, tied.
QWEN3_SHAPES = {
    "0.6b": (1024, 28, 16, 8, 3072, True),
    "1.7b": (2048, 28, 16, 8, 6144, True),
    "4b": (2560, 36, 32, 8, 9728, True),
    "8b": (4096, 36, 32, 8, 12288, False),
}


@pytest.mark.parametrize("name", sorted(QWEN3_SHAPES))
def test_presets_have_published_qwen3_and_vit_l16_shapes(name):
    model = load_config(preset=name).model
    d, v, layout = model.decoder, model.vision, model.layout
    assert (d.hidden_size, d.num_layers, d.num_heads, d.num_kv_heads, d.intermediate_size,
            d.tie_embeddings) == QWEN3_SHAPES[name]
    assert (d.head_dim, d.vocab_size, d.rope_theta) == (128, 151936, 1_000_000.0)
    assert (v.hidden_size, v.num_layers, v.num_heads, v.mlp_dim) == (1024, 24, 16, 4096)
    assert (layout.image_size, layout.patch_size, layout.merge) == (256, 16, 2)
    assert (layout.visual_len, layout.text_len, layout.compression_ratio) == (64, 256, 4.0)


def test_every_preset_validates():
    for name in PRESETS:
        assert load_config(preset=name).preset == name


def test_recipe_chain_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("preset: tiny\ndata:\n  seq_len: 256\ntrain:\n  steps: 50\n")
    (tmp_path / "stage.yaml").write_text("base: base.yaml\ntrain:\n  learning_rate: 1e-3\n")
    config = load_config(tmp_path / "stage.yaml", ["train.steps=20", "model.aligner.projector=tanh"])
    assert config.data.seq_len == 256
    assert config.train.steps == 20
    assert config.train.learning_rate == pytest.approx(1e-3)
    assert config.model.aligner.projector == "tanh"
    assert config.model.decoder == PRESETS["tiny"].decoder


def test_a_recipe_merges_a_list_of_bases_in_order(tmp_path):
    """``base: [stage, overlay]``: the proof's stages are the demo's plus one overlay."""
    (tmp_path / "stage.yaml").write_text("preset: tiny\ndata:\n  seq_len: 256\n  images_per_row: 1\n")
    (tmp_path / "overlay.yaml").write_text("data:\n  seq_len: 128\ntrain:\n  steps: 70\n")
    (tmp_path / "run.yaml").write_text("base: [stage.yaml, overlay.yaml]\ntrain:\n  steps: 90\n")
    config = load_config(tmp_path / "run.yaml")
    assert (config.data.seq_len, config.data.images_per_row, config.train.steps) == (128, 1, 90)
    (tmp_path / "bad.yaml").write_text("base: [stage.yaml, 3]\n")
    with pytest.raises(ConfigError, match="^base: in .*bad.yaml must name a recipe or a list of recipes"):
        load_config(tmp_path / "bad.yaml")


def test_text_only_rows_need_the_olm_stage():
    with pytest.raises(ConfigError, match="^data.text_only: needs data.stage=olm .*got 'ocr'"):
        load_config(overrides=["data.stage=ocr", "data.text_only=true"])


def test_override_parsing_types():
    tree = parse_overrides(["a.b=3", "a.c=true", "d=hello", "e=1.5"])
    assert tree == {"a": {"b": 3, "c": True}, "d": "hello", "e": 1.5}


@pytest.mark.parametrize("overrides, key, words", [
    (["model.decoder.hiden_size=64"], "model.decoder.hiden_size", "did you mean 'hidden_size'"),
    (["model.decoder.num_layers=two"], "model.decoder.num_layers", "expected an integer"),
    (["model.scan_layers=1"], "model.scan_layers", "expected true or false"),
    (["model.aligner.projector=conv"], "model.aligner.projector", "is not one of"),
    (["model.layout.visual_len=32"], "model.layout.visual_len", "(128/16/2)^2 = 16"),
    (["model.layout.text_len=70"], "model.layout.text_len", "whole multiple"),
    (["model.vision.num_heads=3"], "model.vision.num_heads", "do not divide hidden size"),
    (["model.decoder.num_kv_heads=3"], "model.decoder.num_kv_heads", "do not divide"),
    (["model.layout.patch_size=12"], "model.layout.patch_size", "does not divide image size"),
    (["train.warmup_steps=500"], "train.warmup_steps", "must lie in"),
    (["data.ocr_shuffle=1.5"], "data.ocr_shuffle", "fraction in [0, 1]"),
    (["data.curriculum=[{start_step: 0, text_len: 64, max_chunks: 2, ocr_text_lens: [32, 40]}]"],
     "data.curriculum[0].ocr_text_lens", "L=40 is not a whole multiple of m=16"),
    (["data.curriculum=[{start_step: 0, text_len: 64, max_chunks: 2, ocr_text_lens: [512]}]"], "data.seq_len",
     "data.curriculum[0].ocr_text_lens=512"),
    (["mesh.data=-1"], "mesh", "at most one mesh axis"),
    (["data=5"], "data", "expected a section"),
    (["preset=13b"], "preset", "unknown preset"),
    (["nonsense"], "nonsense", "section.key=value"),
    (["data.seq_len=16"], "data.seq_len", "cannot hold one chunk and its sketch"),
    (["data.seq_len=80", "model.layout.text_len=64"], "data.seq_len", "= 81"),
    (["data.curriculum=[{start_step: 0, text_len: 512, max_chunks: 2}]"], "data.seq_len",
     "data.curriculum[0].text_len=512"),
])
def test_bad_config_names_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    message = str(info.value)
    assert message.startswith(key + ":"), message
    assert words in message, message


def test_bad_recipe_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)) * 4)  # e.g. a checkpoint file passed as RECIPE
    with pytest.raises(ConfigError, match=r"binary\.yaml is not UTF-8 text") as err:
        load_config(tmp_path / "binary.yaml")
    assert "\n" not in str(err.value)
    (tmp_path / "control.yaml").write_text("model:\x07 1\n")  # UTF-8 but not YAML: one line too
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        load_config(tmp_path / "control.yaml")
    assert "\n" not in str(err.value)


def test_cli_bad_config_is_one_line_not_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "vist2_jax.cli.main", "params", "--preset", "tiny",
                           "model.layout.visual_len=7"], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vist2 params: error: model.layout.visual_len:")


def test_runs_saved_by_earlier_versions_still_load(tmp_path):
    """data.ocr_shuffle was a bool and is a fraction now: a saved config.yaml with the bool
    loads as 0.0 / 1.0 (a user's old runs keep working), a recipe with it is a one-line error."""
    import yaml

    from vist2_jax.checkpointing.runs import load_config_of
    from vist2_jax.config.loader import to_dict

    for old, new in ((False, 0.0), (True, 1.0)):
        saved = to_dict(load_config())
        saved["data"]["ocr_shuffle"] = old
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
        assert load_config_of(tmp_path).data.ocr_shuffle == new
    with pytest.raises(ConfigError, match=r"^data.ocr_shuffle: expected a number, got bool True$"):
        load_config(overrides=["data.ocr_shuffle=true"])
