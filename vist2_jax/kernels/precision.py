"""Dot precision shared by every attention implementation."""

import jax
import jax.numpy as jnp


def dot_precision(dtype):
    """Full-precision dots for fp32 operands (GPUs would otherwise round them to TF32,
    about 1e-3 relative); ``None`` (the backend default) for bf16 / fp16."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
