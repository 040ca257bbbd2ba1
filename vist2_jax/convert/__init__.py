"""Conversion between Hugging Face checkpoints (safetensors) and our parameter trees."""
