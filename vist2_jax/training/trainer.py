"""The training loop: data, compiled steps, metrics, eval, checkpoints, signals.

One program on every host (JAX multi-controller). Resume is exact: the state and the
Grain iterator come back from the newest readable checkpoint, and every later step is the
same compiled program on the same rows. SIGTERM (preemption) and SIGINT (Ctrl-C) save at
the next step boundary and return normally. A run directory whose checkpoints are all
unreadable is refused unless ``restart`` is asked for, which moves them aside (nothing is
deleted). The run directory may be local or ``gs://`` (every file goes through
``vist2_jax.storage``), so all hosts of a pod write one run.

The device stays busy: metrics, the NaN policy's check and the collapse guard are read
only on logged steps and before saves (``_reads_device``); other steps are dispatched and
the next batch is fetched and placed while they run. Step time is the interval between
logged steps over their count.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import signal
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import yaml
from etils import epath

from data_pipelines.pipeline import build_pipeline
from vist2_jax import storage
from vist2_jax.checkpointing.checkpoints import RunCheckpoints, tokenizer_asset
from vist2_jax.config.loader import to_dict
from vist2_jax.config.schema import Config, ConfigError
from vist2_jax.evaluation.during_training import CollapseGuard, TrainingEval
from vist2_jax.parallel.sharding import LOGICAL_AXIS_RULES, make_mesh
from vist2_jax.training.distributed import global_batch
from vist2_jax.training.flops import global_text_tokens, step_record
from vist2_jax.training.metrics import MetricsLogger
from vist2_jax.training.optimizer import learning_rate_schedule
from vist2_jax.training.state import abstract_state, initial_state
from vist2_jax.training.step import jitted_steps

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A non-finite loss under ``train.nan_policy=stop``; the message names the step."""


class TrainingCollapsed(TrainingDiverged):
    """``visual_spread`` below ``train.collapse_threshold`` under ``train.collapse_action=stop``
    (a checkpoint of that step is saved first); the message names the step and the value."""


@dataclasses.dataclass
class TrainResult:
    workdir: epath.Path
    steps_done: int
    preempted: bool
    summary: dict


class _StopRequests:
    """Turns SIGTERM (preemption) and SIGINT (Ctrl-C) into a flag checked at each step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, nothing to restore
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint at the next step boundary", self.requested)

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _host_metrics(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


# The loop's device->host transfer guard outside _reads_device(): "disallow_explicit" makes
# any read between logged steps an error (the tests do; on a CPU they check reads themselves).
STEP_TRANSFERS = "allow"


def _reads_device():
    """Marks where the loop may wait for the device and read from it: logged steps,
    evaluation and checkpoint saves. Elsewhere a step is only dispatched."""
    return jax.transfer_guard_device_to_host("allow")


@jax.jit
def _track(carry: dict, metrics: dict, step) -> dict:
    """On the device: the first non-finite step (0: none), its loss, and the count."""
    bad = metrics["finite"] == 0
    first = (carry["first_step"] == 0) & bad
    return {"first_step": jnp.where(first, step, carry["first_step"]),
            "first_loss": jnp.where(first, metrics["loss"], carry["first_loss"]),
            "nonfinite_steps": carry["nonfinite_steps"] + bad.astype(jnp.int32)}


class _Health:
    """Non-finite steps, tracked on the device every step and read only when the loop reads
    anyway (``check`` at logged steps and before every save): ``nan_policy=stop`` raises
    there naming the first non-finite step, before a diverged state is logged or saved;
    ``skip`` (the step already skipped the update on the device) warns with the count."""

    def __init__(self, nan_policy: str):
        self.nan_policy, self.reported = nan_policy, 0
        self.carry = {"first_step": np.int32(0), "first_loss": np.float32(0), "nonfinite_steps": np.int32(0)}
        self.values = {"first_step": 0, "first_loss": 0.0, "nonfinite_steps": 0}

    def update(self, metrics: dict, step: int) -> None:
        self.carry = _track(self.carry, metrics, step)

    def check(self, checkpoints) -> None:
        self.values = {k: v.item() for k, v in jax.device_get(self.carry).items()}
        if self.values["first_step"] and self.nan_policy == "stop":
            checkpoints.close()
            raise TrainingDiverged(f"non-finite loss {self.values['first_loss']} at step {self.values['first_step']}; "
                                   f"last checkpoint: {checkpoints.steps()[-1:] or 'none'}")
        new = self.values["nonfinite_steps"] - self.reported
        if new:
            log.warning("%d more step(s) with a non-finite loss (first at step %d), updates skipped", new,
                        self.values["first_step"])
            self.reported = self.values["nonfinite_steps"]

    def record(self) -> dict:
        return {"nonfinite_steps": self.values["nonfinite_steps"]}


def _set_aside(workdir: epath.Path, checkpoints: RunCheckpoints) -> epath.Path:
    """Move unreadable checkpoints and the metrics of that attempt into ``previous-<time>/``."""
    aside = workdir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for name in ("checkpoints", "metrics.jsonl", "tensorboard", "summary.json"):
        if (workdir / name).exists():
            storage.move(workdir / name, aside / name)
    return aside


def _restore_or_refuse(checkpoints: RunCheckpoints, abstract, iterator, workdir: epath.Path, restart: bool):
    """(start step, restored state or None). Refuses a directory of only unreadable checkpoints."""
    restored = checkpoints.restore_latest(abstract, iterator)
    if restored is not None or not checkpoints.steps():
        return restored
    reasons = "; ".join(f"step {s}: {r}" for s, r in sorted(checkpoints.unreadable.items()))
    if not restart:
        checkpoints.close()
        raise ConfigError(f"{checkpoints.directory}: no checkpoint can be read ({reasons}); "
                          "rerun with --restart to move them aside and start from step 0")
    return None


def _save_sample_sketches(pipeline, workdir: epath.Path, count: int = 4) -> None:
    """The first evaluation row's sketches as PNGs: what the ViT of this run reads."""
    from PIL import Image

    row = pipeline.eval_maker(0)
    (workdir / "sketches").mkdir(exist_ok=True)
    for slot in range(min(count, int(row["image_mask"].sum()))):
        png = io.BytesIO()
        Image.fromarray(row["images"][slot]).save(png, format="PNG")
        storage.write_atomic(workdir / "sketches" / f"sketch_{slot}.png", png.getvalue())


