"""Flax linen modules: ViT encoder, aligner, Qwen3 decoder and the VIST2 model."""
