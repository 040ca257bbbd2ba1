"""The training system end to end through the CLI: exact resume after SIGKILL, corrupt and
unreadable checkpoints, metrics files, progress, sharded equivalence, two processes over
loopback, and a run directory on a bucket. How runs stop (signals, NaN, the collapse guard,
early stopping) is pinned in test_train_stops.py."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import yaml

from conftest import read_scalar_events
from train_cli import ROOT, losses, run, tokenizer_file, uninterrupted, vist2, wait_for_step, write_recipe  # noqa: F401 (fixtures)


def test_metrics_files(uninterrupted):
    workdir, _ = uninterrupted
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(1, 9))
    for key in ("accuracy", "grad_norm", "learning_rate", "step_time_s", "text_tokens_per_s",
                "decoder_tokens_per_s", "model_flops_per_step", "model_tflops_per_s", "visual_spread"):
        assert all(np.isfinite(r[key]) for r in train_records), key
    assert records[0]["step"] == 0 and "eval_loss" in records[0]
    (events,) = (workdir / "tensorboard").glob("events.out.tfevents.*")
    scalars = read_scalar_events(events)
    assert [s for s, v in scalars if "loss" in v] == list(range(1, 9))
    assert scalars[-1][1]["loss"] == pytest.approx(train_records[-1]["loss"], rel=1e-6)
    assert "visual_spread" in records[0] and scalars[-1][1]["visual_spread"] == train_records[-1]["visual_spread"]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["steps_done"] == 8 and summary["eval_loss_end"] < summary["eval_loss_start"]
    assert not summary["stopped_early"] and "best_eval_step" not in summary  # no train.keep_best: none kept


def test_sigkill_then_resume_is_bitwise_identical(tmp_path, uninterrupted, tokenizer_file):
    reference, _ = uninterrupted
    recipe = write_recipe(tmp_path, data={"tokenizer": tokenizer_file}, run={"workdir": str(tmp_path / "run")})
    command, env = vist2("train", recipe, devices=1)
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(tmp_path / "run", 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run("train", recipe, devices=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    assert losses(tmp_path / "run") == losses(reference)  # exact float equality, every step


def test_corrupt_latest_checkpoint_falls_back(tmp_path, uninterrupted, tokenizer_file):
    reference, _ = uninterrupted
    recipe = write_recipe(tmp_path, data={"tokenizer": tokenizer_file}, run={"workdir": str(tmp_path / "run")})
    first = run("train", recipe, devices=1)
    assert first.returncode == 0, first.stderr[-3000:]
    damaged = 0
    for path in (tmp_path / "run" / "checkpoints" / "8" / "params").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            damaged += 1
    assert damaged
    again = run("train", recipe, devices=1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "checkpoint step 8" in again.stderr and "unreadable" in again.stderr
    assert "resumed from" in again.stderr and "step 6" in again.stderr
    # steps 7 and 8 are recomputed from the good checkpoint: the same losses as before
    assert losses(tmp_path / "run") == losses(reference)


def test_steps_between_logged_steps_never_read_from_the_device(tmp_path, tokenizer_file, uninterrupted,
                                                                monkeypatch):
    """The loop under ``STEP_TRANSFERS=disallow_explicit``, where every read of a device
    array (np.asarray, float, device_get: all go through ``ArrayImpl._value``) or wait
    (``block_until_ready``) fails, as the transfer guard does on an accelerator (on a CPU a
    read is no transfer, so the guard alone would not see it); only logged steps,
    evaluations and saves may read. It trains the losses of the uninterrupted run."""
    from jax._src import config as jax_config
    from jax._src.array import ArrayImpl

    from vist2_jax.config import load_config
    from vist2_jax.training import trainer

    def forbidden():
        if jax_config.transfer_guard_device_to_host.value == "disallow_explicit":
            raise AssertionError("a step between logged steps read from the device")

    value, wait = ArrayImpl._value, ArrayImpl.block_until_ready
    monkeypatch.setattr(ArrayImpl, "_value", property(lambda self: (forbidden(), value.fget(self))[1]))
    monkeypatch.setattr(ArrayImpl, "block_until_ready", lambda self: (forbidden(), wait(self))[1])
    monkeypatch.setattr(trainer, "STEP_TRANSFERS", "disallow_explicit")
    recipe = write_recipe(tmp_path, data={"tokenizer": tokenizer_file},
                          run={"workdir": str(tmp_path / "run"), "log_every": 4},
                          train={"checkpoint_every": 8, "eval_every": 8})
    result = trainer.train(load_config(recipe, ["mesh.fsdp=4", "mesh.tensor=2"]))  # 8 CPU devices (conftest)
    assert result.steps_done == 8
    logged, reference = losses(tmp_path / "run"), losses(uninterrupted[0])
    assert sorted(logged) == [1, 4, 8]
    for step, loss in logged.items():
        assert loss == pytest.approx(reference[step], rel=2e-5)
    assert result.summary["step_time_s_median"] > 0 and result.summary["text_tokens_per_s_median"] > 0


def test_sharded_8_devices_match_one_device(tmp_path, uninterrupted, tokenizer_file):
    reference, _ = uninterrupted
    recipe = write_recipe(tmp_path, data={"tokenizer": tokenizer_file}, run={"workdir": str(tmp_path / "run")},
                          mesh={"data": 1, "fsdp": 4, "tensor": 2})
    proc = run("train", recipe, devices=8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = losses(tmp_path / "run"), losses(reference)
    assert got.keys() == want.keys()
    np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], rtol=2e-5)


def test_two_processes_match_one_process_with_two_devices(tmp_path, tokenizer_file):
    """Losses, and the evaluations during training (OCR, memory, the collapse guard), whose
    outputs span both processes' devices (one device each: ``np.asarray`` of such an output
    failed with 'Fetching value for jax.Array that spans non-addressable devices'; in float32,
    as the demo computes on a CPU)."""
    evals = {"steps": 4, "eval_every": 4, "eval_tasks": ["ocr", "memory"], "eval_task_limit": 3}
    one = write_recipe(tmp_path, "one.yaml", data={"tokenizer": tokenizer_file}, train=evals, model={"dtype": "float32"},
                       run={"workdir": str(tmp_path / "one")}, mesh={"data": 1, "fsdp": 2, "tensor": 1})
    single = run("train", one, devices=2)
    assert single.returncode == 0, single.stderr[-3000:]
    two = write_recipe(tmp_path, "two.yaml", data={"tokenizer": tokenizer_file}, train=evals, model={"dtype": "float32"},
                       run={"workdir": str(tmp_path / "two")}, mesh={"data": 1, "fsdp": 2, "tensor": 1})
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "local.py"), "--processes", "2",
                           "--devices-per-process", "1", "--", sys.executable, "-m", "vist2_jax.cli.main",
                           "train", str(two)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got, want = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert got.keys() == want.keys() == {1, 2, 3, 4}
    # the same rows, in another order inside the global batch: equal up to summation order
    np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], rtol=1e-5)
    figures = ("eval_ocr_cer", "eval_ocr_cer_blank_sketch", "eval_memory_gain", "eval_memory_nll_true",
               "visual_spread")
    got, want = ({r["step"]: r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                  if "eval_ocr_cer" in r} for name in ("two", "one"))
    assert got.keys() == want.keys() == {0, 4}
    for step in (0, 4):
        np.testing.assert_allclose([got[step][k] for k in figures], [want[step][k] for k in figures], rtol=1e-4)


def _damage_all_checkpoints(workdir):
    for path in (workdir / "checkpoints").rglob("*"):
        if path.is_file() and "params" in path.parts and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_only_unreadable_checkpoints_are_refused_then_restart_moves_them_aside(tmp_path, uninterrupted,
                                                                              tokenizer_file):
    reference, _ = uninterrupted
    workdir = tmp_path / "run"
    recipe = write_recipe(tmp_path, data={"tokenizer": tokenizer_file}, run={"workdir": str(workdir)},
                          train={"keep_checkpoints": 2})
    first = run("train", recipe, devices=1)
    assert first.returncode == 0, first.stderr[-3000:]
    _damage_all_checkpoints(workdir)
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    refused = run("train", recipe, devices=1)
    assert refused.returncode == 2
    # one line per unreadable checkpoint and the refusal: nothing of Orbax's abandoned reads
    assert len(refused.stderr.strip().splitlines()) <= 3 and "Traceback" not in refused.stderr, refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert "no checkpoint can be read" in last and "step 8" in last and "--restart" in last
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before  # nothing deleted
    again = run("train", recipe, "--restart", devices=1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "moved to" in again.stderr and "fresh start" in again.stderr
    (aside,) = workdir.glob("previous-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == before
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)) and steps[0] == 0  # no step twice
    assert losses(workdir) == losses(reference)


def test_fresh_start_after_a_kill_before_the_first_save_logs_no_step_twice(tmp_path, tokenizer_file):
    workdir = tmp_path / "run"
    recipe = write_recipe(tmp_path, data={"tokenizer": tokenizer_file}, run={"workdir": str(workdir)},
                          train={"steps": 6, "checkpoint_every": 100})
    command, env = vist2("train", recipe, devices=1)
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_step(workdir, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = run("train", recipe, devices=1)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "fresh start at step 0" in again.stderr
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 6


def test_progress_says_what_it_does_before_the_first_step(tmp_path, tokenizer_file):
    recipe = write_recipe(tmp_path, data={"tokenizer": tokenizer_file}, run={"workdir": str(tmp_path / "run"),
                                                                             "progress": True},
                          train={"steps": 3})
    proc = run("train", recipe, devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    first_step = next(i for i, line in enumerate(lines) if "1/3" in line)
    assert any("compiling the train step" in line for line in lines[:first_step])
    assert any("building the data pipeline" in line for line in lines[:first_step])
    assert "eta nan" not in proc.stderr and "this one compiled" in lines[first_step]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["rows"] > 0 and "missing_glyphs" in summary["data_problems"]


def test_run_directory_on_a_bucket_trains_checkpoints_and_resumes(tmp_path, gcs_bucket, uninterrupted,
                                                                  tokenizer_file):
    """``run.workdir`` and ``data.tokenizer`` on ``gs://`` (a Cloud Storage emulator): the
    config copy, checkpoints, metrics, TensorBoard, sketches and summary land in the bucket;
    a run stopped by SIGTERM resumes from the bucket with the uninterrupted run's losses, bit
    for bit; generation loads the run from the bucket; nothing is written to local disk."""
    from vist2_jax import storage

    reference, _ = uninterrupted
    run_dir = storage.as_path(f"{gcs_bucket}/runs/{tmp_path.name}")
    tokenizer = storage.upload(tokenizer_file, f"{gcs_bucket}/tokenizers/{tmp_path.name}/tokenizer.model")
    recipe = write_recipe(tmp_path, data={"tokenizer": str(tokenizer)},
                          run={"workdir": str(run_dir), "progress": True})
    command, env = vist2("train", recipe, devices=1)
    proc = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stderr:  # the progress line of step 3, then a preemption
        if " 3/8 " in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, rest[-3000:]
    first_steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert first_steps and first_steps[-1] < 8

    resumed = run("train", recipe, devices=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir}/checkpoints at step {first_steps[-1]}" in resumed.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 8
    assert {r["step"]: r["loss"] for r in records if "loss" in r} == losses(reference)
    scalars = {}
    for events in sorted((run_dir / "tensorboard").iterdir()):  # one file per process, later ones win
        local = tmp_path / events.name
        local.write_bytes(events.read_bytes())
        scalars.update({step: values["loss"] for step, values in read_scalar_events(local) if "loss" in values})
    assert scalars == pytest.approx(losses(reference), rel=1e-6)
    assert json.loads((run_dir / "summary.json").read_text())["steps_done"] == 8
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["workdir"] == str(run_dir)
    assert (run_dir / "sketches" / "sketch_0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The river ran past the old mill and")
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    generated = run("generate", "--checkpoint", run_dir, "--prompt-file", prompt, "--max-new-tokens", 4, devices=1)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before  # reading a run writes nothing
    assert "gs:" not in os.listdir(tmp_path) and not (ROOT / "gs:").exists()  # no local 'gs:' folder
