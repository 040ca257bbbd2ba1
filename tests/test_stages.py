"""Stage behaviour in process: frozen components get no optimizer state and no update,
a stage starts from Hugging Face weights or from the previous stage, every stage layout
meets the row contract, and the demo / sweep / launch commands run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from data_pipelines.pipeline import build_pipeline
from vist2_jax.row_contract import TEXT, VISUAL, validate_batch
from vist2_jax.config import load_config
from vist2_jax.config.schema import ConfigError
from vist2_jax.model.vist2 import Vist2Model, example_batch
from vist2_jax.model.vist2 import abstract_params as model_abstract_params
from vist2_jax.checkpointing.runs import restore_params
from vist2_jax.training.optimizer import make_optimizer
from vist2_jax.training.trainer import train
from conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.decoder.num_layers=2", "model.vision.num_layers=2", "data.seq_len=256",
         "data.global_batch_size=4", "data.images_per_row=4", "data.eval_rows=4", "train.eval_batches=1",
         "train.warmup_steps=1", "run.progress=false", "mesh.fsdp=4", "mesh.tensor=2"]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from data_pipelines.pipeline import resolve_tokenizer

    return str(resolve_tokenizer(load_config(), tmp_path_factory.mktemp("tok")).path)


def abstract_params(config):
    return nn.unbox(model_abstract_params(config.model))


def test_frozen_components_have_no_optimizer_state():
    config = load_config(overrides=["train.trainable=[aligner]"])
    params = abstract_params(config)
    opt_state = jax.eval_shape(make_optimizer(config.train, params).init, params)
    state_size = sum(x.size for x in jax.tree_util.tree_leaves(opt_state))
    aligner_size = sum(x.size for x in jax.tree_util.tree_leaves(params["params"]["aligner"]))
    assert state_size - 2 * aligner_size < 8  # Adam's mu and nu for the aligner, plus step counts


def test_component_learning_rates_reach_the_optimizer(tmp_path, tokenizer_path):
    """Frozen, slow and fast components in one real step: the decoder does not move, the
    vision tower moves by at most its own small rate per weight, the aligner by its large
    one, and the step reports each component's norms and rate."""
    from vist2_jax.training.step import make_train_step

    config = load_config(overrides=[
        *SMALL, f"data.tokenizer={tokenizer_path}", "data.stage=ocr", "train.steps=4", "train.warmup_steps=0",
        "train.weight_decay=0", "train.trainable=[vision,aligner]", "train.component_learning_rate.vision=1e-5",
        "train.component_learning_rate.aligner=1e-2", "mesh.fsdp=1", "mesh.tensor=1"])
    batch = next(iter(build_pipeline(config, tmp_path).train_dataset()))
    params = nn.unbox(jax.jit(Vist2Model(config.model).init)(jax.random.key(0), batch))
    optimizer = make_optimizer(config.train, params)
    state = {"step": np.int32(0), "params": params, "opt_state": optimizer.init(params)}
    new, metrics = jax.jit(make_train_step(config, optimizer))(state, batch)
    moved = {name: max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
        jax.tree_util.tree_leaves(new["params"]["params"][name]),
        jax.tree_util.tree_leaves(params["params"][name]))) for name in ("vision", "aligner", "decoder")}
    assert moved["decoder"] == 0.0
    assert 0.5e-5 < moved["vision"] <= 1.01e-5  # Adam's first step: about the rate per weight
    assert 0.5e-2 < moved["aligner"] <= 1.01e-2
    metrics = jax.device_get(metrics)
    assert np.isclose(metrics["learning_rate_vision"], 1e-5) and np.isclose(metrics["learning_rate_aligner"], 1e-2)
    assert "grad_norm_decoder" not in metrics and metrics["grad_norm_vision"] > 0
    ratio = metrics["update_norm_aligner"] / metrics["update_norm_vision"]
    assert ratio > 100  # 1000x the rate over fewer weights


