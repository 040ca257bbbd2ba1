"""The attention entry point used by the decoder: ``attention(q, k, v, meta, impl=...)``.

* ``dense`` materialises the [B, S, S] mask from :mod:`vist2_jax.kernels.mask` and runs
  softmax attention in fp32; it is exact and the reference for every faster path.
* ``xla_chunked`` (:mod:`.chunked`): the same arithmetic, a chunk of queries at a time.
* ``pallas_tpu`` / ``pallas_gpu`` (:mod:`.pallas_tpu`, :mod:`.pallas_gpu`): block-sparse
  kernels with forward and backward. They skip blocks in the visual-first order
  (:mod:`.reorder`). The decoder permutes its input once and undoes it at its output
  (:func:`wants_visual_first`), then calls this entry point with ``reorder=False``; a
  caller in the natural order leaves ``reorder=True`` and the permutation is applied
  around the kernel call (exact gathers, differentiable). On a platform other than the
  kernel's own they run in Pallas interpret mode (slow; for tests). Under a mesh they run
  per shard (:mod:`vist2_jax.parallel.kernel_map`): rows over the batch axes, heads over
  the tensor axis, TPU rows in groups whose block tables fit SMEM.
* ``auto``: ``pallas_tpu`` on TPU, ``pallas_gpu`` on GPU and ``xla_chunked`` elsewhere
  (CPU): interpret-mode kernels are far too slow there, and ``xla_chunked`` is exact like
  ``dense`` but its memory grows with S * chunk rather than S^2.

"The platform" is the one being compiled for (:func:`~vist2_jax.parallel.kernel_map.target_platform`:
the ambient mesh's devices, else the default backend), so an AOT compile for a TPU
topology from a CPU host resolves ``auto`` to the real Mosaic kernel.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp

from vist2_jax.kernels.precision import dot_precision
from vist2_jax.kernels.chunked import xla_chunked_attention
from vist2_jax.kernels.mask import RowMeta, vision_memory_mask
from vist2_jax.kernels.reorder import permute, permute_meta, visual_first_permutation
from vist2_jax.parallel.kernel_map import in_row_groups, rows_per_call, shard_kernel, target_platform

IMPLEMENTATIONS = ("auto", "dense", "xla_chunked", "pallas_tpu", "pallas_gpu")
_KERNEL_PLATFORM = {"pallas_tpu": "tpu", "pallas_gpu": "gpu"}
_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query softmax attention; K/V are not repeated in memory.

    q: [B, S, H, D]; k, v: [B, T, KV, D]; mask: [B, S, T] bool. Returns [B, S, H, D].
    fp32 inputs get full-precision dots (no TF32 on GPU).
    """
    batch, seq, heads, dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, seq, kv_heads, heads // kv_heads, dim)
    precision = dot_precision(q.dtype)
    logits = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32,
                        precision=precision)
    logits = logits * (dim ** -0.5)
    logits = jnp.where(mask[:, None, None], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, precision=precision)
    return out.reshape(batch, seq, heads, dim)


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """The concrete implementation ``impl`` stands for on ``platform`` (default: the
    platform being compiled for); raises on an unknown name."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention_impl={impl!r}; available: {', '.join(IMPLEMENTATIONS)}")
    if impl != "auto":
        return impl
    platform = platform or target_platform()
    return {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(platform, "xla_chunked")


def wants_visual_first(impl: str) -> bool:
    """Whether ``impl`` resolves to a block-sparse kernel that wants the visual-first order."""
    return resolve_impl(impl) in _KERNEL_PLATFORM


def block_sparse_visual_first(q, k, v, meta: RowMeta, *, impl: str,
                              visual_attends_past_visual: bool = False,
                              interpret: bool | None = None, block: int | None = None,
                              reorder: bool = True):
    """A Pallas kernel on the visual-first permutation of the row, output in the original
    order (``reorder=False``: the row is already in the order to run, e.g. permuted once
    by the decoder). ``interpret`` defaults to "not compiling for the kernel's platform".
    Runs per shard of the ambient mesh, if any."""
    if impl == "pallas_tpu":
        from vist2_jax.kernels.pallas_tpu import block_sparse_attention
    else:
        from vist2_jax.kernels.pallas_gpu import block_sparse_attention
    if interpret is None:
        interpret = target_platform() != _KERNEL_PLATFORM[impl]
    kwargs = {} if block is None else {"block": block}
    block = block or inspect.signature(block_sparse_attention).parameters["block"].default

    def kernel(q, k, v, meta):
        return block_sparse_attention(q, k, v, meta, interpret=interpret,
                                      visual_attends_past_visual=visual_attends_past_visual, **kwargs)

    def per_shard(q, k, v, meta):
        run = kernel
        if impl == "pallas_tpu":  # bounded scalar-prefetched tables (SMEM)
            run = in_row_groups(kernel, rows_per_call(q.shape[0], q.shape[1], block))
        if not reorder:
            return run(q, k, v, meta)
        perm, inverse = visual_first_permutation(meta)
        out = run(permute(q, perm), permute(k, perm), permute(v, perm), permute_meta(meta, perm))
        return permute(out, inverse)

    return shard_kernel(per_shard, q, k, v, meta)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, meta: RowMeta, *, impl: str = "auto",
              visual_attends_past_visual: bool = False, reorder: bool = True) -> jax.Array:
    """Self-attention over one packed row under the vision-as-memory mask. Exact in any
    token order; ``reorder=False`` tells a block-sparse kernel the row is already ordered."""
    impl = resolve_impl(impl)
    if impl == "xla_chunked":
        return xla_chunked_attention(q, k, v, meta,
                                     visual_attends_past_visual=visual_attends_past_visual)
    if impl in _KERNEL_PLATFORM:
        return block_sparse_visual_first(q, k, v, meta, impl=impl, reorder=reorder,
                                         visual_attends_past_visual=visual_attends_past_visual)
    mask = vision_memory_mask(meta, visual_attends_past_visual)
    return dense_attention(q, k, v, mask)