def train(config: Config, restart: bool = False) -> TrainResult:
    workdir = storage.as_path(config.run.workdir)
    is_chief = jax.process_index() == 0
    logger = MetricsLogger(workdir, config.train.steps, enabled=is_chief, progress=config.run.progress,
                           label=f"{config.data.stage}")
    if jax.process_count() > 1 and not storage.is_remote(workdir):
        log.warning("run.workdir=%s is on local disk and %d hosts write it: unless that is a shared "
                    "filesystem, checkpoints and metrics split across hosts and are lost with the slice; "
                    "use a bucket (gs://BUCKET/...)", workdir, jax.process_count())
    if is_chief:
        workdir.mkdir(parents=True, exist_ok=True)
        storage.write_atomic(workdir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    mesh = make_mesh(config.mesh)
    logger.status("building the data pipeline")
    pipeline = build_pipeline(config, workdir, jax.process_index(), jax.process_count())
    optimizer, abstract, shardings = abstract_state(config, mesh)

    def open_checkpoints() -> RunCheckpoints:  # again after --restart moves unreadable ones aside
        return RunCheckpoints(workdir, keep=config.train.keep_checkpoints, keep_best=config.train.keep_best)

    checkpoints = open_checkpoints()
    schedule = learning_rate_schedule(config.train)

    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        train_step, eval_step = jitted_steps(config, optimizer, shardings, mesh)
        iterator = iter(pipeline.train_dataset())
        restored = _restore_or_refuse(checkpoints, abstract, iterator, workdir, restart)
        if restored is not None:
            start, state = restored
            state = {"step": jnp.asarray(start, jnp.int32), **state}
            logger.status(f"resumed from {checkpoints.directory} at step {start}")
        else:
            if checkpoints.steps() and is_chief:
                checkpoints.close()
                logger.status(f"--restart: unreadable checkpoints moved to {_set_aside(workdir, checkpoints)}")
                checkpoints = open_checkpoints()
            start = 0
            iterator = iter(pipeline.train_dataset())  # a failed restore may have moved the old one
            logger.status(f"fresh start at step 0 (no checkpoint in {checkpoints.directory})")
            state = initial_state(config, optimizer, abstract, shardings)
        logger.start(start)
        try:
            if is_chief:
                _save_sample_sketches(pipeline, workdir)
            eval_batches = [global_batch(b, mesh) for b in pipeline.eval_batches()]

            def evaluate() -> float:
                losses, weights = [], []
                for batch in eval_batches[:config.train.eval_batches]:
                    m = _host_metrics(eval_step(state["params"], batch))
                    losses.append(m["loss"] * m["target_tokens"])
                    weights.append(m["target_tokens"])
                return sum(losses) / max(sum(weights), 1.0)

            task_eval = TrainingEval(config, pipeline.tokenizer) if config.train.eval_tasks else None
            guard = CollapseGuard(config, pipeline.eval_maker)
            summary: dict = {"stage": config.data.stage, "start_step": start}
            if start == 0:
                logger.status("compiling the eval step")
                summary["eval_loss_start"] = evaluate()
                logger.log(0, {"eval_loss": summary["eval_loss_start"],
                               **(task_eval(state["params"]) if task_eval else {}),
                               **({"visual_spread": guard(state["params"])} if guard.active else {})})
            step_times, text_rates, losses = [], [], []
            stopped_by = None
            # train.keep_best / early_stop_evals: the best (step, eval_loss) saved so far, and how many
            # evaluations since; a resumed run that had already stopped early stays stopped
            scored = checkpoints.scored()
            best = min(((step, m["eval_loss"]) for step, m in scored), key=lambda item: item[1]) if scored else None
            stale = int(scored[-1][1].get("evals_since_best", 0)) if scored else 0
            stopped_early = bool(config.train.early_stop_evals) and stale >= config.train.early_stop_evals
            if stopped_early:
                logger.status(f"stopped early before (best held-out loss {best[1]:.4f} at step {best[0]}): "
                              "nothing to train")
            done = start
            wall_start = time.time()
            health = _Health(config.train.nan_policy)
            end = start if stopped_early else config.train.steps
            local = next(iterator) if start < end else None
            clock, since, interval_text = time.perf_counter(), start, 0.0
            with _StopRequests() as stop, jax.transfer_guard_device_to_host(STEP_TRANSFERS):
                for step in range(start, end):
                    # Between logged steps nothing here waits for the device: the step is
                    # dispatched, and the next batch is read and placed while it runs.
                    if step == start:
                        logger.status("compiling the train step (the first step includes it)")
                    state, metrics = train_step(state, global_batch(local, mesh))
                    health.update(metrics, step + 1)
                    interval_text += global_text_tokens(local)
                    done = step + 1
                    last = done == config.train.steps
                    logged = done % config.run.log_every == 0 or last or done == start + 1
                    evaluated = logged and (done % config.train.eval_every == 0 or last)
                    scheduled = (done % config.train.checkpoint_every == 0 or last
                                 or (config.train.keep_best and evaluated))
                    if logged or scheduled or stop.requested:
                        with _reads_device():
                            health.check(checkpoints)  # never log past, nor save, a diverged state
                            if logged:
                                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                                elapsed = (time.perf_counter() - clock) / (done - since)  # blocked above
                                if since > start:  # the first interval includes compilation
                                    step_times.append(elapsed)
                                    text_rates.append(interval_text / (elapsed * (done - since)))
                                losses.append(metrics["loss"])
                                record = {**metrics, **health.record(), "learning_rate": float(schedule(step)),
                                          **step_record(config, local, elapsed),
                                          "text_tokens_per_s": interval_text / (elapsed * (done - since)),
                                          **pipeline.counters()}
                                if evaluated:
                                    record["eval_loss"] = summary["eval_loss_end"] = evaluate()
                                    record.update(task_eval(state["params"]) if task_eval else {})
                                    if best is None or record["eval_loss"] < best[1]:
                                        best, stale = (done, record["eval_loss"]), 0
                                    else:
                                        stale += 1
                                collapsed = None
                                if guard.active:
                                    record["visual_spread"] = guard(state["params"])
                                    collapsed = guard.check(done, record["visual_spread"])
                                    if collapsed:
                                        log.warning("%s", collapsed)
                                logger.log(done, record)
                                if collapsed and config.train.collapse_action == "stop":
                                    _save(checkpoints, done, state, iterator, config, pipeline, force=True)
                                    logger.flush()
                                    checkpoints.close()
                                    raise TrainingCollapsed(f"{collapsed}; stopped (train.collapse_action=stop), "
                                                            f"checkpoint of step {done} saved")
                            requested = stop.requested  # read once: a later signal is seen next step
                            if requested or scheduled:
                                score = {"eval_loss": record["eval_loss"], "evals_since_best": stale} \
                                    if config.train.keep_best and evaluated else None
                                _save(checkpoints, done, state, iterator, config, pipeline, force=bool(requested),
                                      metrics=score)
                                logger.flush()
                            if requested:
                                stopped_by = requested
                                logger.status(f"{requested}: checkpoint of step {done} saved, exiting")
                                break
                            if config.train.early_stop_evals and evaluated and stale >= config.train.early_stop_evals \
                                    and not last:
                                stopped_early = True
                                logger.status(f"held-out loss {record['eval_loss']:.4f}: no better than step "
                                              f"{best[0]}'s {best[1]:.4f} for {stale} evaluations "
                                              f"(train.early_stop_evals); stopping at step {done}")
                                break
                            clock, since, interval_text = time.perf_counter(), done, 0.0
                    if not last:  # after the save: the saved iterator state must not include it
                        local = next(iterator)
            checkpoints.close()
        finally:  # metrics on an object store are uploaded on close
            logger.close()
    counters = pipeline.counters()
    if any(counters.values()):
        log.info("data counters: %s", json.dumps(counters))
    summary.update({
        "steps_done": done, "preempted": stopped_by is not None, "stopped_by": stopped_by,
        "stopped_early": stopped_early,
        # only where train.keep_best kept that step's checkpoint
        **({"best_eval_step": best[0], "best_eval_loss": best[1]} if best and config.train.keep_best else {}),
        "wall_s": time.time() - wall_start,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "step_time_s_median": statistics.median(step_times) if step_times else None,
        "text_tokens_per_s_median": statistics.median(text_rates) if text_rates else None,
        "data": counters, "data_problems": pipeline.problems(),
    })
    if is_chief:
        storage.write_atomic(workdir / "summary.json", json.dumps(summary, indent=2))
    return TrainResult(workdir, done, stopped_by is not None, summary)


def _save(checkpoints, step, state, iterator, config, pipeline, force=False, metrics=None):
    renderer = pipeline.row_maker.renderer.renderer_config()
    checkpoints.save(step, state, iterator, to_dict(config), tokenizer_asset(pipeline.tokenizer),
                     renderer, force=force, metrics=metrics)
    if force:
        checkpoints.wait()