def test_a_component_starts_its_schedule_late():
    from vist2_jax.training.optimizer import learning_rate_schedule

    config = load_config(overrides=["train.steps=100", "train.warmup_steps=10",
                                    "train.component_start_step.vision=40",
                                    "train.component_learning_rate.vision=1e-4"])
    vision, aligner = (learning_rate_schedule(config.train, c) for c in ("vision", "aligner"))
    assert float(vision(39)) == 0.0 and float(vision(45)) > 0 and np.isclose(float(vision(50)), 1e-4)
    assert np.isclose(float(aligner(10)), config.train.learning_rate)


@pytest.mark.parametrize("stage", ["caption", "ocr", "olm", "sft"])
def test_every_stage_meets_the_row_contract(stage, tmp_path, tokenizer_path):
    config = load_config(overrides=[*SMALL, f"data.stage={stage}", f"data.tokenizer={tokenizer_path}",
                                    "train.steps=2"])
    pipeline = build_pipeline(config, tmp_path)
    batch = next(iter(pipeline.train_dataset()))
    validate_batch(batch, config.model.layout.visual_len)
    modality, chunk, loss = batch["modality"], batch["chunk_id"], batch["loss_mask"]
    assert (loss[modality != TEXT] == 0).all()  # visual positions and padding carry no loss
    assert (modality == VISUAL).any() and loss.sum() > 0
    first = modality[0][modality[0] > 0][0]
    assert first == {"caption": VISUAL, "ocr": VISUAL, "olm": TEXT, "sft": VISUAL}[stage]
    # Each text span's marker: a transcription (OCR) opens with bos, everything else with
    # <|chunk|> (row_contract: "transcribe this image" vs "continue after it")
    text, segment = modality == TEXT, batch["segment_id"]
    opens = text & np.concatenate([np.ones_like(text[:, :1]), (modality[:, 1:] != modality[:, :-1]) |
                                   (chunk[:, 1:] != chunk[:, :-1]) | (segment[:, 1:] != segment[:, :-1])], 1)
    tokenizer = pipeline.tokenizer
    want = tokenizer.bos_id if stage == "ocr" else tokenizer.chunk_id
    assert opens.sum() > 0 and set(batch["tokens"][opens].tolist()) == {want}
    if stage == "caption":  # [V_img][T caption]: the caption reads the image, ids 1 then 2
        seg = batch["segment_id"][0] == 1
        assert set(chunk[0][seg & (modality[0] == VISUAL)]) == {1}
        assert set(chunk[0][seg & (modality[0] == TEXT)]) == {2}


def test_text_only_rows_are_the_olm_rows_without_their_sketches(tmp_path, tokenizer_path):
    """data.text_only (the proof's native-LM baseline): the same documents, tokens and targets
    as the OLM rows of the same seed, with no visual span, one chunk id per document and
    positions 0.. per document, so each chunk reads the earlier chunks' text itself."""
    common = [*SMALL, "data.stage=olm", f"data.tokenizer={tokenizer_path}", "train.steps=2"]
    olm = next(iter(build_pipeline(load_config(overrides=common), tmp_path / "a").train_dataset()))
    text = next(iter(build_pipeline(load_config(overrides=[*common, "data.text_only=true"]),
                                    tmp_path / "b").train_dataset()))
    validate_batch(text, 16)
    assert (olm["modality"] == VISUAL).any() and not (text["modality"] == VISUAL).any()
    assert not text["image_mask"].any()
    for b in range(len(olm["tokens"])):
        keep = olm["modality"][b] != VISUAL
        n = int(keep.sum())
        for name in ("tokens", "targets", "loss_mask", "segment_id"):
            assert np.array_equal(text[name][b][:n], olm[name][b][keep]), name
        for segment in np.unique(olm["segment_id"][b][olm["segment_id"][b] > 0]):
            where = text["segment_id"][b] == segment
            assert np.array_equal(text["positions"][b][where], np.arange(where.sum()))
            assert set(text["chunk_id"][b][where]) == {1}
    assert (olm["chunk_id"] > 1).any()  # the OLM rows had several chunks per document


