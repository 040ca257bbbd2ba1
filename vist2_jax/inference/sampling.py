"""Next-token sampling on device: greedy, temperature, top-k, top-p, repetition penalty
and no-repeat-n-gram, configured by a static (hashable) :class:`SamplingConfig`
(``sampling_config.py``, JAX-free, shared with the PyTorch runtime)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vist2_jax.inference.sampling_config import SamplingConfig

_NEG = -1e30


def _repetition_penalty(logits, history, hist_len, penalty):
    valid = jnp.arange(history.shape[1])[None] < hist_len[:, None]
    rows = jnp.arange(logits.shape[0])[:, None]
    seen = jnp.zeros(logits.shape, bool).at[rows, history].max(valid)
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen, penalised, logits)


def _ban_repeated_ngrams(logits, history, hist_len, n):
    """Ban history[j+n-1] wherever history[j:j+n-1] equals the last n-1 tokens."""
    size = history.shape[1]
    if n == 1:
        return _ban(logits, history, jnp.arange(size)[None] < hist_len[:, None])
    starts = jnp.arange(max(size - n + 1, 0))
    if starts.size == 0:
        return logits
    prefix_idx = jnp.clip(hist_len[:, None] - (n - 1) + jnp.arange(n - 1)[None], 0, size - 1)
    prefix = jnp.take_along_axis(history, prefix_idx, axis=1)  # [B, n-1]
    windows = jnp.stack([history[:, starts + i] for i in range(n - 1)], axis=-1)  # [B, J, n-1]
    match = jnp.all(windows == prefix[:, None, :], axis=-1)
    match &= (starts[None] + n - 1 < hist_len[:, None]) & (hist_len[:, None] >= n - 1)
    return _ban(logits, history[:, starts + n - 1], match)


def _ban(logits, tokens, where):
    rows = jnp.arange(logits.shape[0])[:, None]
    banned = jnp.zeros(logits.shape, bool).at[rows, tokens].max(where)
    return jnp.where(banned, _NEG, logits)


def sample(logits: jax.Array, history: jax.Array, hist_len: jax.Array, key: jax.Array,
           config: SamplingConfig) -> jax.Array:
    """Next token ids [B] from fp32 logits [B, V]; ``history`` [B, H] holds prompt and
    generated tokens, of which the first ``hist_len`` [B] are real."""
    logits = logits.astype(jnp.float32)
    if config.repetition_penalty != 1.0:
        logits = _repetition_penalty(logits, history, hist_len, config.repetition_penalty)
    if config.no_repeat_ngram:
        logits = _ban_repeated_ngrams(logits, history, hist_len, config.no_repeat_ngram)
    if config.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / config.temperature
    if config.top_k:
        kth = jax.lax.top_k(logits, min(config.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, _NEG, logits)
    if config.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep_sorted = (jnp.cumsum(probs, axis=-1) - probs) < config.top_p  # top-1 always kept
        rows = jnp.arange(logits.shape[0])[:, None]
        keep = jnp.zeros(logits.shape, bool).at[rows, order].set(keep_sorted)
        logits = jnp.where(keep, logits, _NEG)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
