"""The training loop: mesh, sharded state, data, steps, metrics, eval, checkpoints, signals.

One program on every host (JAX multi-controller). Resume is exact: the state and the
Grain iterator come back from the newest readable checkpoint, and every later step is the
same compiled program on the same rows. SIGTERM (preemption) saves at the next step
boundary and returns normally.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import yaml

from data_pipelines.pipeline import build_pipeline
from vist2_jax.config.loader import to_dict
from vist2_jax.config.schema import Config, ConfigError
from vist2_jax.model.vist2 import Vist2Model, abstract_params, example_batch
from vist2_jax.row_contract import TEXT
from vist2_jax.parallel.sharding import LOGICAL_AXIS_RULES, logical_shardings, make_mesh, replicated
from vist2_jax.training.checkpoint import RunCheckpoints, restore_params, tokenizer_asset
from vist2_jax.training.distributed import batch_sharding, global_batch
from vist2_jax.training.flops import train_step_flops
from vist2_jax.training.metrics import MetricsLogger
from vist2_jax.training.optimizer import learning_rate_schedule, make_optimizer
from vist2_jax.training.step import make_eval_step, make_train_step

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A non-finite loss under ``train.nan_policy=stop``; the message names the step."""


@dataclasses.dataclass
class TrainResult:
    workdir: Path
    steps_done: int
    preempted: bool
    summary: dict
    pipeline: Any = None  # the run's data pipeline (tokenizer, row makers), for callers to reuse