def test_chunk_start_targets_weigh_more_in_training_rows_only(tmp_path, tokenizer_path):
    """data.chunk_start_tokens / chunk_start_weight: in training OLM rows the first n targets
    of every chunk after the first weigh w (what only the earlier sketches can tell); the
    first chunk and the rest weigh 1; held-out rows (eval_loss) weigh 1 everywhere."""
    common = [*SMALL, "data.stage=olm", f"data.tokenizer={tokenizer_path}", "train.steps=2"]
    config = load_config(overrides=[*common, "data.chunk_start_tokens=2", "data.chunk_start_weight=3.0"])
    pipeline = build_pipeline(config, tmp_path / "a")
    plain = next(iter(build_pipeline(load_config(overrides=common), tmp_path / "b").train_dataset()))
    weighted = next(iter(pipeline.train_dataset()))
    assert np.array_equal(weighted["tokens"], plain["tokens"])  # the same rows, reweighted
    opens = (weighted["modality"] == TEXT) & (weighted["tokens"] == pipeline.tokenizer.chunk_id)
    assert (opens & (weighted["chunk_id"] > 1)).any()
    expected = plain["loss_mask"].copy()
    for b, at in zip(*np.nonzero(opens & (weighted["chunk_id"] > 1))):
        expected[b, at:at + 2] *= 3.0
    assert np.array_equal(weighted["loss_mask"], expected) and expected.max() == 3.0
    assert all(set(np.unique(b["loss_mask"])) <= {0.0, 1.0} for b in pipeline.eval_batches())
    with pytest.raises(ConfigError, match="^data.chunk_start_weight: must be positive"):
        load_config(overrides=[*common, "data.chunk_start_weight=0"])


def test_olm_rows_draw_their_chunk_length_from_the_points_list(tmp_path, tokenizer_path):
    """curriculum[].olm_text_lens: each OLM row cuts its documents at an L drawn from the list
    (stage 3 keeps training the earlier ratios while it moves on); without it, the point's L."""
    def chunk_lengths(olm_lens):
        curriculum = f"[{{start_step: 0, text_len: 32, max_chunks: 3, olm_text_lens: {olm_lens}}}]"
        config = load_config(overrides=[*SMALL, "data.stage=olm", f"data.tokenizer={tokenizer_path}",
                                        "train.steps=4", f"data.curriculum={curriculum}"])
        counts = {}
        for _, batch in zip(range(2), build_pipeline(config, tmp_path / str(olm_lens)).train_dataset()):
            text = (batch["modality"] == TEXT) & (batch["chunk_id"] == 1)  # first chunks: full unless the document ends
            for b in range(len(text)):
                for segment in np.unique(batch["segment_id"][b][text[b]]):
                    n = int((text[b] & (batch["segment_id"][b] == segment)).sum()) - 1  # less the marker
                    counts[n] = counts.get(n, 0) + 1
        return counts

    assert max(chunk_lengths([])) == 32
    mixed = chunk_lengths([16, 32])
    assert max(mixed) == 32 and mixed.get(16, 0) >= 2 and mixed.get(32, 0) >= 2, mixed
    with pytest.raises(ConfigError, match=r"^data.curriculum\[0\].olm_text_lens: must be positive"):
        load_config(overrides=[*SMALL, "data.curriculum=[{start_step: 0, text_len: 32, olm_text_lens: [0]}]"])


def test_frozen_stage_changes_only_the_aligner_and_starts_from_hf(tmp_path, tokenizer_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    hf.save_pretrained(tmp_path / "qwen3")
    config = load_config(overrides=[*SMALL, "data.stage=caption", f"data.tokenizer={tokenizer_path}", "train.steps=2",
                                    "train.trainable=[aligner]", f"train.init_decoder_hf={tmp_path / 'qwen3'}",
                                    f"run.workdir={tmp_path / 'stage1'}", "train.checkpoint_every=2"])
    train(config)
    _, trained = restore_params(tmp_path / "stage1", abstract_params(config))
    from vist2_jax.convert.hf_mapping import QWEN3_DECODER, import_hf
    from vist2_jax.convert.safetensors_io import read_checkpoint_dir

    hf_params = import_hf(QWEN3_DECODER, read_checkpoint_dir(tmp_path / "qwen3"), config.model)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(trained["params"]["decoder"]),
                           hf_params["params"]["decoder"])
    fresh = jax.jit(Vist2Model(config.model).init)(jax.random.key(config.run.seed), example_batch(
        config.model, 1, config.data.seq_len, config.data.images_per_row))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(trained["params"]["vision"]),
                           jax.device_get(nn.unbox(fresh)["params"]["vision"]))
    changed = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                     trained["params"]["aligner"], nn.unbox(fresh)["params"]["aligner"])
    assert max(jax.tree_util.tree_leaves(changed)) > 0

    # stage 2 starts from stage 1's parameters
    config2 = load_config(overrides=[*SMALL, "data.stage=ocr", f"data.tokenizer={tokenizer_path}", "train.steps=2",
                                     "train.trainable=[vision,aligner]", f"train.init_from={tmp_path / 'stage1'}",
                                     f"run.workdir={tmp_path / 'stage2'}", "train.checkpoint_every=2"])
    train(config2)
    _, stage2 = restore_params(tmp_path / "stage2", abstract_params(config2))
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(stage2["params"]["decoder"]),
                           hf_params["params"]["decoder"])


