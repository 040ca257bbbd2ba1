"""Analytic FLOPs of the model's pieces from the real shapes (a multiply-add is 2 FLOPs).

Qwen3's explicit ``head_dim`` (not hidden/heads), GQA projections sized by
``num_kv_heads``, the ViT at its patch count, the aligner's merge + projector. Training
(:mod:`vist2_jax.training.flops`) and generation (:mod:`vist2_jax.inference.flops`) both
count with these; norms, RoPE and softmax are left out.
"""

from __future__ import annotations

from vist2_jax.config.schema import ModelConfig


def decoder_token_flops(cfg: ModelConfig) -> int:
    """Projections + SwiGLU MLP of one token through every decoder layer (no attention)."""
    d = cfg.decoder
    qkv = 2 * d.hidden_size * (d.num_heads + 2 * d.num_kv_heads) * d.head_dim
    out = 2 * d.num_heads * d.head_dim * d.hidden_size
    mlp = 3 * 2 * d.hidden_size * d.intermediate_size
    return d.num_layers * (qkv + out + mlp)


def attention_flops(cfg: ModelConfig, pairs: int) -> int:
    """QK^T and PV over ``pairs`` (query, key) pairs, every query head, every layer."""
    d = cfg.decoder
    return d.num_layers * 4 * d.num_heads * d.head_dim * pairs


def lm_head_flops(cfg: ModelConfig, rows: int) -> int:
    return rows * 2 * cfg.decoder.hidden_size * cfg.decoder.vocab_size


def vision_flops(cfg: ModelConfig) -> int:
    """One image through the ViT: patch embedding and the blocks (with patch attention)."""
    v, lay = cfg.vision, cfg.layout
    patches = lay.patch_grid ** 2
    embed = 2 * patches * lay.patch_size ** 2 * 3 * v.hidden_size
    block = (8 * patches * v.hidden_size ** 2 + 4 * patches ** 2 * v.hidden_size
             + 4 * patches * v.hidden_size * v.mlp_dim)
    return embed + v.num_layers * block


def aligner_flops(cfg: ModelConfig) -> int:
    """One image's m merged tokens through the projector."""
    lay, dim = cfg.layout, cfg.decoder.hidden_size
    width = lay.merge ** 2 * cfg.vision.hidden_size
    flops = 2 * lay.visual_len * width * dim
    if cfg.aligner.projector == "mlp":
        flops += 2 * lay.visual_len * dim * dim
    return flops


def image_flops(cfg: ModelConfig) -> int:
    """One image through the ViT and the aligner."""
    return vision_flops(cfg) + aligner_flops(cfg)
