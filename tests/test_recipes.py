"""Recipes without per-size copies: one file per stage, ``size=`` picks ``sizes/SIZE.yaml``,
a size's ``stages:`` entry tunes only its stage, and every size keeps its global batch."""

import pytest

from vist2_jax.config import ConfigError, load_config

STAGES = ("stage1_caption", "stage2_ocr", "stage3_olm", "stage4_sft")
SIZES = ("0.6b", "1.7b", "4b", "8b")


@pytest.mark.parametrize("size", SIZES)
def test_one_stage_file_serves_every_size_and_gpu_variant(size):
    for stage in STAGES:
        tpu = load_config(f"recipes/{stage}.yaml", [f"size={size}"])
        gpu = load_config(f"recipes/{stage}.yaml", [f"size={size}-h100x8"])
        assert tpu.preset == gpu.preset == size
        assert tpu.run.workdir == f"runs/{size}/{stage}"
        assert gpu.run.workdir == f"runs/{size}-h100x8/{stage}"
        # same global batch in tokens on one 8xH100 node, reached by accumulation
        assert gpu.data.global_batch_size * gpu.data.seq_len == tpu.data.global_batch_size * tpu.data.seq_len
        assert gpu.mesh.fsdp * gpu.mesh.data * gpu.mesh.tensor == 8
    assert load_config("recipes/stage4_sft.yaml", [f"size={size}"]).train.init_from == f"runs/{size}/stage3_olm"


def test_root_puts_runs_and_data_in_a_bucket_for_pods():
    """``root=`` moves every stage's run, its ``init_from`` and its data together; without it
    they stay relative to the working directory."""
    for stage in STAGES:
        local = load_config(f"recipes/{stage}.yaml", ["size=8b"])
        pod = load_config(f"recipes/{stage}.yaml", ["size=8b", "root=gs://b/vist2/"])
        assert pod.run.workdir == f"gs://b/vist2/{local.run.workdir}"
        assert pod.data.source == f"gs://b/vist2/{local.data.source}" and local.data.source.startswith("data/")
        assert pod.train.init_from == (f"gs://b/vist2/{local.train.init_from}" if local.train.init_from else "")


def test_size_is_required_and_named(tmp_path):
    with pytest.raises(ConfigError, match="^size: .*size=0.6b"):
        load_config("recipes/stage3_olm.yaml")


def test_stage_tuning_applies_to_its_stage_only(tmp_path):
    (tmp_path / "sizes").mkdir()
    (tmp_path / "sizes" / "s.yaml").write_text(
        "preset: tiny\nstages: {olm: {train: {grad_accum_steps: 4}}, sft: {model: {remat_policy: full}}}\n")
    (tmp_path / "olm.yaml").write_text("base: sizes/{size}.yaml\ndata: {stage: olm}\n")
    config = load_config(tmp_path / "olm.yaml", ["size=s"])
    assert config.train.grad_accum_steps == 4 and config.model.remat_policy == "none"
    assert load_config(tmp_path / "olm.yaml", ["size=s", "data.stage=sft"]).model.remat_policy == "full"
    assert load_config(tmp_path / "olm.yaml", ["size=s", "train.grad_accum_steps=2"]).train.grad_accum_steps == 2
    (tmp_path / "sizes" / "s.yaml").write_text("preset: tiny\nstages: {olmm: {}}\n")
    with pytest.raises(ConfigError, match="^stages.olmm: unknown stage"):
        load_config(tmp_path / "olm.yaml", ["size=s"])


# docs/design.md §1: the components each stage trains (ViT = vision; "(+ aligner)" included).
DESIGN_TABLE = {"caption": {"aligner"}, "ocr": {"vision", "aligner"}, "olm": {"decoder", "aligner"},
                "sft": {"vision", "aligner", "decoder"}}


@pytest.mark.parametrize("folder", ["demo", "proof"])
def test_demo_and_proof_stages_train_the_components_of_the_design_table(folder):
    from pathlib import Path

    design = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    assert "| 2 mt-ocr | `[V_a][T text_a][V_b][T text_b]...` | ViT + aligner |" in design
    for stage in ("stage1_caption", "stage2_ocr", "stage3_olm", "stage4_sft"):
        config = load_config(f"recipes/{folder}/{stage}.yaml")
        want = DESIGN_TABLE[config.data.stage]
        if stage == "stage2_ocr":  # the one departure, written down in the design document
            assert "**Departure, demo and proof only: stage 2 trains the decoder too.**" in design
            want = want | {"decoder"}
        assert set(config.train.trainable) == want, stage
    for stage in ("stage1_caption", "stage2_ocr", "stage3_olm", "stage4_sft"):  # the pod recipes keep the table
        pod = load_config(f"recipes/{stage}.yaml", ["size=0.6b"])
        assert set(pod.train.trainable) == DESIGN_TABLE[pod.data.stage], stage
    lm, vision = (load_config(f"recipes/{folder}/stage0_{part}.yaml") for part in ("lm", "vision"))
    assert lm.train.trainable == ("decoder",) and vision.train.trainable == ("vision",)
    assert vision.train.text_loss_weight == 0 and vision.train.glyph_loss_weight > 0
    stage2 = load_config(f"recipes/{folder}/stage2_ocr.yaml").train
    assert 0 < stage2.component_learning_rate.vision < stage2.component_learning_rate.aligner
    # Every stage draws and reads the same tiles: a chunk of the longest L fits the sketch.
    stages = [load_config(f"recipes/{folder}/{stage}.yaml") for stage in
              ("stage0_lm", "stage0_vision", "stage1_caption", "stage2_ocr", "stage3_olm", "stage4_sft")]
    tokens_per_tile = {(c.data.sketch_tile_tokens, c.model.layout.visual_stride) for c in stages}
    assert len(tokens_per_tile) == 1, tokens_per_tile
    per_tile, _ = tokens_per_tile.pop()
    longest = max(p.text_len for c in stages for p in c.data.curriculum)
    assert longest <= per_tile * stages[0].model.layout.visual_len