def test_demo_cli_runs_all_four_stages(tmp_path):
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
    proc = subprocess.run([sys.executable, "-m", "vist2_jax.cli.main", "demo", "--workdir", str(tmp_path / "demo"),
                           "--steps-scale", "0.05", "model.decoder.num_layers=2", "model.vision.num_layers=2",
                           "run.progress=false"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    demo = tmp_path / "demo"
    for stage in ("stage0_lm", "stage0_vision", "stage1_caption", "stage2_ocr", "stage3_olm", "stage4_sft"):
        assert (demo / stage / "metrics.jsonl").is_file()
        assert any((demo / stage / "checkpoints").iterdir())
        assert list((demo / stage / "tensorboard").glob("events.out.tfevents.*"))
    assert (demo / "loss_curve.png").stat().st_size > 1000
    assert list(demo.glob("sketch_*.png"))
    assert "stage 3 validation loss" in proc.stdout
    summary = json.loads((demo / "summary.json").read_text())
    assert set(summary["stages"]) == {"stage0_lm", "stage0_vision", "stage1_caption", "stage2_ocr", "stage3_olm",
                                      "stage4_sft"}

    # the same command again (as after a preemption): every stage resumes at its last step,
    # trains nothing, and the report still prints (a resumed stage has no loss of this call)
    again = subprocess.run(proc.args, env={**os.environ, **env}, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "stage 3 validation loss" in again.stdout
    assert again.stdout.split("stage 3 validation loss")[1].splitlines()[0] == \
        proc.stdout.split("stage 3 validation loss")[1].splitlines()[0]  # read from the run's metrics

    # the demo's checkpoints serve inference directly: config, params and tokenizer come from the run
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The built-in functions are listed here in alphabetical order. " * 4)
    generated = subprocess.run([sys.executable, "-m", "vist2_jax.cli.main", "generate", "--checkpoint",
                                str(demo / "stage4_sft"), "--prompt-file", str(prompt), "--mode", "gcc",
                                "--max-new-tokens", "6"], env={**os.environ, **env}, capture_output=True,
                               text=True, timeout=600, cwd=ROOT)
    assert generated.returncode == 0, generated.stderr[-3000:]
    summary_line = generated.stderr.strip().splitlines()[-1]
    assert summary_line.startswith("[gcc]") and " generated;" in summary_line
    assert int(summary_line.split("prompt tokens, ")[1].split(" generated")[0]) >= 1
    (tmp_path / "ids.txt").write_text("5 100 200 300")
    scored = subprocess.run([sys.executable, "-m", "vist2_jax.cli.main", "score", "--checkpoint",
                             str(demo / "stage3_olm"), "--token-ids-file", str(tmp_path / "ids.txt")],
                            env={**os.environ, **env}, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert scored.returncode == 0, scored.stderr[-3000:]
    report = json.loads(scored.stdout)
    assert report["num_scored"] == 3 and all(lp < 0 for lp in report["logprobs"][1:])


def _baseline_running(workdir) -> bool:
    """A process whose command line names WORKDIR/text_only (Linux /proc)."""
    needle = f"run.workdir={workdir / 'text_only'}".encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if needle in cmdline.read_bytes():
                return True
        except OSError:  # the process ended meanwhile
            continue
    return False


def test_demo_proof_ends_with_the_compression_table(tmp_path):
    """``vist2 demo --proof`` (steps scaled down): every stage with 4 tokens per tile, the
    text-only baseline from the stage-0a LM on sketch-free rows (in its own process beside
    stages 0b-4), and the table at 1x/2x/4x. SIGTERM once the baseline runs stops both (exit
    0, nothing left running) and the same command resumes and finishes."""
    import signal
    import time
    import yaml

    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
    command = [sys.executable, "-m", "vist2_jax.cli.main", "demo", "--proof", "--workdir", str(tmp_path / "proof"),
               "--steps-scale", "0.005", "model.decoder.num_layers=1", "model.vision.num_layers=1",
               "run.progress=false"]
    with open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
        deadline = time.time() + 300
        while "== stage1_caption" not in (tmp_path / "first.err").read_text():
            assert first.poll() is None and time.time() < deadline, "stage 0b never ended"
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 0, (tmp_path / "first.err").read_text()[-3000:]
    stderr = (tmp_path / "first.err").read_text()
    assert "== text_only: 15 steps" in stderr and "Traceback" not in stderr
    assert "vist2 demo: stage1_caption stopped at step" in stderr or "vist2 demo: stopped by SIGTERM" in stderr
    assert not _baseline_running(tmp_path / "proof") and not (tmp_path / "proof" / "stage2_ocr").exists()

    proc = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proof = tmp_path / "proof"
    written = json.loads((proof / "compression.json").read_text())
    table = written["table"]
    baseline_summary = json.loads((proof / "text_only" / "summary.json").read_text())
    # the baseline enters at its lowest held-out loss (train.keep_best), a checkpoint it kept
    assert written["text_only_step"] == baseline_summary["best_eval_step"] > 0
    assert written["text_only_run"] == str(proof / "text_only" / "checkpoints" / str(written["text_only_step"]))
    assert (proof / "text_only" / "checkpoints" / str(written["text_only_step"])).is_dir()
    assert written["vist2_step"] == json.loads((proof / "stage3_olm" / "summary.json").read_text())["steps_done"]
    assert [row["ratio"] for row in table] == [1, 2, 4] and [row["text_len"] for row in table] == [16, 32, 64]
    for row in table:
        assert row["ocr_chunks"] >= 1 and row["compression_gap_lo"] <= row["compression_gap"] <= row["compression_gap_hi"]
    assert (proof / "compression.png").stat().st_size > 1000
    baseline = yaml.safe_load((proof / "text_only" / "config.yaml").read_text())
    assert baseline["data"]["text_only"] and baseline["train"]["init_from"] == str(proof / "stage0_lm")
    for stage in ("stage2_ocr", "stage3_olm", "text_only"):
        config = yaml.safe_load((proof / stage / "config.yaml").read_text())
        assert config["data"]["sketch_tile_tokens"] == 4 and config["model"]["layout"]["visual_stride"] == 4
    assert "compression table" in proc.stdout and "gap vs text-only LM" in proc.stdout
    # the baseline is a `vist2 train` process beside stages 0b-4: it started before stage 3 ended
    assert (proof / "text_only" / "config.yaml").stat().st_mtime < (proof / "stage3_olm" / "summary.json").stat().st_mtime
    assert "done: " in (proof / "text_only.log").read_text()
    assert "text_only" in json.loads((proof / "summary.json").read_text())["stages"]


def test_a_stopped_demo_stage_does_not_start_the_next(tmp_path):
    """SIGTERM during a demo stage saves that stage (as `vist2 train` does) and ends the demo
    with one line: the next stage never starts from a half-trained one."""
    import signal
    import time

    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1)}
    demo = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "vist2_jax.cli.main", "demo", "--workdir", str(demo),
                             "--steps-scale", "0.5", "model.decoder.num_layers=1", "model.vision.num_layers=1",
                             "run.progress=false"], env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    metrics, deadline = demo / "stage0_lm" / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and '"loss"' in metrics.read_text()):
        assert proc.poll() is None and time.time() < deadline, "stage 0 never logged a step"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "vist2 demo: stage0_lm stopped at step" in stderr and "Traceback" not in stderr
    assert any(p.name.isdigit() for p in (demo / "stage0_lm" / "checkpoints").iterdir())
    assert not (demo / "stage0_vision").exists()


