"""Qwen3-style decoder: RMSNorm, GQA with per-head QK RMSNorm, RoPE at explicit positions,
SwiGLU MLP, optional tied embeddings. Attention goes through the kernel entry point,
so the same decoder runs plain causal text and the vision-as-memory mask.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vist2_jax.config.schema import ModelConfig
from vist2_jax.kernels.attention import attention, dense_attention, wants_visual_first
from vist2_jax.kernels.mask import RowMeta, vision_memory_mask
from vist2_jax.kernels.reorder import permute, permute_meta, visual_first_permutation
from vist2_jax.model.layers import (DTYPES, DenseGeneral, LayerStack, RMSNorm, constrain,
                                    param_with_axes, rotary_embedding)

BSE = ("batch", "length", "act_embed")


class KVCache(NamedTuple):
    """A static-shape KV cache: ``k``/``v`` [layers, B, C, kv_heads, head_dim] (post-RoPE)
    and the row metadata of every slot, ``meta`` (each [B, C]). A free slot has modality
    PAD, which the vision-as-memory mask never lets a text or visual query read."""

    k: jax.Array
    v: jax.Array
    meta: RowMeta


def write_rows(buffer: jax.Array, slots: jax.Array, values: jax.Array) -> jax.Array:
    """``buffer[b, slots[b, s]] = values[b, s]`` for every row b (slots [B, S])."""
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, slots].set(values.astype(buffer.dtype))


class Qwen3Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, meta: RowMeta, cache_ctx=None, layer_cache=None):
        """Self-attention over the row; with ``layer_cache=(k, v)`` and
        ``cache_ctx=(kv_meta, slots)`` the new K/V are written at ``slots`` and the queries
        attend over the whole cache (keys described by ``kv_meta``); returns (out, (k, v))."""
        cfg = self.config.decoder
        dtype, pdtype = DTYPES[self.config.dtype], DTYPES[self.config.param_dtype]
        hidden, heads, kv_heads, head_dim = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def project(name, n_heads, axis):
            return DenseGeneral((hidden,), (n_heads, head_dim), ("embed",), (axis, "head_dim"),
                                dtype=dtype, param_dtype=pdtype, name=name)(x)

        def qk_norm(name, t):
            return RMSNorm(cfg.rms_norm_eps, "head_dim", dtype, pdtype, name=name)(t)

        q = qk_norm("q_norm", project("q_proj", heads, "heads"))
        k = qk_norm("k_norm", project("k_proj", kv_heads, "kv_heads"))
        v = project("v_proj", kv_heads, "kv_heads")
        q = constrain(rotary_embedding(q, meta.positions, cfg.rope_theta),
                      ("batch", "length", "act_heads", None))
        k = constrain(rotary_embedding(k, meta.positions, cfg.rope_theta),
                      ("batch", "length", "act_kv_heads", None))
        vapv = self.config.layout.visual_attends_past_visual
        if layer_cache is None:  # the decoder already put a block-sparse kernel's row in order
            out = attention(q, k, v, meta, impl=self.config.attention_impl,
                            visual_attends_past_visual=vapv, reorder=False)
        else:
            kv_meta, slots = cache_ctx
            k_cache, v_cache = write_rows(layer_cache[0], slots, k), write_rows(layer_cache[1], slots, v)
            out = dense_attention(q, k_cache, v_cache, vision_memory_mask(meta, vapv, kv_meta=kv_meta))
            layer_cache = (k_cache, v_cache)
        out = constrain(out, ("batch", "length", "act_heads", None))
        out = DenseGeneral((heads, head_dim), (hidden,), ("heads", "head_dim"), ("embed",),
                           dtype=dtype, param_dtype=pdtype, name="o_proj")(out)
        return out if layer_cache is None else (out, layer_cache)


class Qwen3MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config.decoder
        dtype, pdtype = DTYPES[self.config.dtype], DTYPES[self.config.param_dtype]

        def dense(name, n_in, n_out, axes):
            return DenseGeneral((n_in,), (n_out,), axes[:1], axes[1:], dtype=dtype,
                                param_dtype=pdtype, name=name)

        gate = dense("gate_proj", cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))(x)
        up = dense("up_proj", cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"))(x)
        h = constrain(nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return dense("down_proj", cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"))(h)


class Qwen3Block(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, meta: RowMeta, cache_ctx=None, layer_cache=None):
        cfg = self.config.decoder
        dtype, pdtype = DTYPES[self.config.dtype], DTYPES[self.config.param_dtype]
        h = RMSNorm(cfg.rms_norm_eps, "norm", dtype, pdtype, name="input_norm")(x)
        attn = Qwen3Attention(self.config, name="attn")
        if layer_cache is None:
            out = attn(h, meta)
        else:
            out, layer_cache = attn(h, meta, cache_ctx, layer_cache)
        x = constrain(x + out, BSE)
        h = RMSNorm(cfg.rms_norm_eps, "norm", dtype, pdtype, name="post_attn_norm")(x)
        x = constrain(x + Qwen3MLP(self.config, name="mlp")(h), BSE)
        return x, layer_cache


class Qwen3Decoder(nn.Module):
    """Token embedding, the block stack, final norm and LM head.

    Methods: ``embed(tokens)`` -> [B, S, D]; ``__call__(x, meta)`` -> final hidden
    states; ``logits(hidden)`` -> fp32 [B, S, V].
    """

    config: ModelConfig

    def setup(self):
        cfg = self.config.decoder
        dtype, pdtype = DTYPES[self.config.dtype], DTYPES[self.config.param_dtype]
        self.embedding = param_with_axes(self, "embedding", nn.initializers.normal(stddev=0.02),
                                         (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pdtype)
        self.blocks = LayerStack(Qwen3Block, {"config": self.config}, cfg.num_layers,
                                 self.config.scan_layers, self.config.remat_policy)
        self.final_norm = RMSNorm(cfg.rms_norm_eps, "norm", dtype, pdtype)
        if not cfg.tie_embeddings:
            self.lm_head = DenseGeneral((cfg.hidden_size,), (cfg.vocab_size,), ("embed",), ("vocab",),
                                        dtype=dtype, param_dtype=pdtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        x = jnp.take(self.embedding, tokens, axis=0).astype(DTYPES[self.config.dtype])
        return constrain(x, BSE)

    def __call__(self, x: jax.Array, meta: RowMeta) -> jax.Array:
        """Final hidden states of the row. For a block-sparse kernel the row is permuted to
        the visual-first order once here and restored at the end (every other op is
        per-token, and RoPE and the mask read the permuted positions), not in every layer."""
        if not wants_visual_first(self.config.attention_impl):
            return self.final_norm(self.blocks(x, meta))
        perm, inverse = visual_first_permutation(meta)
        hidden = self.blocks(permute(x, perm), permute_meta(meta, perm))
        return self.final_norm(permute(hidden, inverse))

    def extend(self, x: jax.Array, meta: RowMeta, slots: jax.Array, cache: KVCache
               ) -> tuple[jax.Array, KVCache]:
        """Cached forward: new entries ``x`` [B, S, D] with metadata ``meta`` are written at
        cache ``slots`` [B, S] and attend over every live cache entry under the same mask
        as training. Returns (final hidden [B, S, D], updated cache)."""
        kv_meta = RowMeta(*(write_rows(c, slots, n) for c, n in zip(cache.meta, meta)))
        x, (k, v) = self.blocks(x, meta, (kv_meta, slots), per_layer=(cache.k, cache.v))
        return self.final_norm(x), KVCache(k, v, kv_meta)

    def embedding_table(self) -> jax.Array:
        """The input embedding [V, D]: the space visual tokens are written into."""
        return self.embedding

    def head_weight(self) -> jax.Array:
        """The LM head matrix: the tied [V, D] embedding, or the untied [D, V] kernel (for
        :func:`vist2_jax.model.loss.head_logits`, which matches :meth:`logits`)."""
        if self.config.decoder.tie_embeddings:
            return self.embedding
        if self.is_initializing():
            self.lm_head(jnp.zeros((1, self.config.decoder.hidden_size), DTYPES[self.config.dtype]))
        return nn.unbox(self.lm_head.variables["params"]["kernel"])

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.config.decoder.tie_embeddings:
            dtype = DTYPES[self.config.dtype]
            out = jnp.einsum("bsd,vd->bsv", hidden.astype(dtype), self.embedding.astype(dtype),
                             preferred_element_type=jnp.float32)
        else:
            out = self.lm_head(hidden)
        return constrain(out.astype(jnp.float32), ("batch", "length", "act_vocab"))

    def text_logits(self, tokens: jax.Array, positions: jax.Array,
                    segment_id: jax.Array | None = None) -> jax.Array:
        """Logits of a text-only row under plain causal attention (what HF computes)."""
        return self.logits(self(self.embed(tokens), RowMeta.text_only(positions, segment_id)))
