"""Sweeps (vist2_jax/sweeps): grid expansion and validation, the launch commands of every
launcher, and with ``--launcher local`` on tiny stages: a runner SIGKILLed part-way and run
again retrains nothing that finished and resumes the interrupted stage; a failing stage
stops its own chain only and ``status`` names it with its log line; the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vist2_jax.config.schema import ConfigError
from vist2_jax.sweeps.spec import load_sweep
from conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.decoder.num_layers=1", "model.vision.num_layers=1", "model.decoder.vocab_size=768",
         "data.seq_len=128", "data.global_batch_size=2", "data.eval_rows=2", "train.eval_batches=1",
         "train.eval_tasks=[]", "train.warmup_steps=1", "run.log_every=1"]


def _write_sweep(folder: Path, body: str, stages: dict[str, str]) -> Path:
    for name, text in stages.items():
        (folder / f"{name}.yaml").write_text(text)
    path = folder / "sweep.yaml"
    path.write_text(body)
    return path


def _env() -> dict:
    """This interpreter's environment for ``vist2`` children, without the 8 forced devices of
    conftest (the stages run on one CPU device, as ``vist2 train`` would here)."""
    env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
    return {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _sweep(*args, timeout=600):
    env = _env()
    return subprocess.run([sys.executable, "-m", "vist2_jax.cli.main", "sweep", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_grid_expansion_names_chains_and_validates(tmp_path):
    path = _write_sweep(tmp_path, f"""
root: {tmp_path}/root
stages: [first, second]
overrides: [train.steps=3, train.warmup_steps=1]
grid:
  model.decoder.hidden_size: [64, 128]
  train.learning_rate: [1.0e-3, 3.0e-4]
names: {{train.learning_rate: lr}}
runs:
  - {{size: tiny}}
""", {"first": "data: {stage: ocr}\n", "second": "data: {stage: olm}\n"})
    sweep = load_sweep(path)
    names = [v.name for v in sweep.variants]
    assert names == ["tiny-w64_lr0.001", "tiny-w64_lr0.0003", "tiny-w128_lr0.001", "tiny-w128_lr0.0003"]
    variant = sweep.variants[3]
    first, second = variant.stages
    assert first.workdir == f"{tmp_path}/root/runs/tiny-w128_lr0.0003/first"
    assert second.config.train.init_from == first.workdir  # each stage starts from the one before
    assert second.config.data.tokenizer == f"{first.workdir}/tokenizer.model"  # the chain keeps one tokenizer
    assert (second.config.model.decoder.hidden_size, second.config.train.learning_rate) == (128, 3e-4)
    assert second.config.train.steps == 3
    assert len({s.workdir for s in sweep.stages()}) == 8
    assert [v.name for v in sweep.select(["model.decoder.hidden_size=64"]).variants] == names[:2]

    path.write_text(path.read_text().replace("model.decoder.hidden_size", "model.decoder.hiden_size"))
    with pytest.raises(ConfigError, match=r"model\.decoder\.hiden_size: unknown key \(did you mean 'hidden_size'"):
        load_sweep(path)
    proc = _sweep("run", path, "--dry-run")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "hiden_size" in proc.stderr


def test_launch_commands_of_every_launcher(tmp_path):
    runs = json.loads(_sweep(ROOT / "recipes" / "sweep.yaml", "--json").stdout)  # the old form still works
    assert len(runs) == 16 and runs[0]["command"].startswith("launch/tpu_pod.sh")
    path = _write_sweep(tmp_path, f"""
root: {tmp_path}/root
stages: [first]
runs:
  - {{size: tiny, tpu: t1, zone: z1, nodes: 2, image: img, topology: 2x2x1, workers: 1}}
""", {"first": "data: {stage: ocr}\n"})
    expected = {"local": "-m vist2_jax.cli.main train", "tpu": "launch/tpu_pod.sh --tpu t1 --zone z1 --",
                "slurm": "sbatch --parsable --nodes=2 launch/slurm.sbatch", "gke": "launch/gke.sh --name tiny-first"}
    for launcher, start in expected.items():
        proc = _sweep("run", path, "--launcher", launcher, "--dry-run")
        assert proc.returncode == 0, proc.stderr
        assert start in proc.stdout and f"run.workdir={tmp_path}/root/runs/tiny/first" in proc.stdout


@pytest.fixture(scope="module")
def killed_and_rerun(tmp_path_factory, sp_tokenizer):
    """Two variants x two stages; the runner is SIGKILLed while variant 2's first stage
    trains (after a checkpoint), then run again to the end."""
    folder = tmp_path_factory.mktemp("sweep")
    overrides = json.dumps([*SMALL, f"data.tokenizer={sp_tokenizer.path}"])
    path = _write_sweep(folder, f"""
root: {folder}/root
stages: [first, second]
retries: 1
overrides: {overrides}
grid:
  model.decoder.hidden_size: [32, 48]
runs:
  - {{size: tiny}}
