"""SigLIP-style ViT encoder and the aligner that turns its patches into visual tokens."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vist2_jax.config.schema import ModelConfig
from vist2_jax.model.layers import DTYPES, DenseGeneral, LayerNorm, LayerStack, constrain, param_with_axes

IMAGE_AXES = ("images", "patches", "act_embed")


class ViTBlock(nn.Module):
    """Pre-norm transformer block: LN -> MHA -> residual, LN -> GELU-tanh MLP -> residual."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array):
        cfg = self.config.vision
        dtype, pdtype = DTYPES[self.config.dtype], DTYPES[self.config.param_dtype]
        hidden, heads = cfg.hidden_size, cfg.num_heads
        head_dim = hidden // heads

        def norm(name):
            return LayerNorm(cfg.layer_norm_eps, "embed", dtype, pdtype, name=name)

        def dense(name, in_shape, out_shape, in_axes, out_axes):
            return DenseGeneral(in_shape, out_shape, in_axes, out_axes, use_bias=True,
                                dtype=dtype, param_dtype=pdtype, name=name)

        h = norm("ln1")(x)
        q, k, v = (dense(n, (hidden,), (heads, head_dim), ("embed",), ("heads", "head_dim"))(h)
                   for n in ("q_proj", "k_proj", "v_proj"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(logits * head_dim ** -0.5, axis=-1).astype(dtype)
        attn = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        x = x + dense("out_proj", (heads, head_dim), (hidden,), ("heads", "head_dim"), ("embed",))(attn)
        x = constrain(x, IMAGE_AXES)
        h = norm("ln2")(x)
        h = dense("fc1", (hidden,), (cfg.mlp_dim,), ("embed",), ("mlp",))(h)
        h = constrain(nn.gelu(h, approximate=True), ("images", "patches", "act_mlp"))
        x = x + dense("fc2", (cfg.mlp_dim,), (hidden,), ("mlp",), ("embed",))(h)
        return constrain(x, IMAGE_AXES), None


class VisionTower(nn.Module):
    """Patch embedding (a strided conv), learned position table, blocks, final LayerNorm.

    Input: float pixels [B, H, W, 3] already normalised (SigLIP: to [-1, 1]).
    Output: [B, g*g, D] patch features in row-major grid order.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg, layout = self.config.vision, self.config.layout
        dtype, pdtype = DTYPES[self.config.dtype], DTYPES[self.config.param_dtype]
        patch, hidden = layout.patch_size, cfg.hidden_size
        kernel = param_with_axes(self, "patch_kernel", nn.initializers.lecun_normal(),
                                 (patch, patch, 3, hidden), (None, None, None, "embed"), pdtype)
        bias = param_with_axes(self, "patch_bias", nn.initializers.zeros, (hidden,), ("embed",), pdtype)
        x = jax.lax.conv_general_dilated(pixels.astype(dtype), kernel.astype(dtype), (patch, patch),
                                         "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = (x + bias.astype(dtype)).reshape(x.shape[0], -1, hidden)
        table = param_with_axes(self, "pos_embedding", nn.initializers.normal(stddev=0.02),
                                (layout.patch_grid ** 2, hidden), ("vit_patches", "embed"), pdtype)
        x = constrain(x + table.astype(dtype)[None], IMAGE_AXES)
        x = LayerStack(ViTBlock, {"config": self.config}, cfg.num_layers, self.config.scan_layers,
                       self.config.remat_policy, name="blocks")(x)
        return LayerNorm(cfg.layer_norm_eps, "embed", dtype, pdtype, name="post_norm")(x)


def merge_patches(features: jax.Array, grid: int, merge: int) -> jax.Array:
    """[B, g*g, D] -> [B, (g/merge)^2, merge*merge*D], concatenating each merge x merge block
    in row-major order (top-left, top-right, bottom-left, bottom-right for 2x2)."""
    batch, _, dim = features.shape
    out = grid // merge
    x = features.reshape(batch, out, merge, out, merge, dim)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, out * out, merge * merge * dim)


class Aligner(nn.Module):
    """merge x merge spatial merge, then the projector into the decoder's embedding space:
    ``tanh``: the paper's per-token ``tanh(x W + b)``; ``mlp``: Linear -> GELU -> Linear."""

    config: ModelConfig

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        layout = self.config.layout
        dtype, pdtype = DTYPES[self.config.dtype], DTYPES[self.config.param_dtype]
        x = merge_patches(features, layout.patch_grid, layout.merge)
        width, hidden = x.shape[-1], self.config.decoder.hidden_size
        if self.config.aligner.projector == "tanh":
            y = DenseGeneral((width,), (hidden,), ("aligner_in",), ("embed",), use_bias=True,
                             dtype=dtype, param_dtype=pdtype, name="proj")(x)
            return constrain(jnp.tanh(y), IMAGE_AXES)
        h = DenseGeneral((width,), (hidden,), ("aligner_in",), ("embed",), use_bias=True,
                         dtype=dtype, param_dtype=pdtype, name="fc1")(x)
        h = nn.gelu(h, approximate=False)
        y = DenseGeneral((hidden,), (hidden,), ("mlp",), ("embed",), use_bias=True,
                         dtype=dtype, param_dtype=pdtype, name="fc2")(h)
        return constrain(y, IMAGE_AXES)


class GlyphHead(nn.Module):
    """Per-patch glyph classifier: each ViT patch feature -> logits over ``GLYPH_CLASSES``
    for each of its (patch / GLYPH_CELL)^2 cells, laid out as the renderer's glyph map
    [B, H/GLYPH_CELL, W/GLYPH_CELL, classes]. A dense, local target that makes the tower
    text-oriented (which glyph sits where) without any decoder in the loop."""

    config: ModelConfig

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        from vist2_jax.row_contract import GLYPH_CELL, GLYPH_CLASSES

        layout = self.config.layout
        dtype, pdtype = DTYPES[self.config.dtype], DTYPES[self.config.param_dtype]
        cells = layout.patch_size // GLYPH_CELL
        hidden = self.config.vision.hidden_size
        logits = DenseGeneral((hidden,), (cells * cells * GLYPH_CLASSES,), ("embed",), ("glyph_out",),
                              use_bias=True, dtype=dtype, param_dtype=pdtype, name="proj")(features)
        batch, grid = features.shape[0], layout.patch_grid
        logits = logits.reshape(batch, grid, grid, cells, cells, GLYPH_CLASSES).transpose(0, 1, 3, 2, 4, 5)
        return logits.reshape(batch, grid * cells, grid * cells, GLYPH_CLASSES)
