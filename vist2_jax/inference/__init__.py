"""Inference: generation with global context compression (gcc / pcc / text) and scoring."""
