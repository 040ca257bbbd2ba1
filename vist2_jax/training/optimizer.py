"""AdamW with warmup + cosine decay, global-norm clipping, and per-stage frozen components.

Frozen components (docs/design.md §1: e.g. only the aligner trains in stage 1) are labelled
``frozen`` in an ``optax.multi_transform`` whose frozen branch is ``set_to_zero``: they get
no optimizer state and no update. The step also stops their gradients, so XLA does not
compute them at all.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from vist2_jax.config.schema import TrainConfig


def learning_rate_schedule(train: TrainConfig) -> optax.Schedule:
    peak = train.learning_rate
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=train.warmup_steps,
        decay_steps=max(train.steps, train.warmup_steps + 1),
        end_value=peak * train.end_learning_rate_fraction)


def component_labels(params: Any, trainable: tuple[str, ...]) -> Any:
    """``params`` (``{"params": {component: ...}}``) -> same tree of "train" / "frozen"."""
    return {"params": {name: jax.tree_util.tree_map(lambda _, n=name: "train" if n in trainable else "frozen",
                                                    sub)
                       for name, sub in params["params"].items()}}


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only (not norms, biases or 1-D scales)."""
    return jax.tree_util.tree_map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(train: TrainConfig, params: Any) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(train), b1=0.9, b2=0.95, eps=1e-8,
                        weight_decay=train.weight_decay, mask=_decay_mask)
    chain = [optax.clip_by_global_norm(train.grad_clip_norm)] if train.grad_clip_norm > 0 else []
    inner = optax.chain(*chain, adamw)
    return optax.multi_transform({"train": inner, "frozen": optax.set_to_zero()},
                                 component_labels(params, train.trainable))
