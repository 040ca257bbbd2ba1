"""The Pallas kernels under a mesh (:mod:`vist2_jax.parallel.kernel_map`): per-shard calls
over batch and head axes equal the unsharded call (values and gradients, interpret mode on
the 8-device CPU mesh), the TPU row groups keep the scalar-prefetched tables bounded, and
the implementation resolves for the mesh's platform, not the host's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_blocks import random_olm_meta
from vist2_jax.config.schema import MeshConfig
from vist2_jax.kernels.attention import attention, resolve_impl
from vist2_jax.kernels.mask import RowMeta
from vist2_jax.parallel.kernel_map import TPU_TABLE_BUDGET, rows_per_call, target_platform
from vist2_jax.parallel.sharding import make_mesh


def _inputs(seq=40):
    meta = random_olm_meta(1, seq)  # two rows -> four
    meta = RowMeta(*(jnp.concatenate([m, m[::-1]]) for m in meta))
    rows = meta.modality.shape[0]
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(rows, seq, 4, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(rows, seq, 2, 8)), jnp.float32) for _ in range(2))
    return q, k, v, meta


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_kernel_per_shard_equals_unsharded(impl):
    q, k, v, meta = _inputs()

    def loss(q, k, v, m):
        return jnp.sum(attention(q, k, v, m, impl=impl) ** 2)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    want = grad(q, k, v, meta)
    with jax.set_mesh(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))):
        assert "shard_map" in str(jax.make_jaxpr(loss)(q, k, v, meta))
        got = grad(q, k, v, meta)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_tpu_row_groups_bound_the_block_tables():
    for rows in (1, 8, 16, 32, 64):
        group = rows_per_call(rows, 8192, 128)
        assert rows % group == 0 and 3 * 4 * group * 64 * 64 <= TPU_TABLE_BUDGET
    assert rows_per_call(16, 8192, 128) < 16  # 16 rows of 8192 overflowed 1 MiB SMEM


def test_auto_resolves_for_the_mesh_platform():
    assert target_platform() == "cpu" and resolve_impl("auto") == "xla_chunked"
    pytest.importorskip("libtpu")
    from jax.experimental import topologies
    devices = topologies.get_topology_desc("v5p:2x2x1", "tpu").devices
    with jax.set_mesh(make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1), devices)):
        assert target_platform() == "tpu" and resolve_impl("auto") == "pallas_tpu"
