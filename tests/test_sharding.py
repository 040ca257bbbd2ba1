"""Logical axis names on every parameter, mapped by the one rules table onto an 8-device
CPU mesh (``fsdp=4, tensor=2``); the sharded forward equals the single-device one."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import make_olm_batch
from vist2_jax.config import ConfigError
from vist2_jax.config.schema import MeshConfig
from vist2_jax.model.vist2 import Vist2Model, abstract_params
from vist2_jax.parallel.sharding import LOGICAL_AXIS_RULES, logical_shardings, make_mesh, resolve_mesh_shape


def test_every_parameter_has_logical_axis_names(tiny_config):
    boxed = abstract_params(tiny_config.model)
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(leaf, nn.Partitioned) for leaf in leaves)
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) - {None} <= known, leaf.names


def test_mesh_resolution():
    assert resolve_mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match="mesh.fsdp"):
        resolve_mesh_shape(MeshConfig(data=3, fsdp=-1, tensor=1), 8)
    with pytest.raises(ConfigError, match="need 4 devices"):
        resolve_mesh_shape(MeshConfig(data=1, fsdp=2, tensor=2), 8)


def test_sharded_forward_matches_single_device(tiny_config):
    assert jax.device_count() == 8
    model = Vist2Model(tiny_config.model)
    batch = make_olm_batch(tiny_config.model, chunk_counts=((3,), (2, 2), (1, 2), (4,)), seq_len=96, num_slots=4)
    boxed = jax.jit(model.init)(jax.random.key(0), batch)
    plain = nn.unbox(boxed)
    reference = jax.jit(model.apply)(plain, batch)

    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    shardings = logical_shardings(boxed, mesh)
    q_kernel = shardings["params"]["decoder"]["blocks"]["layers"]["attn"]["q_proj"]["kernel"]
    assert q_kernel.spec == P(None, "fsdp", "tensor", None)  # layers, embed, heads, head_dim
    params = jax.device_put(plain, shardings)
    batch_sharding = {k: NamedSharding(mesh, P(("data", "fsdp"))) for k in batch}

    def forward(p, b):
        with nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            return model.apply(p, b)

    with jax.set_mesh(mesh):
        sharded = jax.jit(forward, in_shardings=(shardings, batch_sharding))(params, batch)
    assert sharded["logits"].sharding.num_devices == 8
    np.testing.assert_allclose(sharded["loss"], reference["loss"], rtol=1e-5)
    np.testing.assert_allclose(sharded["logits"], reference["logits"], rtol=1e-4, atol=1e-4)