def test_sweep_and_launchers_dry_run():
    proc = subprocess.run([sys.executable, "-m", "vist2_jax.cli.main", "sweep", str(ROOT / "recipes" / "sweep.yaml"),
                           "--json"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout)
    assert {r["size"] for r in runs} == {"0.6b", "1.7b", "4b", "8b"} and len(runs) == 16
    assert all(r["command"].startswith("launch/tpu_pod.sh") for r in runs)
    assert all(r["workdir"].startswith("gs://") and "root=gs://" in r["command"] for r in runs)  # pods share no disk
    tpu = subprocess.run(["bash", "launch/tpu_pod.sh", "--tpu", "t1", "--zone", "z1", "--dry-run", "--",
                          "recipes/stage3_olm.yaml", "size=8b"], capture_output=True, text=True, cwd=ROOT)
    assert tpu.returncode == 0 and "--worker=all" in tpu.stdout
    assert "vist2 train recipes/stage3_olm.yaml size=8b" in tpu.stdout
    slurm = subprocess.run(["bash", "launch/slurm.sbatch", "--dry-run", "recipes/stage3_olm.yaml", "size=8b"],
                           capture_output=True, text=True, cwd=ROOT)
    assert slurm.returncode == 0 and slurm.stdout.startswith("srun")
    gke = subprocess.run(["bash", "launch/gke.sh", "--name", "n", "--image", "img", "--accelerator", "tpu-v5p-slice",
                          "--topology", "4x4x4", "--workers", "16", "--dry-run", "--", "recipes/stage3_olm.yaml",
                          "size=8b"],
                         capture_output=True, text=True, cwd=ROOT)
    assert gke.returncode == 0 and "kind: JobSet" in gke.stdout and "parallelism: 16" in gke.stdout
    local = subprocess.run([sys.executable, "launch/local.py", "--processes", "2", "--dry-run", "--", "vist2", "train",
                            "r.yaml"], capture_output=True, text=True, cwd=ROOT)
    assert local.returncode == 0 and local.stdout.count("VIST2_PROCESS_ID=") == 2


def test_gradient_accumulation_matches_one_big_batch(tmp_path, tokenizer_path):
    from vist2_jax.training.step import make_train_step

    base = [*SMALL, f"data.tokenizer={tokenizer_path}", "train.steps=2", "data.stage=olm",
            "data.curriculum=[{start_step: 0, text_len: 16, max_chunks: 3, ocr_fraction: 0.5}]"]
    config = load_config(overrides=base)
    batch = next(iter(build_pipeline(config, tmp_path).train_dataset()))
    params = nn.unbox(jax.jit(Vist2Model(config.model).init)(jax.random.key(0), batch))
    results = {}
    for accum in (1, 2):
        cfg = load_config(overrides=[*base, f"train.grad_accum_steps={accum}"])
        optimizer = make_optimizer(cfg.train, params)
        state = {"step": 0, "params": params, "opt_state": optimizer.init(params)}
        step = jax.jit(make_train_step(cfg, optimizer))
        state, first = step(state, batch)
        _, second = step(state, batch)
        results[accum] = (jax.device_get(first), jax.device_get(second))
    one, two = results[1], results[2]
    np.testing.assert_allclose(two[0]["loss"], one[0]["loss"], rtol=1e-6)  # same weights, exact sums
    np.testing.assert_allclose(two[1]["loss"], one[1]["loss"], rtol=2e-3)  # after one (mean-of-means) update
    assert {"loss_olm", "loss_ocr"} <= set(one[0])
    total = one[0]["tokens_olm"] + one[0]["tokens_ocr"]
    assert total == one[0]["target_tokens"]
    mixed = (one[0]["loss_olm"] * one[0]["tokens_olm"] + one[0]["loss_ocr"] * one[0]["tokens_ocr"]) / total
    np.testing.assert_allclose(mixed, one[0]["loss"], rtol=1e-5)
