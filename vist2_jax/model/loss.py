"""Blockwise next-token cross-entropy + z-loss that never materialises [B, S, V] logits.

The LM head and the loss run on ``chunk`` positions of the sequence at a time inside a
``lax.scan`` whose body is rematerialised, so forward and backward hold one chunk's fp32
logits ([B, chunk, V], vocab sharded over ``tensor``) instead of the whole row's (151,936
fp32 logits are 0.6 MiB per token). Per token it keeps only log Z, the target logit and
whether the argmax hit the target; the sums are those of
:func:`vist2_jax.model.vist2.next_token_loss`, which stays the full-logits reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vist2_jax.model.layers import constrain


def head_logits(hidden: jax.Array, weight: jax.Array, tied: bool, dtype) -> jax.Array:
    """fp32 logits of the LM head exactly as the decoder computes them: tied ``weight`` is
    the [V, D] embedding (fp32 accumulation); untied it is the [D, V] kernel (a ``dtype``
    matmul, like :class:`~vist2_jax.model.layers.DenseGeneral`)."""
    if tied:
        out = jnp.einsum("bsd,vd->bsv", hidden.astype(dtype), weight.astype(dtype),
                         preferred_element_type=jnp.float32)
    else:
        out = jax.lax.dot_general(hidden.astype(dtype), weight.astype(dtype),
                                  (((hidden.ndim - 1,), (0,)), ((), ())))
    return constrain(out.astype(jnp.float32), ("batch", "length", "act_vocab"))


def chunk_size(seq: int, chunk: int) -> int:
    """The largest divisor of ``seq`` not above ``chunk`` (``chunk`` <= 0: the whole row)."""
    if chunk <= 0 or chunk >= seq:
        return seq
    return max(d for d in range(1, chunk + 1) if seq % d == 0)


def _token_stats(hidden, targets, weight, tied, dtype):
    """Per token of a [B, c, D] chunk: (log Z, target logit, argmax == target)."""
    logits = head_logits(hidden, weight, tied, dtype)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = jax.lax.stop_gradient((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))
    return log_z, target, correct


def blockwise_next_token_loss(hidden: jax.Array, weight: jax.Array, targets: jax.Array,
                              weights: jax.Array, *, tied: bool, dtype, chunk: int):
    """Same (loss, metrics) as ``next_token_loss(head_logits(hidden, ...), targets, weights)``
    from hidden states [B, S, D], ``chunk`` sequence positions at a time."""
    batch, seq = targets.shape
    size = chunk_size(seq, chunk)
    stats = jax.checkpoint(lambda h, t: _token_stats(h, t, weight, tied, dtype),
                           policy=jax.checkpoint_policies.nothing_saveable)
    if size == seq:
        log_z, target_logit, correct = stats(hidden, targets)
    else:
        n = seq // size
        split = lambda x: jnp.moveaxis(x.reshape((batch, n, size) + x.shape[2:]), 1, 0)  # noqa: E731
        _, out = jax.lax.scan(lambda c, xs: (c, stats(*xs)), None, (split(hidden), split(targets)))
        log_z, target_logit, correct = (jnp.moveaxis(o, 0, 1).reshape(batch, seq) for o in out)
    nll = log_z - target_logit
    weights = weights.astype(jnp.float32)
    denom = jnp.maximum(weights.sum(), 1.0)
    loss = (nll * weights).sum() / denom
    metrics = {"loss": loss, "accuracy": (correct * weights).sum() / denom,
               "target_tokens": weights.sum(), "z_loss": (jnp.square(log_z) * weights).sum() / denom,
               "row_nll": (nll * weights).sum(axis=-1), "row_tokens": weights.sum(axis=-1)}
    return loss, metrics
