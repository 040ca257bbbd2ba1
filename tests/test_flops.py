"""Analytic training FLOPs: attended pairs equal the reference mask's entries, and the
backward pass is counted only where gradients flow."""

import dataclasses

import numpy as np
import pytest

from conftest import make_olm_batch
from vist2_jax.kernels.mask import PAD, RowMeta, vision_memory_mask
from vist2_jax.training.flops import mask_attended_pairs, train_step_flops


@pytest.mark.parametrize("past_visual", [False, True])
def test_attended_pairs_equal_the_mask_entries(tiny_config, past_visual):
    batch = make_olm_batch(tiny_config.model, chunk_counts=((3,), (2, 2), (1, 3)), seq_len=128, num_slots=4)
    mask = np.asarray(vision_memory_mask(RowMeta.from_batch(batch), past_visual))
    real_queries = batch["modality"] != PAD
    want = int((mask & real_queries[:, :, None]).sum())
    assert mask_attended_pairs(batch["modality"], batch["chunk_id"], batch["segment_id"], past_visual) == want


def test_backward_counted_only_where_gradients_flow(tiny_config):
    batch = make_olm_batch(tiny_config.model)
    full = train_step_flops(tiny_config, batch)
    forward = full["forward_vision"] + full["forward_aligner"] + full["forward_decoder"]
    # all trainable: forward, weight gradients everywhere, activation gradients above the ViT
    # (nothing below the ViT needs its input gradient)
    assert full["train_step"] == pytest.approx(3 * forward - full["forward_vision"])

    def with_trainable(*names):
        return dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, trainable=names))

    aligner_only = train_step_flops(with_trainable("aligner"), batch)["train_step"]
    # stage 1: the frozen ViT needs no backward; the frozen decoder passes activation gradients
    assert aligner_only == pytest.approx(forward + full["forward_aligner"] + full["forward_decoder"])
    decoder_only = train_step_flops(with_trainable("decoder"), batch)["train_step"]
    assert decoder_only == pytest.approx(forward + full["forward_decoder"])
