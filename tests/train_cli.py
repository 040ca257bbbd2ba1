"""Shared by the CLI training tests (test_train.py, test_train_stops.py): a tiny recipe,
``vist2 train`` as a subprocess on N forced CPU devices, the losses a run logged, and two
module fixtures: one tokenizer for every run, and one uninterrupted 8-step run to compare
resumed, sharded and bucket runs with."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import xla_flags

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "preset": "tiny",
    "model": {"decoder": {"num_layers": 2}, "vision": {"num_layers": 2}},
    "data": {"stage": "olm", "seq_len": 256, "global_batch_size": 4, "images_per_row": 4, "eval_rows": 4},
    "train": {"steps": 8, "warmup_steps": 2, "eval_every": 4, "checkpoint_every": 2, "eval_batches": 1},
    "run": {"log_every": 1, "progress": False},
}


def write_recipe(tmp_path, name="recipe.yaml", **sections):
    recipe = json.loads(json.dumps(BASE))
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return path


def vist2(*args, devices=8, **kwargs):
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices), "JAX_PLATFORMS": "cpu"}
    return [sys.executable, "-m", "vist2_jax.cli.main", *map(str, args)], env


def run(*args, devices=8, timeout=600):
    command, env = vist2(*args, devices=devices)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def losses(workdir):
    records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """One tokenizer shared by every run here (trained once on the embedded corpus)."""
    from data_pipelines.pipeline import resolve_tokenizer
    from vist2_jax.config import load_config

    workdir = tmp_path_factory.mktemp("tok")
    return str(resolve_tokenizer(load_config(), workdir).path)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer_file):
    tmp = tmp_path_factory.mktemp("full")
    recipe = write_recipe(tmp, data={"tokenizer": tokenizer_file}, run={"workdir": str(tmp / "run")})
    proc = run("train", recipe, devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", proc


def wait_for_step(workdir, step, proc, timeout=300):
    deadline = time.time() + timeout
    metrics = Path(workdir) / "metrics.jsonl"
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step and "loss" in line
                                    for line in metrics.read_text().splitlines() if line.strip()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} never logged")
