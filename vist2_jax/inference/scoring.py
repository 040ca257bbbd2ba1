"""Score token sequences with the decoder under plain causal text attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vist2_jax.config import ModelConfig
from vist2_jax.model.decoder import Qwen3Decoder


def decoder_text_logits(config: ModelConfig, params: dict, tokens: jax.Array) -> jax.Array:
    """fp32 logits [B, S, V] of text-only rows under causal attention, positions 0..S-1."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return Qwen3Decoder(config).apply(params, tokens, positions, method=Qwen3Decoder.text_logits)


def score_tokens(config: ModelConfig, params: dict, token_ids: np.ndarray) -> np.ndarray:
    """log p(token_ids[t] | token_ids[:t]) for t >= 1, as float64 numpy."""
    logits = jax.jit(decoder_text_logits, static_argnums=0)(config, params, token_ids[None])[0]
    logprobs = jax.nn.log_softmax(logits[:-1], axis=-1)
    picked = jnp.take_along_axis(logprobs, jnp.asarray(token_ids[1:])[:, None], axis=-1)[:, 0]
    return np.asarray(picked, np.float64)
