"""``vist2 aot`` and the kernels under a mesh.

* the train step with the Pallas TPU kernel, under ``shard_map``, compiles for a 4-chip
  TPU topology (data x fsdp x tensor) from this CPU, with the Mosaic kernel in the program;
  the report's parts add up to its total and the arguments hold the sharded state;
* the same train step (kernel in interpret mode) on the 8-device CPU mesh equals the
  single-device step;
* the analytic forward FLOPs of the tiny model equal an independent count of every
  dot_general / conv in its unrolled jaxpr;
* a recipe made not to fit exits 1 naming the largest buffers and the knobs.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_olm_batch
from vist2_jax.config import load_config
from vist2_jax.model import flops as model_flops
from vist2_jax.model.vist2 import Vist2Model

# The demo recipe, shrunk so a TPU compile takes seconds; the kernel and a multi-chip mesh.
SMALL = ["model.decoder.num_layers=2", "model.vision.num_layers=1", "model.decoder.vocab_size=512",
         "model.layout.image_size=64", "model.layout.visual_len=4", "model.layout.text_len=8",
         "data.seq_len=256", "data.images_per_row=2", "data.global_batch_size=4",
         "data.curriculum=[{start_step: 0, text_len: 8, max_chunks: 4}]",
         "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2", "model.remat_policy=full"]


def _slice_or_skip(name):
    pytest.importorskip("libtpu", reason="libtpu not installed: pip install 'vist2-jax[tpu]'")
    from vist2_jax.aot.topology import get_slice
    return get_slice(name)


def test_demo_recipe_compiles_for_a_tpu_slice_with_the_kernel():
    from vist2_jax.aot.compile import GIB, compile_train_step
    from vist2_jax.parallel.sharding import make_mesh
    from vist2_jax.training.state import abstract_state

    config = load_config("recipes/demo/stage3_olm.yaml", SMALL)
    slice_ = _slice_or_skip("v5p-8")
    report = compile_train_step(config, slice_, "demo")
    assert report.fits and not report.error, report.error
    assert report.kernel_calls >= 3  # forward, dq, dk/dv of the Mosaic kernel
    parts = report.argument_bytes + report.output_bytes + report.temp_bytes + report.code_bytes
    assert report.total_bytes == parts and 0 < parts < report.hbm_bytes == int(slice_.hbm_gib * GIB)
    # the arguments hold at least each chip's shard of the state (TPU tiles may pad)
    from vist2_jax.aot.topology import slice_devices
    _, abstract, _ = abstract_state(config, make_mesh(config.mesh, slice_devices(slice_)))
    state = sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                for a in jax.tree_util.tree_leaves(abstract))
    assert report.argument_bytes >= state
    assert report.model_flops > 0 and report.est_step_s > 0 and 0 < report.est_mfu < 1
    assert report.rows_per_chip == 2 and report.mesh == {"data": 1, "fsdp": 2, "tensor": 2}


def test_train_step_with_kernel_on_cpu_mesh_equals_single_device(tiny_config):
    from jax.sharding import NamedSharding, PartitionSpec as P

    from vist2_jax.config.schema import MeshConfig
    from vist2_jax.parallel.sharding import LOGICAL_AXIS_RULES, make_mesh
    from vist2_jax.training.state import abstract_state
    from vist2_jax.training.step import jitted_steps

    config = dataclasses.replace(
        tiny_config, model=dataclasses.replace(tiny_config.model, attention_impl="pallas_tpu"),
        mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    batch = make_olm_batch(config.model, chunk_counts=((3,), (2, 2), (1, 2), (4,)), seq_len=96)
    params = jax.device_get(nn.unbox(jax.jit(Vist2Model(config.model).init)(jax.random.key(0), batch)))

    def run(mesh_config):
        mesh = make_mesh(mesh_config, jax.devices()[:math.prod(mesh_config.axis_sizes().values())])
        optimizer, _, shardings = abstract_state(dataclasses.replace(config, mesh=mesh_config), mesh)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}
        state = jax.device_put(state, shardings)
        rows = jax.device_put(batch, NamedSharding(mesh, P(("data", "fsdp"))))
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            step, _ = jitted_steps(config, optimizer, shardings, mesh)
            return jax.device_get(step(state, rows))

    (one_state, one), (mesh_state, sharded) = run(MeshConfig(1, 1, 1)), run(config.mesh)
    for key in ("loss", "grad_norm", "accuracy", "z_loss"):
        np.testing.assert_allclose(sharded[key], one[key], rtol=2e-5, err_msg=key)
    for a, b in zip(jax.tree_util.tree_leaves(mesh_state["params"]), jax.tree_util.tree_leaves(one_state["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _jaxpr_flops(jaxpr) -> int:
    """2 x multiply-adds of every dot_general and conv, recursing into sub-jaxprs."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        elif eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_feature = eqn.params["dimension_numbers"].rhs_spec[0]
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) // rhs[out_feature]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _jaxpr_flops(sub)
    return total


def test_analytic_flops_match_a_jaxpr_count(tiny_config):
    """Dense attention computes every (q, k) pair and every image slot is encoded, so the
    count is the analytic formulas at pairs = B*S^2 and images = B*N."""
    model_config = dataclasses.replace(tiny_config.model, attention_impl="dense", scan_layers=False)
    batch = make_olm_batch(model_config, chunk_counts=((3,), (2, 2)), seq_len=96)
    model = Vist2Model(model_config)
    params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), batch)))
    counted = _jaxpr_flops(jax.make_jaxpr(lambda p: model.apply(p, batch)["loss"])(params).jaxpr)
    rows, seq = batch["tokens"].shape
    images = batch["images"].shape[0] * batch["images"].shape[1]
    analytic = (images * model_flops.image_flops(model_config)
                + rows * seq * model_flops.decoder_token_flops(model_config)
                + model_flops.attention_flops(model_config, rows * seq * seq)
                + model_flops.lm_head_flops(model_config, rows * seq))
    assert counted == analytic


def test_a_recipe_that_does_not_fit_names_buffers_and_knobs(capsys):
    from vist2_jax.cli.main import main

    _slice_or_skip("v5e-8")
    code = main(["aot", "recipes/demo/stage3_olm.yaml", *SMALL, "mesh.fsdp=-1", "data.seq_len=65536",
                 "data.global_batch_size=64", "model.remat_policy=none", "model.loss_chunk=0",
                 "--topology", "v5e-8"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "DOES NOT FIT" in out and "largest buffers" in out
    assert "train.grad_accum_steps" in out


def test_libtpu_prints_nothing_when_compiling_off_a_tpu_host():
    """Off a TPU VM, libtpu printed three "could not determine TPU accelerator type / worker
    hostnames" warnings before every report; the slice named says what it needs."""
    import os
    import subprocess
    import sys

    _slice_or_skip("v5e-8")
    script = ("from vist2_jax.aot.topology import get_slice, slice_devices\n"
              "print(len(slice_devices(get_slice('v5e-8'))))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**env, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0 and done.stdout.strip() == "8", done.stderr[-2000:]
    assert done.stderr.strip() == "", done.stderr[-2000:]
