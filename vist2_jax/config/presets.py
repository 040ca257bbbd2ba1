"""Model presets: ``tiny`` for CPU tests and the demo, and the published Qwen3 sizes.

The decoders of ``0.6b``..``8b`` have exactly the shapes of the released Qwen3 dense
models (config.json of Qwen/Qwen3-{0.6B,1.7B,4B,8B}); the vision tower is a SigLIP-style
ViT-L/16 reading 256x256 sketches, merged 2x2 into m=64 tokens, L=256 (4x).
"""

from __future__ import annotations

from vist2_jax.config.schema import (AlignerConfig, ConfigError, DecoderConfig, LayoutConfig,
                                     ModelConfig, VisionConfig)

QWEN3_VOCAB = 151936

_VIT_L16 = VisionConfig(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096)
_SKETCH_256 = LayoutConfig(text_len=256, visual_len=64, image_size=256, patch_size=16, merge=2)


def _qwen3(hidden: int, layers: int, heads: int, intermediate: int, tied: bool) -> DecoderConfig:
    return DecoderConfig(vocab_size=QWEN3_VOCAB, hidden_size=hidden, num_layers=layers,
                         num_heads=heads, num_kv_heads=8, head_dim=128,
                         intermediate_size=intermediate, rope_theta=1_000_000.0,
                         rms_norm_eps=1e-6, tie_embeddings=tied)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        decoder=DecoderConfig(vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4,
                              num_kv_heads=2, head_dim=32, intermediate_size=384),
        vision=VisionConfig(hidden_size=128, num_layers=4, num_heads=4, mlp_dim=512),
        aligner=AlignerConfig(projector="mlp"),
        layout=LayoutConfig(text_len=64, visual_len=16, image_size=128, patch_size=16, merge=2),
        dtype="float32",
    ),
    "0.6b": ModelConfig(decoder=_qwen3(1024, 28, 16, 3072, tied=True), vision=_VIT_L16,
                        layout=_SKETCH_256),
    "1.7b": ModelConfig(decoder=_qwen3(2048, 28, 16, 6144, tied=True), vision=_VIT_L16,
                        layout=_SKETCH_256),
    "4b": ModelConfig(decoder=_qwen3(2560, 36, 32, 9728, tied=True), vision=_VIT_L16,
                      layout=_SKETCH_256),
    "8b": ModelConfig(decoder=_qwen3(4096, 36, 32, 12288, tied=False), vision=_VIT_L16,
                      layout=_SKETCH_256),
}


def preset_model(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
