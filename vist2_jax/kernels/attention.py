"""The attention entry point used by the decoder: ``attention(q, k, v, meta, impl=...)``.

``dense`` materialises the [B, S, S] mask from :mod:`vist2_jax.kernels.mask` and runs
softmax attention in fp32; it is exact and the reference for every faster path.
``auto`` picks the best implementation available for the platform; block-sparse Pallas
kernels and a chunked XLA path plug in here (see the kernel issue).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vist2_jax.kernels.chunked import xla_chunked_attention
from vist2_jax.kernels.mask import RowMeta, vision_memory_mask

IMPLEMENTATIONS = ("auto", "dense", "xla_chunked")
_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query softmax attention; K/V are not repeated in memory.

    q: [B, S, H, D]; k, v: [B, T, KV, D]; mask: [B, S, T] bool. Returns [B, S, H, D].
    """
    batch, seq, heads, dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, seq, kv_heads, heads // kv_heads, dim)
    logits = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32)
    logits = logits * (dim ** -0.5)
    logits = jnp.where(mask[:, None, None], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(batch, seq, heads, dim)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: RowMeta, *, impl: str = "auto",
              visual_attends_past_visual: bool = False) -> jax.Array:
    """Self-attention over one packed row under the vision-as-memory mask."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl={impl!r}; available: {', '.join(IMPLEMENTATIONS)}")
    if impl == "xla_chunked":
        return xla_chunked_attention(q, k, v, meta,
                                     visual_attends_past_visual=visual_attends_past_visual)
    mask = vision_memory_mask(meta, visual_attends_past_visual)
    return dense_attention(q, k, v, mask)
