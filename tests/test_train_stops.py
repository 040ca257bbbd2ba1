"""How a training run stops, through the CLI: SIGTERM / SIGINT save and exit 0, a NaN loss
stops with its step (or is skipped), the collapse guard stops after saving, and early
stopping keeps the lowest held-out loss and stays stopped."""

import json
import signal
import subprocess

import pytest

from train_cli import ROOT, run, tokenizer_file, vist2, wait_for_step, write_recipe  # noqa: F401 (fixtures)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_and_exits_zero(tmp_path, tokenizer_file, stop):
    """SIGTERM (preemption) and SIGINT (Ctrl-C) both save at the next step boundary, exit 0."""
    recipe = write_recipe(tmp_path, data={"tokenizer": tokenizer_file}, run={"workdir": str(tmp_path / "run")},
                          train={"steps": 200, "checkpoint_every": 100})
    command, env = vist2("train", recipe, devices=1)
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(tmp_path / "run", 3, proc)
    proc.send_signal(stop)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and f"preempted by {stop.name}" in stderr
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and 3 <= saved[-1] < 200


def test_nan_loss_stops_with_the_step(tmp_path, tokenizer_file):
    recipe = write_recipe(tmp_path, data={"tokenizer": tokenizer_file}, run={"workdir": str(tmp_path / "run")},
                          train={"learning_rate": 1e30, "grad_clip_norm": 0.0, "warmup_steps": 0})
    proc = run("train", recipe, devices=1)
    assert proc.returncode == 2
    assert "non-finite loss" in proc.stderr and "at step" in proc.stderr


def test_collapse_guard_stops_with_the_step_after_saving(tmp_path, tokenizer_file):
    """Any real visual_spread is below a threshold of 0.99: the first logged step stops."""
    recipe = write_recipe(tmp_path, data={"tokenizer": tokenizer_file}, run={"workdir": str(tmp_path / "run")},
                          train={"collapse_threshold": 0.99, "collapse_action": "stop"})
    proc = run("train", recipe, devices=1)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("vist2 train: error")]
    assert "step 1: visual_spread 0." in line and "checkpoint of step 1 saved" in line
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1] and 0 < records[1]["visual_spread"] < 0.99


def test_nan_stop_between_logged_steps_names_the_first_non_finite_step_and_saves_nothing(tmp_path, tokenizer_file):
    """Non-finite from step 2 on, read at the first logged step (4), which is also a save:
    the message names step 2 and no checkpoint holds the diverged state."""
    recipe = write_recipe(tmp_path, data={"tokenizer": tokenizer_file}, run={"workdir": str(tmp_path / "run"),
                                                                             "log_every": 4},
                          train={"learning_rate": 1e30, "grad_clip_norm": 0.0, "warmup_steps": 0,
                                 "checkpoint_every": 4})
    proc = run("train", recipe, devices=1)
    assert proc.returncode == 2
    assert "at step 2;" in proc.stderr and "last checkpoint: none" in proc.stderr
    assert not list((tmp_path / "run" / "checkpoints").glob("[0-9]*"))


def test_nan_policy_skip_keeps_going(tmp_path, tokenizer_file):
    recipe = write_recipe(tmp_path, data={"tokenizer": tokenizer_file}, run={"workdir": str(tmp_path / "run")},
                          train={"learning_rate": 1e30, "grad_clip_norm": 0.0, "warmup_steps": 0,
                                 "nan_policy": "skip", "steps": 4})
    proc = run("train", recipe, devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("finite") == 0.0 for r in records)


def test_keep_best_and_early_stop_keep_the_lowest_held_out_loss_and_stay_stopped(tmp_path, tokenizer_file):
    """train.keep_best saves every evaluation with its held-out loss and keeps the lowest
    beside the newest; train.early_stop_evals ends the run after that many evaluations
    without a better one (a learning rate of 3 makes the held-out loss climb), and the same
    command again trains nothing."""
    from vist2_jax.checkpointing.checkpoints import RunCheckpoints

    workdir = tmp_path / "run"
    recipe = write_recipe(tmp_path, data={"tokenizer": tokenizer_file}, run={"workdir": str(workdir)},
                          train={"steps": 40, "learning_rate": 3.0, "warmup_steps": 0, "eval_every": 1,
                                 "checkpoint_every": 40, "keep_checkpoints": 1, "keep_best": True,
                                 "early_stop_evals": 2})
    proc = run("train", recipe, devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    evals = {r["step"]: r["eval_loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
             if "eval_loss" in r and r["step"] > 0}
    best = min(evals, key=evals.get)
    assert summary["stopped_early"] and summary["steps_done"] == max(evals) == best + 2 < 40, evals
    assert summary["best_eval_step"] == best and summary["best_eval_loss"] == pytest.approx(evals[best])
    assert "train.early_stop_evals" in proc.stderr
    checkpoints = RunCheckpoints(workdir, keep=1000, async_save=False)
    try:  # the best and the newest, each with its held-out loss; nothing else
        assert [(step, m["eval_loss"], m["evals_since_best"]) for step, m in checkpoints.scored()] == [
            (best, pytest.approx(evals[best]), 0), (best + 2, pytest.approx(evals[best + 2]), 2)]
    finally:
        checkpoints.close()
    again = run("train", recipe, devices=1)
    assert again.returncode == 0 and "nothing to train" in again.stderr, again.stderr[-3000:]
    assert max(json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()) == best + 2
    # the next stage can start from the best step, not the newest
    follow = write_recipe(tmp_path, "follow.yaml", data={"tokenizer": tokenizer_file},
                          run={"workdir": str(tmp_path / "follow")},
                          train={"steps": 1, "warmup_steps": 0, "init_from": str(workdir / "checkpoints" / str(best))})
    proc = run("train", follow, devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"stage starts from {workdir / 'checkpoints' / str(best)} (step {best})" in proc.stderr
