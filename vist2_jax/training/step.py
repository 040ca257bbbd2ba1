"""The sharded train and eval steps (pure functions of state and batch).

State is ``{"step", "params", "opt_state"}`` with fp32 master weights; the model computes
in ``model.dtype`` (bf16 by default). The global batch is split into
``grad_accum_steps`` micro-batches scanned with fp32 gradient accumulation; the gradient
is the mean of the micro-batches' mean-loss gradients, while the reported metrics are
exact token-weighted means over the whole batch (accumulated as sums).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from vist2_jax.config.schema import Config, component_of
from vist2_jax.model.vist2 import Vist2Model
from vist2_jax.row_contract import TEXT, VISUAL
from vist2_jax.training.optimizer import learning_rate_schedule

STATE_KEYS = ("step", "params", "opt_state")


def _freeze(params: Any, trainable: tuple[str, ...]) -> Any:
    return {"params": {name: sub if component_of(name) in trainable else jax.lax.stop_gradient(sub)
                       for name, sub in params["params"].items()}}


SUMMED = ("loss", "accuracy", "z_loss")  # token-weighted means, accumulated as sums


def task_of_rows(config: Config, modality: jax.Array) -> dict[str, jax.Array]:
    """Row masks per task. In stage 3 a row that starts with an image is an OCR row mixed
    in by the curriculum; every other stage has one task, named after the stage."""
    stage = config.data.stage
    if stage != "olm":
        return {stage: jnp.ones(modality.shape[:1], bool)}
    first = jnp.take_along_axis(modality, jnp.argmax(modality > 0, axis=1)[:, None], axis=1)[:, 0]
    return {"olm": first == TEXT, "ocr": first == VISUAL}


def _glyph_sums(out: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The glyph figures as sums over inked cells (exact under gradient accumulation)."""
    cells = out["glyph_cells"]
    return {"glyph_loss_sum": out["glyph_loss"] * cells, "glyph_accuracy_sum": out["glyph_accuracy"] * cells,
            "glyph_cells": cells}


