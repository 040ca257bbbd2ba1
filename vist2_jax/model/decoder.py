"""Qwen3-style decoder: RMSNorm, GQA with per-head QK RMSNorm, RoPE at explicit positions,
SwiGLU MLP, optional tied embeddings. Attention goes through the kernel entry point,
so the same decoder runs plain causal text and the vision-as-memory mask.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vist2_jax.config.schema import ModelConfig
from vist2_jax.kernels.attention import attention
from vist2_jax.kernels.mask import RowMeta
from vist2_jax.model.layers import (DTYPES, DenseGeneral, LayerStack, RMSNorm, constrain,
                                    param_with_axes, rotary_embedding)

BSE = ("batch", "length", "act_embed")


class Qwen3Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, meta: RowMeta) -> jax.Array:
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
        out = attention(q, k, v, meta, impl=self.config.attention_impl,
                        visual_attends_past_visual=self.config.layout.visual_attends_past_visual)
        out = constrain(out, ("batch", "length", "act_heads", None))
        return DenseGeneral((heads, head_dim), (hidden,), ("heads", "head_dim"), ("embed",),
                            dtype=dtype, param_dtype=pdtype, name="o_proj")(out)


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
    def __call__(self, x: jax.Array, meta: RowMeta):
        cfg = self.config.decoder
        dtype, pdtype = DTYPES[self.config.dtype], DTYPES[self.config.param_dtype]
        h = RMSNorm(cfg.rms_norm_eps, "norm", dtype, pdtype, name="input_norm")(x)
        x = constrain(x + Qwen3Attention(self.config, name="attn")(h, meta), BSE)
        h = RMSNorm(cfg.rms_norm_eps, "norm", dtype, pdtype, name="post_attn_norm")(x)
        x = constrain(x + Qwen3MLP(self.config, name="mlp")(h), BSE)
        return x, None


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
        return self.final_norm(self.blocks(x, meta))

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
