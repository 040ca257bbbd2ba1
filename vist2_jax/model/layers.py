"""Small building blocks shared by the encoder and the decoder."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param_with_axes(module: nn.Module, name: str, init, shape: Sequence[int],
                    axes: Sequence[str], dtype: Dtype) -> jax.Array:
    """A parameter carrying logical axis names (mapped to the mesh by the rules table)."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Name an activation's axes; a no-op outside a mesh with axis rules."""
    return nn.with_logical_constraint(x, tuple(axes))


class DenseGeneral(nn.Module):
    """``x @ W (+ b)`` contracting the trailing ``len(in_axes)`` dims, with named axes.

    ``in_shape``/``out_shape`` are explicit so the kernel shape never depends on
    flattening conventions (HF weights are reshaped into exactly this layout).
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = 1
        for size in self.in_shape:
            fan_in *= size
        init = nn.initializers.normal(stddev=fan_in ** -0.5)
        kernel = param_with_axes(self, "kernel", init, self.in_shape + self.out_shape,
                                 self.in_axes + self.out_axes, self.param_dtype)
        n_in = len(self.in_shape)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        if self.use_bias:
            bias = param_with_axes(self, "bias", nn.initializers.zeros, self.out_shape,
                                   self.out_axes, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """Qwen3 RMSNorm: normalise in fp32, cast back, then scale (weight init 1, no offset)."""

    eps: float = 1e-6
    axis_name: str = "norm"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],),
                                (self.axis_name,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * normed.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with named scale and bias, computed in fp32."""

    eps: float = 1e-6
    axis_name: str = "embed"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        scale = param_with_axes(self, "scale", nn.initializers.ones, features, (self.axis_name,),
                                self.param_dtype)
        bias = param_with_axes(self, "bias", nn.initializers.zeros, features, (self.axis_name,),
                               self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Qwen3/Llama RoPE (rotate-half layout) at explicit integer positions.

    x: [B, S, heads, head_dim]; positions: [B, S]. Angles are computed in fp32.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x32 = x.astype(jnp.float32)
    half = head_dim // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LayerStack(nn.Module):
    """A stack of residual blocks ``(x, *args) -> (x, None)``, scanned or unrolled.

    With ``scan`` the parameters sit on a leading ``layers`` axis (one compile of the
    block, the layout MaxText uses); otherwise blocks are named ``layers_0``, ``layers_1``...
    ``remat_policy`` wraps each block in ``nn.remat`` with a policy from ``REMAT_POLICIES``.

    ``per_layer`` (inference only) is a pytree with a leading ``layers`` axis, e.g. a KV
    cache: layer i receives its slice as a last argument (scan ``in_axes`` 0, not
    broadcast), returns its update, and the call returns ``(x, stacked updates)``.
    """

    block_cls: Any
    block_kwargs: Any
    num_layers: int
    scan: bool = True
    remat_policy: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, *args, per_layer: Any = None):
        block_cls = self.block_cls
        if self.remat_policy != "none":
            block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[self.remat_policy],
                                 prevent_cse=not self.scan)
        kwargs = dict(self.block_kwargs)
        if per_layer is not None:
            args = args + (per_layer,)
        if self.scan:
            in_axes = (nn.broadcast,) * (len(args) - (per_layer is not None))
            in_axes += (0,) if per_layer is not None else ()
            stack = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=in_axes, length=self.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, updates = stack(name="layers", **kwargs)(x, *args)
            return x if per_layer is None else (x, updates)
        updates = []
        for i in range(self.num_layers):
            layer_args = args
            if per_layer is not None:
                layer_args = args[:-1] + (jax.tree_util.tree_map(lambda a, i=i: a[i], per_layer),)
            x, update = block_cls(name=f"layers_{i}", **kwargs)(x, *layer_args)
            updates.append(update)
        if per_layer is None:
            return x
        return x, jax.tree_util.tree_map(lambda *u: jnp.stack(u), *updates)
