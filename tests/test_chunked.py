"""``xla_chunked`` attention against the dense reference: outputs and q/k/v gradients in
f32 on random packed layouts (odd lengths, padding, a tail chunk, GQA, both mask modes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from test_blocks import random_olm_meta
from vist2_jax.config import load_config
from vist2_jax.kernels.attention import attention, dense_attention
from vist2_jax.kernels.chunked import xla_chunked_attention
from vist2_jax.kernels.mask import vision_memory_mask
from vist2_jax.kernels.reorder import permute_meta, visual_first_permutation

HEADS, KV_HEADS, DIM = 4, 2, 8


def dense(q, k, v, meta, flag):
    return dense_attention(q, k, v, vision_memory_mask(meta, flag))


def chunked(q, k, v, meta, flag):
    return xla_chunked_attention(q, k, v, meta, visual_attends_past_visual=flag, chunk_size=16)


def value_and_grads(fn):
    """jit(out, d(sum(out * cotangent))/d(q, k, v))."""
    def run(q, k, v, meta, cot, flag):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, meta, flag), q, k, v)
        return out, vjp(cot)
    return jax.jit(run, static_argnums=(5,))


DENSE, CHUNKED = value_and_grads(dense), value_and_grads(chunked)


def assert_close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    scale = np.abs(want).max() + 1e-30
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), seq=st.sampled_from([37, 64]), flag=st.booleans(),
       visual_first=st.booleans())
def test_chunked_matches_dense(seed, seq, flag, visual_first):
    meta = random_olm_meta(seed, seq)
    if visual_first:
        meta = permute_meta(meta, visual_first_permutation(meta)[0])
    rng = np.random.default_rng(seed)
    q, cot = (jnp.asarray(rng.normal(size=(2, seq, HEADS, DIM)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(2, seq, KV_HEADS, DIM)), jnp.float32) for _ in range(2))
    want_out, want_grads = DENSE(q, k, v, meta, cot, flag)
    got_out, got_grads = CHUNKED(q, k, v, meta, cot, flag)
    assert np.isfinite(np.asarray(got_out)).all()
    assert_close(got_out, want_out)
    for got, want in zip(got_grads, want_grads):
        assert_close(got, want)


def test_attention_dispatches_xla_chunked():
    meta = random_olm_meta(1, 40)
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 40, HEADS, DIM)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 40, KV_HEADS, DIM)), jnp.float32) for _ in range(2))
    assert_close(attention(q, k, v, meta, impl="xla_chunked"), attention(q, k, v, meta, impl="dense"))
    with pytest.raises(ValueError, match="xla_chunked"):
        attention(q, k, v, meta, impl="nope")


def test_config_accepts_xla_chunked():
    config = load_config(overrides=["model.attention_impl=xla_chunked"])
    assert config.model.attention_impl == "xla_chunked"


@pytest.mark.parametrize("seed,seq,flag", [(0, 64, False), (1, 37, True)])
def test_pallas_tpu_kernel_matches_dense_in_interpret_mode(seed, seq, flag):
    """The scalar-prefetch block-sparse kernel (visual-first row, odd length, GQA)."""
    from vist2_jax.kernels.pallas_tpu import block_sparse_attention

    meta = random_olm_meta(seed, seq)
    meta = permute_meta(meta, visual_first_permutation(meta)[0])
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(2, seq, HEADS, DIM)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, seq, KV_HEADS, DIM)), jnp.float32) for _ in range(2))
    got = jax.jit(lambda q, k, v, m: block_sparse_attention(
        q, k, v, m, block=16, visual_attends_past_visual=flag, interpret=True))(q, k, v, meta)
    assert_close(got, dense(q, k, v, meta, flag))


def test_pallas_tpu_kernel_lowers_for_tpu():
    """Mosaic lowering on a CPU-only machine (jax.export), bf16, block 128."""
    from jax import export

    from vist2_jax.kernels.mask import RowMeta
    from vist2_jax.kernels.pallas_tpu import block_sparse_attention

    seq = 256
    spec = jax.ShapeDtypeStruct
    args = (spec((1, seq, 4, 128), jnp.bfloat16), spec((1, seq, 2, 128), jnp.bfloat16),
            spec((1, seq, 2, 128), jnp.bfloat16),
            RowMeta(spec((1, seq), jnp.int8), *[spec((1, seq), jnp.int32)] * 3))
    exported = export.export(jax.jit(block_sparse_attention), platforms=["tpu"])(*args)
    assert "tpu_custom_call" in exported.mlir_module()
