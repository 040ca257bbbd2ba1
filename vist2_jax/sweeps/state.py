"""The state of a sweep's stages, read from their run folders through the path layer (a
bucket on pods), so any machine can ask. Beside the trainer's own files
(``summary.json``, ``metrics.jsonl``, ``checkpoints/``) the runner keeps per stage
``sweep_state.json`` (attempt, launcher, host and pid, heartbeat, outcome, wall time) and
the log of each attempt, ``logs/attempt-N.log``."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time

from vist2_jax import storage
from vist2_jax.sweeps.spec import Stage, Sweep

STATE_FILE = "sweep_state.json"
HEARTBEAT_S = 30.0  # the runner rewrites a running stage's state at least this often
STALE_S = 600.0  # a running state not rewritten for this long (another host) is taken as gone


def _read_json(path) -> dict | None:
    try:
        value = json.loads(storage.as_path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def summary(stage: Stage) -> dict | None:
    return _read_json(storage.as_path(stage.workdir) / "summary.json")


def finished(stage: Stage) -> bool:
    """True when the stage's final checkpoint and a summary.json of a whole, unpreempted run exist."""
    done = summary(stage)
    return bool(done and done.get("steps_done") == stage.steps and not done.get("preempted")
                and (storage.as_path(stage.workdir) / "checkpoints" / str(stage.steps)).exists())


def read_state(stage: Stage) -> dict:
    return _read_json(storage.as_path(stage.workdir) / STATE_FILE) or {}


def write_state(stage: Stage, **fields) -> dict:
    """Merge ``fields`` into the stage's state and stamp it (``updated``)."""
    state = {**read_state(stage), **fields, "updated": time.time()}
    storage.write_atomic(storage.as_path(stage.workdir) / STATE_FILE, json.dumps(state, indent=2))
    return state


def log_path(stage: Stage, attempt: int):
    return storage.as_path(stage.workdir) / "logs" / f"attempt-{attempt}.log"


def last_log_line(path) -> str:
    try:
        lines = [line.strip() for line in storage.as_path(path).read_bytes().decode("utf-8", "replace").splitlines()]
    except OSError:
        return "(no log)"
    return next((line for line in reversed(lines) if line), "(empty log)")


def metrics(stage: Stage) -> list[dict]:
    """The stage's metrics.jsonl records (unparsable lines skipped: a file being rewritten)."""
    path = storage.as_path(stage.workdir) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def alive(state: dict) -> bool:
    """A running state whose runner still runs: its pid on this host, else a fresh heartbeat."""
    if state.get("state") != "running":
        return False
    if state.get("host") == socket.gethostname() and state.get("pid"):
        try:
            os.kill(int(state["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return time.time() - float(state.get("updated", 0)) < STALE_S


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclasses.dataclass(frozen=True)
class StageStatus:
    kind: str  # pending | running | done | failed | stopped
    detail: str


def stage_status(stage: Stage, blocked_by: str = "") -> StageStatus:
    if finished(stage):
        state, done = read_state(stage), summary(stage) or {}
        return StageStatus("done", f"{stage.steps} steps, wall {_duration(state.get('wall_s', done.get('wall_s', 0)))}")
    state = read_state(stage)
    records = [r for r in metrics(stage) if "loss" in r]
    if alive(state):
        if not records:
            return StageStatus("running", f"starting (attempt {state.get('attempt', 1)}, {state.get('launcher')})")
        last = records[-1]
        times = [r["step_time_s"] for r in records[-5:] if "step_time_s" in r]
        eta = _duration((stage.steps - last["step"]) * sorted(times)[len(times) // 2]) if times else "?"
        return StageStatus("running", f"step {last['step']}/{stage.steps}, loss {last['loss']:.4f}, ETA {eta} "
                                      f"(attempt {state.get('attempt', 1)})")
    if state.get("state") == "failed":
        return StageStatus("failed", f"{last_log_line(state.get('log', ''))}  (log: {state.get('log')})")
    if records:
        return StageStatus("stopped", f"at step {records[-1]['step']}/{stage.steps}; the next `sweep run` resumes it")
    return StageStatus("pending", f"waits for {blocked_by}" if blocked_by else "")


def status_lines(sweep: Sweep) -> list[str]:
    """One line per variant and stage."""
    width = max(len(v.name) for v in sweep.variants)
    lines = []
    for variant in sweep.variants:
        before = ""
        for stage in variant.stages:
            status = stage_status(stage, before)
            lines.append(f"{variant.name:<{width}}  {stage.name:<16}{status.kind:<9}{status.detail}".rstrip())
            if status.kind != "done" and not before:
                before = f"{stage.name} ({status.kind})"
        lines.append("")
    return lines[:-1]
