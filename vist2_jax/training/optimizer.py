"""AdamW with warmup + cosine decay per component, global-norm clipping, frozen components.

Each trainable component (vision, aligner, decoder) has its own peak learning rate
(``train.component_learning_rate``, default ``train.learning_rate``) and may start its
schedule late (``train.component_start_step``): a pretrained tower needs a far smaller
rate than a fresh aligner, which is what keeps it from being overwritten (docs/design.md
§1). Clipping is by the global norm over all components together, before the split.
Frozen components (e.g. all but the aligner in stage 1) are labelled ``frozen`` in an
``optax.multi_transform`` whose frozen branch is ``set_to_zero``: they get no optimizer
state and no update. The step also stops their gradients, so XLA does not compute them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from vist2_jax.config.schema import COMPONENTS, TrainConfig, component_of


def component_peak(train: TrainConfig, component: str) -> float:
    return getattr(train.component_learning_rate, component) or train.learning_rate


def learning_rate_schedule(train: TrainConfig, component: str | None = None) -> optax.Schedule:
    """The schedule of ``component`` (None: the run's ``train.learning_rate`` from step 0)."""
    peak = train.learning_rate if component is None else component_peak(train, component)
    start = 0 if component is None else getattr(train.component_start_step, component)
    inner = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=train.warmup_steps,
        decay_steps=max(train.steps - start, train.warmup_steps + 1),
        end_value=peak * train.end_learning_rate_fraction)
    if start == 0:
        return inner
    return lambda step: jnp.where(step < start, 0.0, inner(jnp.maximum(step - start, 0)))


def component_labels(params: Any, trainable: tuple[str, ...]) -> Any:
    """``params`` (``{"params": {group: ...}}``) -> same tree of component names / "frozen"
    (an auxiliary head such as ``glyph_head`` takes its component's label)."""
    def label(group: str) -> str:
        return component_of(group) if component_of(group) in trainable else "frozen"

    return {"params": {name: jax.tree_util.tree_map(lambda _, n=label(name): n, sub)
                       for name, sub in params["params"].items()}}


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only (not norms, biases or 1-D scales)."""
    return jax.tree_util.tree_map(lambda p: getattr(p, "ndim", 0) >= 2, params)


def make_optimizer(train: TrainConfig, params: Any) -> optax.GradientTransformation:
    def adamw(component: str) -> optax.GradientTransformation:
        return optax.adamw(learning_rate_schedule(train, component), b1=0.9, b2=0.95, eps=1e-8,
                           weight_decay=train.weight_decay, mask=_decay_mask)

    branches = {name: adamw(name) for name in COMPONENTS if name in train.trainable}
    split = optax.multi_transform({**branches, "frozen": optax.set_to_zero()},
                                  component_labels(params, train.trainable))
    chain = [optax.clip_by_global_norm(train.grad_clip_norm)] if train.grad_clip_norm > 0 else []
    return optax.chain(*chain, split)
