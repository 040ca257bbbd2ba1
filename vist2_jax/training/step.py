"""The sharded train and eval steps (pure functions of state and batch).

State is ``{"step", "params", "opt_state"}`` with fp32 master weights; the model computes
in ``model.dtype`` (bf16 by default). The global batch is split into
``grad_accum_steps`` micro-batches scanned with fp32 gradient accumulation.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from vist2_jax.config.schema import Config
from vist2_jax.model.vist2 import Vist2Model

STATE_KEYS = ("step", "params", "opt_state")


def _freeze(params: Any, trainable: tuple[str, ...]) -> Any:
    return {"params": {name: sub if name in trainable else jax.lax.stop_gradient(sub)
                       for name, sub in params["params"].items()}}


def loss_and_metrics(model: Vist2Model, config: Config, params: Any, batch: Mapping[str, jax.Array]):
    out = model.apply(params, batch)
    loss = out["loss"]
    if config.train.z_loss_weight > 0:
        loss = loss + config.train.z_loss_weight * out["z_loss"]
    metrics = {k: out[k] for k in ("loss", "accuracy", "target_tokens", "z_loss")}
    return loss, metrics


def make_train_step(config: Config, optimizer: optax.GradientTransformation):
    model = Vist2Model(config.model)
    accum = config.train.grad_accum_steps
    trainable = config.train.trainable
    skip_bad = config.train.nan_policy == "skip"

    def grads_of(params, batch):
        def objective(p):
            return loss_and_metrics(model, config, _freeze(p, trainable), batch)
        (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return grads, metrics

    def train_step(state: dict, batch: Mapping[str, jax.Array]) -> tuple[dict, dict]:
        params = state["params"]
        if accum == 1:
            grads, metrics = grads_of(params, batch)
        else:
            micro = jax.tree_util.tree_map(
                lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

            def body(carry, mb):
                grads, metrics = grads_of(params, mb)
                weight = metrics["target_tokens"]
                acc_g, acc_m = carry
                acc_g = jax.tree_util.tree_map(lambda a, g: a + g.astype(jnp.float32) / accum, acc_g, grads)
                acc_m = {k: acc_m[k] + (v if k == "target_tokens" else v * weight) for k, v in metrics.items()}
                return (acc_g, acc_m), None

            zeros_g = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            zeros_m = {k: jnp.zeros((), jnp.float32) for k in ("loss", "accuracy", "target_tokens", "z_loss")}
            (grads, summed), _ = jax.lax.scan(body, (zeros_g, zeros_m), micro)
            total = jnp.maximum(summed["target_tokens"], 1.0)
            metrics = {k: (v if k == "target_tokens" else v / total) for k, v in summed.items()}
        grad_norm = optax.global_norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
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
        _, metrics = loss_and_metrics(model, config, params, batch)
        return metrics

    return eval_step
