"""The blockwise loss (:mod:`vist2_jax.model.loss`) against the full-logits reference
(:func:`vist2_jax.model.vist2.next_token_loss`): every metric and the gradients in hidden
states and head weights within 1e-5 (fp32), tied and untied heads, chunks that divide the
row and one that does not; and the model's training path gives the reference's loss."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_olm_batch
from vist2_jax.model.loss import blockwise_next_token_loss, chunk_size, head_logits
from vist2_jax.model.vist2 import Vist2Model, next_token_loss

B, S, D, V = 2, 24, 16, 40


def _inputs(tied, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(V, D) if tied else (D, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, V, (B, S)), jnp.int32)
    mask = jnp.asarray(rng.random((B, S)) < 0.7, jnp.float32)
    return hidden, weight, targets, mask


def _objective(fn):
    def run(hidden, weight, targets, mask):
        loss, metrics = fn(hidden, weight, targets, mask)
        return loss + 1e-2 * metrics["z_loss"], metrics
    return jax.jit(jax.value_and_grad(run, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [8, 7, 0])
def test_blockwise_matches_full_logits(tied, chunk):
    args = _inputs(tied)
    ref = _objective(lambda h, w, t, m: next_token_loss(head_logits(h, w, tied, jnp.float32), t, m))
    got = _objective(lambda h, w, t, m: blockwise_next_token_loss(
        h, w, t, m, tied=tied, dtype=jnp.float32, chunk=chunk))
    (want_value, want_metrics), want_grads = ref(*args)
    (value, metrics), grads = got(*args)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for key, want in want_metrics.items():
        np.testing.assert_allclose(metrics[key], want, rtol=1e-5, atol=1e-6, err_msg=key)
    for got_g, want_g in zip(grads, want_grads):
        np.testing.assert_allclose(got_g, want_g, rtol=1e-5, atol=1e-5 * float(jnp.abs(want_g).max()))


def test_chunk_size_divides_the_row():
    assert chunk_size(24, 8) == 8 and chunk_size(24, 7) == 6 and chunk_size(24, 0) == 24
    assert chunk_size(8192, 512) == 512


def test_no_full_logits_in_the_blockwise_program():
    """No [B, S, V] fp32 array in the jaxpr of loss + gradient (chunk 8 of 24)."""
    args = _inputs(True)
    fn = lambda h, w, t, m: blockwise_next_token_loss(h, w, t, m, tied=True, dtype=jnp.float32,  # noqa: E731
                                                      chunk=8)[0]
    text = str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1)))(*args))
    assert f"f32[{B},{S},{V}]" not in text and f"f32[{B},8,{V}]" in text


@pytest.mark.parametrize("tied", [True, False])
def test_model_training_path_matches_logits_path(tiny_config, tied):
    config = dataclasses.replace(tiny_config.model, loss_chunk=32, decoder=dataclasses.replace(
        tiny_config.model.decoder, tie_embeddings=tied))
    batch = make_olm_batch(config)
    model = Vist2Model(config)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), batch))
    full = jax.jit(lambda p: model.apply(p, batch))(params)
    block = jax.jit(lambda p: model.apply(p, batch, with_logits=False))(params)
    assert "logits" not in block
    for key in ("loss", "accuracy", "z_loss", "row_nll"):
        np.testing.assert_allclose(block[key], full[key], rtol=1e-5, err_msg=key)