""", {"first": "data: {stage: ocr}\ntrain: {steps: 40, checkpoint_every: 10, eval_every: 40}\n",
      "second": "data: {stage: olm}\ntrain: {steps: 3, checkpoint_every: 3, eval_every: 3}\n"})
    runs = folder / "root" / "runs"
    runner = subprocess.Popen([sys.executable, "-m", "vist2_jax.cli.main", "sweep", "run", str(path), "--poll-s", "0.2"],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    interrupted = runs / "tiny-w48" / "first"
    deadline = time.time() + 900
    while time.time() < deadline and runner.poll() is None:
        steps = [p.name for p in (interrupted / "checkpoints").glob("*") if p.name.isdigit()]
        if steps:
            break
        time.sleep(0.1)
    runner.send_signal(signal.SIGKILL)
    first_output = runner.communicate()[0]
    assert steps and "40" not in steps, f"not killed part-way ({steps}):\n{first_output}"
    before = {p: p.read_bytes() for p in (runs / "tiny-w32").glob("*/metrics.jsonl")}
    assert len(before) == 2, first_output
    rerun = _sweep("run", path, "--poll-s", "0.2")
    return {"path": path, "runs": runs, "before": before, "rerun": rerun}


def test_killed_runner_rerun_retrains_nothing_finished(killed_and_rerun):
    runs, rerun = killed_and_rerun["runs"], killed_and_rerun["rerun"]
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "[tiny-w32] first: finished, skipped" in rerun.stdout and "[tiny-w32] second: finished, skipped" in rerun.stdout
    for metrics, content in killed_and_rerun["before"].items():
        assert metrics.read_bytes() == content  # not retrained
        assert [p.name for p in (metrics.parent / "logs").iterdir()] == ["attempt-1.log"]
    interrupted = runs / "tiny-w48" / "first"
    second_attempt = (interrupted / "logs" / "attempt-2.log").read_text()
    assert "resumed from" in second_attempt and "fresh start" not in second_attempt
    steps = [json.loads(line)["step"] for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40
    status = _sweep("status", killed_and_rerun["path"])
    lines = [line for line in status.stdout.splitlines() if line.strip()]
    assert len(lines) == 4 and all(" done " in line for line in lines), status.stdout


def test_report_rows_plots_and_eval(killed_and_rerun, tmp_path):
    out = tmp_path / "report"
    proc = _sweep("report", killed_and_rerun["path"], "--out", out, "--only", "model.decoder.hidden_size=32",
                  "--eval", "ocr", "--eval-limit", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "report.json").read_text())
    assert [(r["variant"], r["stage"]) for r in rows] == [("tiny-w32", "first"), ("tiny-w32", "second")]
    for row in rows:
        assert row["status"] == "done" and row["params"] > 0 and row["tokens"] == row["steps"] * 2 * 128
        assert row["train_loss"] > 0 and row["val_loss"] > 0 and 0 <= row["ocr_cer"] <= 1  # --eval ocr ran
        assert row["wall_s"] > 0
    assert (killed_and_rerun["runs"] / "tiny-w32" / "first" / "eval" / "ocr.json").exists()
    report = (out / "report.md").read_text()
    assert "| tiny-w32 | second |" in report and "![loss_curves.png](loss_curves.png)" in report
    assert all((out / name).stat().st_size > 1000 for name in ("loss_curves.png", "vs_params.png"))


def test_failing_stage_stops_its_chain_only(tmp_path, sp_tokenizer):
    overrides = json.dumps([*SMALL, f"data.tokenizer={sp_tokenizer.path}"])
    path = _write_sweep(tmp_path, f"""
root: {tmp_path}/root
stages: [first, second]
retries: 1
overrides: {overrides}
runs:
  - {{size: tiny, name: broken, overrides: [data.source={tmp_path}/no_such_corpus]}}
  - {{size: tiny, name: fine}}
""", {"first": "data: {stage: ocr}\ntrain: {steps: 2, checkpoint_every: 2, eval_every: 2}\n",
      "second": "data: {stage: olm}\ntrain: {steps: 2, checkpoint_every: 2, eval_every: 2}\n"})
    proc = _sweep("run", path, "--poll-s", "0.2")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    broken = tmp_path / "root" / "runs" / "broken" / "first"
    assert sorted(p.name for p in (broken / "logs").iterdir()) == ["attempt-1.log", "attempt-2.log"]  # one retry
    assert not (tmp_path / "root" / "runs" / "broken" / "second").exists()
    assert "[broken] chain stopped at first; not started: second" in proc.stdout
    status = _sweep("status", path).stdout.splitlines()
    last_line = [line for line in (broken / "logs" / "attempt-2.log").read_text().splitlines() if line.strip()][-1]
    assert "no_such_corpus" in last_line
    failed = next(line for line in status if line.startswith("broken") and " first " in line)
    assert " failed " in failed and last_line.strip() in failed and str(broken / "logs" / "attempt-2.log") in failed
    assert any(line.startswith("broken") and " second " in line and "waits for first (failed)" in line
               for line in status)
    assert sum(line.startswith("fine") and " done " in line for line in status) == 2, proc.stdout + "\n".join(status)