class _Preemption:
    """Turns SIGTERM into a flag the loop checks at each step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("SIGTERM received: saving a checkpoint at the next step boundary")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def abstract_state(config: Config, mesh):
    """(optimizer, abstract state with shardings, shardings) from one abstract init."""
    boxed = abstract_params(config.model)
    param_shardings = logical_shardings(boxed, mesh)
    params = nn.unbox(boxed)
    optimizer = make_optimizer(config.train, params)  # labels need only the tree structure
    opt_state = jax.eval_shape(optimizer.init, params)
    opt_shardings = optimizer_state_shardings(opt_state, params, param_shardings, replicated(mesh))
    shardings = {"step": replicated(mesh), "params": param_shardings, "opt_state": opt_shardings}
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params, "opt_state": opt_state}
    abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract, shardings)
    return optimizer, abstract, shardings


def jitted_steps(config: Config, optimizer, shardings, mesh):
    """The jitted train step (state donated) and eval step with the run's shardings; used by
    :func:`train` and by ``vist2 aot`` (which lowers them on abstract inputs)."""
    data_sharding = batch_sharding(mesh)
    train_step = jax.jit(make_train_step(config, optimizer), in_shardings=(shardings, data_sharding),
                         out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(config), in_shardings=(shardings["params"], data_sharding),
                        out_shardings=replicated(mesh))
    return train_step, eval_step


def optimizer_state_shardings(opt_state, params, param_shardings, default):
    """Shard each optimizer-state leaf like the parameter it mirrors (Adam's mu and nu).

    A leaf mirrors a parameter when the parameter's tree path is a suffix of the leaf's
    path and the shapes agree; anything else (step counts) gets ``default``.
    """
    by_path = {}
    for (path, param), (_, sharding) in zip(jax.tree_util.tree_leaves_with_path(params),
                                            jax.tree_util.tree_leaves_with_path(param_shardings)):
        by_path[tuple(str(k) for k in path)] = (param.shape, sharding)

    def pick(path, leaf):
        keys = tuple(str(k) for k in path)
        for start in range(len(keys)):
            found = by_path.get(keys[start:])
            if found is not None and found[0] == getattr(leaf, "shape", None):
                return found[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def _host_metrics(metrics: dict) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def train(config: Config) -> TrainResult:
    workdir = Path(config.run.workdir)
    is_chief = jax.process_index() == 0
    if is_chief:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    mesh = make_mesh(config.mesh)
    pipeline = build_pipeline(config, workdir, jax.process_index(), jax.process_count())
    optimizer, abstract, shardings = abstract_state(config, mesh)
    checkpoints = RunCheckpoints(workdir, keep=config.train.keep_checkpoints)
    logger = MetricsLogger(workdir, config.train.steps, enabled=is_chief, progress=config.run.progress,
                           label=f"{config.data.stage}")
    schedule = learning_rate_schedule(config.train)

    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        train_step, eval_step = jitted_steps(config, optimizer, shardings, mesh)
        iterator = iter(pipeline.train_dataset())
        restored = checkpoints.restore_latest(abstract, iterator)
        if restored is not None:
            start, state = restored
            state = {"step": jnp.asarray(start, jnp.int32), **state}
            log.info("resumed from %s step %d", checkpoints.directory, start)
            logger.truncate_after(start)
        else:
            start = 0
            state = _initial_state(config, optimizer, abstract, shardings)
        eval_batches = [global_batch(b, mesh) for b in pipeline.eval_batches()]

        def evaluate() -> float:
            losses, weights = [], []
            for batch in eval_batches[:config.train.eval_batches]:
                m = _host_metrics(eval_step(state["params"], batch))
                losses.append(m["loss"] * m["target_tokens"])
                weights.append(m["target_tokens"])
            return sum(losses) / max(sum(weights), 1.0)

        summary: dict[str, Any] = {"stage": config.data.stage, "start_step": start}
        if start == 0:
            summary["eval_loss_start"] = evaluate()
            logger.log(0, {"eval_loss": summary["eval_loss_start"]})
        step_times, text_rates, losses = [], [], []
        preempted = False
        wall_start = time.time()
        with _Preemption() as preemption:
            for step in range(start, config.train.steps):
                local = next(iterator)
                batch = global_batch(local, mesh)
                t0 = time.perf_counter()
                state, metrics = train_step(state, batch)
                metrics = _host_metrics(metrics)
                elapsed = time.perf_counter() - t0
                done = step + 1
                if not metrics["finite"]:
                    if config.train.nan_policy == "stop":
                        checkpoints.close()
                        raise TrainingDiverged(f"non-finite loss {metrics['loss']} at step {done}; "
                                               f"last checkpoint: {checkpoints.steps()[-1:] or 'none'}")
                    log.warning("step %d: non-finite loss, update skipped", done)
                losses.append(metrics["loss"])
                if step > start:  # the first step of a process includes compilation
                    step_times.append(elapsed)
                text_tokens = float((local["modality"] == TEXT).sum()) * jax.process_count()
                text_rates.append(text_tokens / elapsed)
                last = done == config.train.steps
                if done % config.run.log_every == 0 or last or done == start + 1:
                    flops = train_step_flops(config, local)
                    step_flops = flops["train_step"] * jax.process_count()
                    record = {**metrics, "learning_rate": float(schedule(step)), "step_time_s": elapsed,
                              "text_tokens_per_s": text_tokens / elapsed,
                              "decoder_tokens_per_s": config.data.global_batch_size * config.data.seq_len / elapsed,
                              "model_flops_per_step": step_flops, "model_tflops_per_s": step_flops / elapsed / 1e12}
                    if config.train.peak_tflops_per_device > 0:
                        record["mfu"] = step_flops / elapsed / 1e12 / (config.train.peak_tflops_per_device
                                                                       * jax.device_count())
                    if done % config.train.eval_every == 0 or last:
                        record["eval_loss"] = evaluate()
                    logger.log(done, record)
                    if "eval_loss" in record:
                        summary["eval_loss_end"] = record["eval_loss"]
                if preemption.requested or done % config.train.checkpoint_every == 0 or last:
                    _save(checkpoints, done, state, iterator, config, pipeline, force=preemption.requested)
                if preemption.requested:
                    preempted = True
                    log.warning("preempted: checkpoint of step %d saved, exiting", done)
                    break
        checkpoints.close()
        logger.close()
    steps_done = done if config.train.steps > start else start
    summary.update({
        "steps_done": steps_done, "preempted": preempted, "wall_s": time.time() - wall_start,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "step_time_s_median": statistics.median(step_times) if step_times else None,
        "text_tokens_per_s_median": statistics.median(text_rates) if text_rates else None,
    })
    if is_chief:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return TrainResult(workdir, steps_done, preempted, summary, pipeline)


def _initial_state(config, optimizer, abstract, shardings):
    if config.train.init_from:
        step, params = restore_params(config.train.init_from, abstract["params"])
        log.info("stage starts from %s (step %d)", config.train.init_from, step)
    else:
        model = Vist2Model(config.model)
        example = example_batch(config.model, 1, config.data.seq_len, config.data.images_per_row)
        init = jax.jit(lambda rng: nn.unbox(model.init(rng, example)), out_shardings=shardings["params"])
        params = init(jax.random.key(config.run.seed))
        params = _load_hf_components(config, params, shardings["params"])
    make = jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": optimizer.init(p)},
                   in_shardings=(shardings["params"],), out_shardings=shardings)
    return make(params)


def _shapes(tree) -> dict[str, tuple]:
    return {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _load_hf_components(config, params, shardings):
    """Replace the decoder / vision tower of fresh params with Hugging Face weights."""
    from vist2_jax.convert.hf_mapping import QWEN3_DECODER, SIGLIP2_VISION, SIGLIP_VISION, import_hf
    from vist2_jax.convert.safetensors_io import read_checkpoint_dir

    for folder, component in ((config.train.init_decoder_hf, "decoder"), (config.train.init_vision_hf, "vision")):
        if not folder:
            continue
        if component == "decoder":
            table = QWEN3_DECODER
        else:
            hf_config = json.loads((Path(folder) / "config.json").read_text())
            table = SIGLIP2_VISION if "siglip2" in hf_config.get("model_type", "") else SIGLIP_VISION
        try:
            loaded = import_hf(table, read_checkpoint_dir(folder), config.model)["params"][component]
        except (KeyError, ValueError, OSError) as err:
            raise ConfigError(f"train.init_{component}_hf: {folder}: {err}") from None
        want, got = _shapes(params["params"][component]), _shapes(loaded)
        if want != got:
            first = next(k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k))
            raise ConfigError(f"train.init_{component}_hf: {folder} does not fit model.{component}: "
                             f"{first} is {got.get(first)} there, {want.get(first)} here")
        params["params"][component] = jax.device_put(loaded, shardings["params"][component])
        log.info("model.%s initialised from %s", component, folder)
    return params


def _save(checkpoints, step, state, iterator, config, pipeline, force=False):
    renderer = pipeline.row_maker.renderer.renderer_config()
    checkpoints.save(step, state, iterator, to_dict(config), tokenizer_asset(pipeline.tokenizer),
                     renderer, force=force)
    if force:
        checkpoints.wait()