def _tile_token_sums(out: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The tile-token figures as sums over labels and tiles (exact under accumulation)."""
    return {"tile_token_loss_sum": out["tile_token_loss"] * out["tile_token_labels"],
            "tile_token_labels": out["tile_token_labels"],
            "tile_token_accuracy_sum": out["tile_token_accuracy"] * out["tile_token_tiles"],
            "tile_token_tiles": out["tile_token_tiles"]}


def loss_and_metrics(model: Vist2Model, config: Config, params: Any, batch: Mapping[str, jax.Array]):
    """(objective, sums): the objective to differentiate and token-weighted metric sums.
    With ``train.text_loss_weight=0`` only the tower and its glyph head run (a vision
    pretraining stage, no decoder): its ``loss`` / ``accuracy`` are the glyph figures."""
    if config.train.text_loss_weight == 0:
        out = model.apply(params, batch, method=Vist2Model.glyph_metrics)
        sums = _glyph_sums(out)
        sums.update(loss=sums["glyph_loss_sum"], accuracy=sums["glyph_accuracy_sum"], z_loss=jnp.zeros(()),
                    target_tokens=sums["glyph_cells"])
        return config.train.glyph_loss_weight * out["glyph_loss"], sums
    tile_tokens = config.train.tile_token_loss_weight > 0
    out = model.apply(params, batch, with_logits=False, tile_tokens=tile_tokens)  # blockwise, no [B, S, V]
    loss = config.train.text_loss_weight * out["loss"]
    if config.train.z_loss_weight > 0:
        loss = loss + config.train.z_loss_weight * out["z_loss"]
    tokens = out["target_tokens"]
    sums = {k: out[k] * tokens for k in SUMMED}
    sums["target_tokens"] = tokens
    if "glyph_loss" in out:  # the text-oriented vision objective (docs/design.md §4)
        if config.train.glyph_loss_weight > 0:
            loss = loss + config.train.glyph_loss_weight * out["glyph_loss"]
        sums.update(_glyph_sums(out))
    if tile_tokens:  # the tile-token objective (docs/design.md §4)
        loss = loss + config.train.tile_token_loss_weight * out["tile_token_loss"]
        sums.update(_tile_token_sums(out))
    for task, rows in task_of_rows(config, batch["modality"]).items():
        sums[f"loss_sum_{task}"] = jnp.sum(jnp.where(rows, out["row_nll"], 0.0))
        sums[f"tokens_{task}"] = jnp.sum(jnp.where(rows, out["row_tokens"], 0.0))
    return loss, sums


def finish_metrics(sums: dict) -> dict:
    """Metric sums -> means (loss, accuracy, z_loss, loss_TASK), keeping token counts."""
    total = jnp.maximum(sums["target_tokens"], 1.0)
    metrics = {k: sums[k] / total for k in SUMMED}
    metrics["target_tokens"] = sums["target_tokens"]
    if "glyph_cells" in sums:
        cells = jnp.maximum(sums["glyph_cells"], 1.0)
        metrics["glyph_loss"] = sums["glyph_loss_sum"] / cells
        metrics["glyph_accuracy"] = sums["glyph_accuracy_sum"] / cells
    if "tile_token_labels" in sums:
        metrics["tile_token_loss"] = sums["tile_token_loss_sum"] / jnp.maximum(sums["tile_token_labels"], 1.0)
        metrics["tile_token_accuracy"] = sums["tile_token_accuracy_sum"] / jnp.maximum(sums["tile_token_tiles"], 1.0)
    for key in sums:
        if key.startswith("loss_sum_"):
            task = key[len("loss_sum_"):]
            metrics[f"loss_{task}"] = sums[key] / jnp.maximum(sums[f"tokens_{task}"], 1.0)
            metrics[f"tokens_{task}"] = sums[f"tokens_{task}"]
    return metrics


def component_norms(grads, updates, params, trainable, config: Config, step) -> dict:
    """Per trainable component: gradient, update and parameter L2 norms and the learning
    rate in force, the figures that show which component moves and how far (a tower whose
    update norm rivals its parameter norm is being overwritten, not tuned)."""
    out = {}
    for name in trainable:
        if name not in params["params"]:
            continue
        out[f"grad_norm_{name}"] = optax.tree.norm(grads["params"][name])
        out[f"update_norm_{name}"] = optax.tree.norm(updates["params"][name])
        out[f"param_norm_{name}"] = optax.tree.norm(params["params"][name])
        out[f"learning_rate_{name}"] = jnp.asarray(learning_rate_schedule(config.train, name)(step), jnp.float32)
    return out


def make_train_step(config: Config, optimizer: optax.GradientTransformation):
    model = Vist2Model(config.model)
    accum = config.train.grad_accum_steps
    trainable = config.train.trainable
    skip_bad = config.train.nan_policy == "skip"

    def grads_of(params, batch):
        def objective(p):
            return loss_and_metrics(model, config, _freeze(p, trainable), batch)
        (_, sums), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return grads, sums

    def train_step(state: dict, batch: Mapping[str, jax.Array]) -> tuple[dict, dict]:
        params = state["params"]
        if accum == 1:
            grads, sums = grads_of(params, batch)
        else:
            # micro-batch i takes rows i, i + accum, ...: every data shard keeps its own rows
            # in every micro-batch (a leading [accum, B/accum] split would put each
            # micro-batch on a fraction of the shards and gather it everywhere)
            micro = jax.tree_util.tree_map(
                lambda x: jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1),
                batch)

            def body(carry, mb):
                grads, sums = grads_of(params, mb)
                acc_g, acc_s = carry
                acc_g = jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32) / accum, acc_g, grads)
                return (acc_g, jax.tree_util.tree_map(jnp.add, acc_s, sums)), None

            zeros_g = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            first = jax.tree_util.tree_map(lambda x: x[0], micro)
            zeros_s = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype),
                                             jax.eval_shape(lambda: grads_of(params, first)[1]))
            (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), micro)
        metrics = finish_metrics(sums)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics.update(component_norms(grads, updates, params, trainable, config, state["step"]))
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        if skip_bad:
            new_params = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new_params, params)
            opt_state = jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), opt_state, state["opt_state"])
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
        metrics = {**metrics, "grad_norm": grad_norm, "finite": ok.astype(jnp.float32)}
        return new_state, metrics

    return train_step


def make_eval_step(config: Config):
    model = Vist2Model(config.model)

    def eval_step(params: Any, batch: Mapping[str, jax.Array]) -> dict:
        _, sums = loss_and_metrics(model, config, params, batch)
        return finish_metrics(sums)

    return eval_step


def jitted_steps(config: Config, optimizer, shardings, mesh):
    """The jitted train step (state donated) and eval step with the run's shardings; used by
    the trainer and by ``vist2 aot`` (which lowers them on abstract inputs)."""
    from vist2_jax.parallel.sharding import replicated
    from vist2_jax.training.distributed import batch_sharding

    data_sharding = batch_sharding(mesh)
    train_step = jax.jit(make_train_step(config, optimizer), in_shardings=(shardings, data_sharding),
                         out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(config), in_shardings=(shardings["params"], data_sharding),
                        out_shardings=replicated(mesh))
    return train_step, eval_step
