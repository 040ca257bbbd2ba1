"""Inference: scoring and (later) generation with global context compression."""
