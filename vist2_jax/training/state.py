"""The train state ``{"step", "params", "opt_state"}``: its abstract shapes and shardings
(one abstract init, nothing allocated), and its first value for a fresh stage."""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp

from vist2_jax.checkpointing.runs import resolve_run_dir, restore_params
from vist2_jax.config.schema import Config
from vist2_jax.convert.hf_weights import init_components_from_hf
from vist2_jax.model.vist2 import Vist2Model, abstract_params, example_batch
from vist2_jax.parallel.sharding import logical_shardings, replicated
from vist2_jax.training.optimizer import make_optimizer

log = logging.getLogger(__name__)


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


def initial_state(config: Config, optimizer, abstract, shardings):
    """Step 0: params from the previous stage (``train.init_from``), or a fresh init with
    optional Hugging Face components; a fresh optimizer state either way."""
    if config.train.init_from:
        # a run, a demo folder (its newest stage) or one step of a run (RUN/checkpoints/STEP)
        run_dir, step = resolve_run_dir(config.train.init_from, "train.init_from")
        step, params = restore_params(run_dir, abstract["params"], step)
        log.info("stage starts from %s (step %d)", config.train.init_from, step)
    else:
        model = Vist2Model(config.model)
        example = example_batch(config.model, 1, config.data.seq_len, config.data.images_per_row)
        init = jax.jit(lambda rng: nn.unbox(model.init(rng, example)), out_shardings=shardings["params"])
        params = init(jax.random.key(config.run.seed))
        params = init_components_from_hf(config, params, shardings["params"])
    make = jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": optimizer.init(p)},
                   in_shardings=(shardings["params"],), out_shardings=shardings)
    return make(params)
