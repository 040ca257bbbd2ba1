"""Where metrics go: ``metrics.jsonl`` (one JSON object per logged step), TensorBoard event
files (through ``tensorboardX``, no TensorFlow needed), and progress lines on the console.
The run directory may be local or ``gs://``: both files go through ``vist2_jax.storage``
(on an object store ``metrics.jsonl`` is uploaded at most every 30 s, TensorBoard every 60 s,
both with every checkpoint and on close).

On resume, records past the restored step are dropped from ``metrics.jsonl`` and
TensorBoard is told to purge them (``purge_step``), so no step appears twice. The ETA
counts step time only: compile time and start-up are reported as such, not averaged in.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Mapping

from tensorboardX import SummaryWriter

from vist2_jax import storage

log = logging.getLogger(__name__)


class MetricsLogger:
    """metrics.jsonl + TensorBoard + a console progress line, for host 0 only."""

    def __init__(self, workdir: storage.PathLike, total_steps: int, enabled: bool = True,
                 progress: bool = True, label: str = "train"):
        self.enabled, self.total, self.label, self.progress = enabled, total_steps, label, progress
        self._clock: tuple[int, float] | None = None  # (step, time) once the first step has run
        self._tensorboard: SummaryWriter | None = None
        self.workdir = storage.as_path(workdir)
        self.jsonl: storage.AppendFile | None = None

    def status(self, message: str) -> None:
        """A line for work before or between steps (building the pipeline, compiling, resuming):
        on the console with the progress lines, else in the log."""
        if not self.enabled:
            return
        if self.progress:
            print(f"{self.label}: {message}", file=sys.stderr, flush=True)
        else:
            log.info("%s: %s", self.label, message)

    def start(self, step: int) -> None:
        """Open the sinks for a run that continues after ``step`` (0: a fresh start)."""
        if not self.enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.jsonl = storage.AppendFile(self.workdir / "metrics.jsonl")
        lines = self.jsonl.read_lines()
        if lines:  # a fresh start keeps nothing, a resume keeps steps <= step
            self.jsonl.replace_lines([line for line in lines if step and line.strip()
                                      and json.loads(line).get("step", 0) <= step])
        # an object is rewritten whole on each flush: less often on a bucket
        self._tensorboard = storage.tensorboard_writer(self.workdir / "tensorboard", purge_step=step + 1 if step else 0,
                                                       flush_secs=60 if self.jsonl.remote else 10)

    def log(self, step: int, record: Mapping[str, float | int | str]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **record}
        self.jsonl.append(json.dumps(record))
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                self._tensorboard.add_scalar(key, float(value), global_step=step)
        if not self.jsonl.remote:
            self._tensorboard.flush()
        if self.progress and "loss" in record:
            self._progress(step, record)

    def _progress(self, step: int, record: Mapping) -> None:
        done = step / max(self.total, 1)
        bar = "#" * int(24 * done) + "-" * (24 - int(24 * done))
        parts = [f"{self.label} [{bar}] {step}/{self.total}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("eval_loss", "eval {:.4f}"),
                         ("text_tokens_per_s", "{:.0f} text tok/s"), ("step_time_s", "{:.3f} s/step")):
            if key in record:
                parts.append(fmt.format(record[key]))
        now = time.time()
        if self._clock is None:  # this step included compilation: no rate yet
            self._clock = (step, now)
            parts.append("eta after the next logged step (this one compiled)")
        elif step > self._clock[0]:
            per_step = (now - self._clock[1]) / (step - self._clock[0])
            parts.append(f"eta {per_step * (self.total - step):.0f}s")
        print("  ".join(parts), file=sys.stderr, flush=True)

    def flush(self) -> None:
        """Make every logged record durable (called with each checkpoint, so a run killed
        later resumes with its metrics up to the checkpoint intact, on a bucket too)."""
        if self.jsonl is not None:
            self.jsonl.flush()
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
