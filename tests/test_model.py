"""Behaviour of the VIST2 model on real packed rows: what the mask lets through, layouts
of the layer stack, and the row contract's visual-token placement."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_olm_batch
from vist2_jax.kernels.mask import TEXT
from vist2_jax.model.vist2 import Vist2Model, place_visual_tokens


@pytest.fixture(scope="module")
def model_and_params(tiny_config):
    batch = make_olm_batch(tiny_config.model)
    model = Vist2Model(tiny_config.model)
    params = jax.jit(model.init)(jax.random.key(0), batch)
    return model, params, jax.jit(model.apply)


def _text_positions(batch, row, segment, chunk):
    return np.flatnonzero((batch["modality"][row] == TEXT) & (batch["segment_id"][row] == segment)
                          & (batch["chunk_id"][row] == chunk))


def test_forward_shapes_and_loss(model_and_params, tiny_config):
    _, params, apply = model_and_params
    batch = make_olm_batch(tiny_config.model)
    out = apply(params, batch)
    vocab = tiny_config.model.decoder.vocab_size
    assert out["logits"].shape == batch["tokens"].shape + (vocab,)
    assert out["logits"].dtype == jnp.float32
    assert np.isfinite(np.asarray(out["logits"])).all()  # padding rows included
    assert abs(float(out["loss"]) - np.log(vocab)) < 0.5  # near-uniform at init
    assert float(out["target_tokens"]) == batch["loss_mask"].sum()


def test_text_of_previous_chunk_is_invisible_but_its_image_is_not(model_and_params, tiny_config):
    _, params, apply = model_and_params
    batch = make_olm_batch(tiny_config.model, chunk_counts=((3,),), seed=1)
    chunk2 = _text_positions(batch, 0, 1, 2)[1:]  # keep the marker, rewrite chunk 2's text
    chunk3 = _text_positions(batch, 0, 1, 3)
    base = np.asarray(apply(params, batch)["logits"])

    edited = {k: v.copy() for k, v in batch.items()}
    edited["tokens"][0, chunk2] = (edited["tokens"][0, chunk2] + 7) % tiny_config.model.decoder.vocab_size
    after_text_edit = np.asarray(apply(params, edited)["logits"])
    np.testing.assert_array_equal(after_text_edit[0, chunk3], base[0, chunk3])
    assert np.abs(after_text_edit[0, chunk2] - base[0, chunk2]).max() > 1e-3  # the edit was real

    edited = {k: v.copy() for k, v in batch.items()}
    edited["images"][0, 1] = 255 - edited["images"][0, 1]  # image of chunk 2
    after_image_edit = np.asarray(apply(params, edited)["logits"])
    assert np.abs(after_image_edit[0, chunk3] - base[0, chunk3]).max() > 1e-3
    earlier = np.concatenate([_text_positions(batch, 0, 1, 1), _text_positions(batch, 0, 1, 2)])
    np.testing.assert_array_equal(after_image_edit[0, earlier], base[0, earlier])


def test_nothing_leaks_across_segments(model_and_params, tiny_config):
    _, params, apply = model_and_params
    batch = make_olm_batch(tiny_config.model, chunk_counts=((2, 2),), seed=2)
    first = batch["segment_id"][0] == 1
    second = batch["segment_id"][0] == 2
    base = np.asarray(apply(params, batch)["logits"])
    edited = {k: v.copy() for k, v in batch.items()}
    edited["tokens"][0, first] = (edited["tokens"][0, first] + 11) % tiny_config.model.decoder.vocab_size
    edited["images"][0, 0] = 255 - edited["images"][0, 0]  # document 1's only image
    out = np.asarray(apply(params, edited)["logits"])
    np.testing.assert_array_equal(out[0, second], base[0, second])
    assert np.abs(out[0, first] - base[0, first]).max() > 1e-3


def _unstack(tree):
    """Scanned params ({'layers': stacked}) -> unrolled ({'layers_0': ..., ...})."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "layers":
            n = jax.tree_util.tree_leaves(value)[0].shape[0]
            for i in range(n):
                out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], value)
        else:
            out[key] = _unstack(value)
    return out


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_and_unrolled_stacks_agree(model_and_params, tiny_config, remat):
    model, params, _ = model_and_params
    batch = make_olm_batch(tiny_config.model)
    unrolled = Vist2Model(dataclasses.replace(tiny_config.model, scan_layers=False, remat_policy=remat))
    plain = nn.unbox(params)
    other = _unstack(jax.tree_util.tree_map(np.asarray, plain))

    def loss(m, p):
        return m.apply(p, batch)["loss"]

    loss_a, grads_a = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(plain)
    loss_b, grads_b = jax.jit(jax.value_and_grad(lambda p: loss(unrolled, p)))(other)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    flat_a = jax.tree_util.tree_leaves(_unstack(jax.tree_util.tree_map(np.asarray, grads_a)))
    flat_b = jax.tree_util.tree_leaves(grads_b)
    for a, b in zip(flat_a, flat_b):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_tanh_projector_and_bfloat16_compute(tiny_config):
    config = dataclasses.replace(tiny_config.model, dtype="bfloat16",
                                 aligner=dataclasses.replace(tiny_config.model.aligner, projector="tanh"))
    batch = make_olm_batch(config)
    model = Vist2Model(config)
    params = jax.jit(model.init)(jax.random.key(1), batch)
    assert "proj" in params["params"]["aligner"]
    out = jax.jit(model.apply)(params, batch)
    assert out["logits"].dtype == jnp.float32
    assert np.isfinite(float(out["loss"]))
    tokens = jax.jit(lambda p, im: model.apply(p, im, method=Vist2Model.encode_images))(params, batch["images"])
    assert np.abs(np.asarray(tokens)).max() <= 1.0  # tanh range


def test_place_visual_tokens_puts_image_k_into_span_k():
    m, dim = 2, 3
    modality = jnp.array([[1, 2, 2, 1, 2, 2, 1, 0]])
    text = jnp.zeros((1, 8, dim))
    visual = jnp.arange(2 * m * dim, dtype=jnp.float32).reshape(1, 2, m, dim) + 1
    out = np.asarray(place_visual_tokens(text, visual, modality))[0]
    np.testing.assert_array_equal(out[[1, 2]], np.asarray(visual[0, 0]))
    np.testing.assert_array_equal(out[[4, 5]], np.asarray(visual[0, 1]))
    np.testing.assert_array_equal(out[[0, 3, 6, 7]], 0)
