"""Declarative weight-mapping tables between Hugging Face checkpoints and our trees.

A table lists, per tensor, the HF name, our path (relative to the component's root)
and a layout transform. Rows under ``layer_rows`` repeat per layer (``{i}`` in the HF
name); with ``scan_layers`` they are stacked on a leading axis under ``blocks/layers``,
otherwise they live under ``blocks/layers_{i}``. Transforms know both directions, so the
same table imports and exports.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import numpy as np

from vist2_jax.config.schema import DecoderConfig, ModelConfig


@dataclasses.dataclass(frozen=True)
class Same:
    """The tensor is stored the same way on both sides."""

    def to_ours(self, w: np.ndarray, dims: Mapping[str, int]) -> np.ndarray:
        return w

    def to_hf(self, w: np.ndarray, dims: Mapping[str, int]) -> np.ndarray:
        return w


@dataclasses.dataclass(frozen=True)
class Reshape:
    """A flat HF vector (e.g. a bias of heads*head_dim) <-> our named dims."""

    dims: tuple[str, ...]

    def to_ours(self, w, dims):
        return w.reshape([dims[d] for d in self.dims])

    def to_hf(self, w, dims):
        return w.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Linear:
    """torch ``nn.Linear`` weight [out, in] <-> our kernel [*in_dims, *out_dims]."""

    in_dims: tuple[str, ...]
    out_dims: tuple[str, ...]

    def to_ours(self, w, dims):
        return w.T.reshape([dims[d] for d in self.in_dims + self.out_dims])

    def to_hf(self, w, dims):
        n_in = int(np.prod([dims[d] for d in self.in_dims]))
        return w.reshape(n_in, -1).T


@dataclasses.dataclass(frozen=True)
class Conv:
    """torch ``nn.Conv2d`` weight [O, C, kh, kw] <-> our HWIO kernel [kh, kw, C, O]."""

    def to_ours(self, w, dims):
        return w.transpose(2, 3, 1, 0)

    def to_hf(self, w, dims):
        return w.transpose(3, 2, 0, 1)


Transform = Same | Reshape | Linear | Conv


@dataclasses.dataclass(frozen=True)
class MappingTable:
    name: str
    root: tuple[str, ...]                      # where the component sits in our tree
    global_rows: tuple[tuple[str, str, Any], ...]
    layer_rows: tuple[tuple[str, str, Any], ...]
    num_layers: Callable[[ModelConfig], int]
    dims: Callable[[ModelConfig], dict[str, int]]
    ignore: tuple[str, ...] = ()               # regexes of HF tensors we do not use
    optional: Callable[[ModelConfig], tuple[str, ...]] = lambda cfg: ()  # HF rows absent by config
    prefixes: tuple[str, ...] = ()             # stripped on import (full-model checkpoints)

    def normalize(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Names as the table writes them: a component prefix such as ``vision_model.`` removed."""
        out = {}
        for name, value in tensors.items():
            for prefix in self.prefixes:
                if name.startswith(prefix):
                    name = name[len(prefix):]
                    break
            out[name] = value
        return out


def _linear(ours: str, in_dims, out_dims):
    return ours, Linear(tuple(in_dims), tuple(out_dims))


def _qwen3_rows():
    attn = "model.layers.{i}.self_attn."
    mlp = "model.layers.{i}.mlp."
    return (
        ("model.layers.{i}.input_layernorm.weight", "input_norm/scale", Same()),
        ("model.layers.{i}.post_attention_layernorm.weight", "post_attn_norm/scale", Same()),
        (attn + "q_proj.weight", *_linear("attn/q_proj/kernel", ["hidden"], ["heads", "head_dim"])),
        (attn + "k_proj.weight", *_linear("attn/k_proj/kernel", ["hidden"], ["kv_heads", "head_dim"])),
        (attn + "v_proj.weight", *_linear("attn/v_proj/kernel", ["hidden"], ["kv_heads", "head_dim"])),
        (attn + "o_proj.weight", *_linear("attn/o_proj/kernel", ["heads", "head_dim"], ["hidden"])),
        (attn + "q_norm.weight", "attn/q_norm/scale", Same()),
        (attn + "k_norm.weight", "attn/k_norm/scale", Same()),
        (mlp + "gate_proj.weight", *_linear("mlp/gate_proj/kernel", ["hidden"], ["intermediate"])),
        (mlp + "up_proj.weight", *_linear("mlp/up_proj/kernel", ["hidden"], ["intermediate"])),
        (mlp + "down_proj.weight", *_linear("mlp/down_proj/kernel", ["intermediate"], ["hidden"])),
    )


def _decoder_dims(cfg: ModelConfig) -> dict[str, int]:
    d = cfg.decoder
    return {"hidden": d.hidden_size, "heads": d.num_heads, "kv_heads": d.num_kv_heads,
            "head_dim": d.head_dim, "intermediate": d.intermediate_size, "vocab": d.vocab_size}


QWEN3_DECODER = MappingTable(
    name="qwen3",
    root=("params", "decoder"),
    global_rows=(
        ("model.embed_tokens.weight", "embedding", Same()),
        ("model.norm.weight", "final_norm/scale", Same()),
        ("lm_head.weight", *_linear("lm_head/kernel", ["hidden"], ["vocab"])),
    ),
    layer_rows=_qwen3_rows(),
    num_layers=lambda cfg: cfg.decoder.num_layers,
    dims=_decoder_dims,
    ignore=(r"rotary_emb\.inv_freq$",),
    optional=lambda cfg: ("lm_head.weight",) if cfg.decoder.tie_embeddings else (),
)


def _siglip_layer_rows():
    layer = "encoder.layers.{i}."
    rows = [
        (layer + "layer_norm1.weight", "ln1/scale", Same()),
        (layer + "layer_norm1.bias", "ln1/bias", Same()),
        (layer + "layer_norm2.weight", "ln2/scale", Same()),
        (layer + "layer_norm2.bias", "ln2/bias", Same()),
        (layer + "self_attn.out_proj.weight", *_linear("out_proj/kernel", ["heads", "head_dim"], ["hidden"])),
        (layer + "self_attn.out_proj.bias", "out_proj/bias", Same()),
        (layer + "mlp.fc1.weight", *_linear("fc1/kernel", ["hidden"], ["mlp"])),
        (layer + "mlp.fc1.bias", "fc1/bias", Same()),
        (layer + "mlp.fc2.weight", *_linear("fc2/kernel", ["mlp"], ["hidden"])),
        (layer + "mlp.fc2.bias", "fc2/bias", Same()),
    ]
    for proj in ("q_proj", "k_proj", "v_proj"):
        rows.append((layer + f"self_attn.{proj}.weight",
                     *_linear(f"{proj}/kernel", ["hidden"], ["heads", "head_dim"])))
        rows.append((layer + f"self_attn.{proj}.bias", f"{proj}/bias", Reshape(("heads", "head_dim"))))
    return tuple(rows)


def _vision_dims(cfg: ModelConfig) -> dict[str, int]:
    v = cfg.vision
    return {"hidden": v.hidden_size, "heads": v.num_heads, "head_dim": v.hidden_size // v.num_heads,
            "mlp": v.mlp_dim, "patch": cfg.layout.patch_size, "channels": 3}


_SIGLIP_GLOBAL_TAIL = (
    ("embeddings.patch_embedding.bias", "patch_bias", Same()),
    ("embeddings.position_embedding.weight", "pos_embedding", Same()),
    ("post_layernorm.weight", "post_norm/scale", Same()),
    ("post_layernorm.bias", "post_norm/bias", Same()),
)
# The attention-pooling head and, in a full SigLIP checkpoint, the text tower are unused.
_SIGLIP_IGNORE = (r"^head\.", r"^(text_model\.|logit_scale|logit_bias)", r"position_ids$")

SIGLIP_VISION = MappingTable(
    name="siglip",
    root=("params", "vision"),
    global_rows=(("embeddings.patch_embedding.weight", "patch_kernel", Conv()),)
    + _SIGLIP_GLOBAL_TAIL,
    layer_rows=_siglip_layer_rows(),
    num_layers=lambda cfg: cfg.vision.num_layers,
    dims=_vision_dims,
    ignore=_SIGLIP_IGNORE,
    prefixes=("vision_model.",),
)

# SigLIP2 (NaFlex) embeds pre-flattened patches, ordered (row, col, channel), with a Linear.
SIGLIP2_VISION = dataclasses.replace(
    SIGLIP_VISION, name="siglip2",
    global_rows=(("embeddings.patch_embedding.weight",
                  *_linear("patch_kernel", ["patch", "patch", "channels"], ["hidden"])),)
    + _SIGLIP_GLOBAL_TAIL,
)

TABLES = {t.name: t for t in (QWEN3_DECODER, SIGLIP_VISION, SIGLIP2_VISION)}


def _expand(table: MappingTable, cfg: ModelConfig):
    """(hf_name, our_path_parts, transform, layer_index or None) for every tensor."""
    skip = set(table.optional(cfg))
    for hf, ours, transform in table.global_rows:
        if hf in skip:
            continue
        yield hf, tuple(ours.split("/")), transform, None
    for i in range(table.num_layers(cfg)):
        for hf, ours, transform in table.layer_rows:
            yield hf.format(i=i), tuple(ours.split("/")), transform, i


def _layer_path(parts: tuple[str, ...], layer: int | None, scan: bool) -> tuple[str, ...]:
    if layer is None:
        return parts
    return ("blocks", "layers" if scan else f"layers_{layer}") + parts


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def tensor_rows(table: MappingTable, cfg: ModelConfig):
    """``(hf_name, leaf_path, transform, index)`` per HF tensor, in table order: ``leaf_path``
    is the full path of our parameter (root included) and ``index`` the layer to take from
    its stacked leading axis (scanned layers), or None when the leaf is the whole tensor.
    Lets a streaming exporter read one leaf at a time."""
    for hf, parts, transform, layer in _expand(table, cfg):
        path = table.root + _layer_path(parts, layer, cfg.scan_layers)
        yield hf, path, transform, layer if (layer is not None and cfg.scan_layers) else None


def import_hf(table: MappingTable, tensors: Mapping[str, np.ndarray], cfg: ModelConfig,
              dtype=np.float32) -> dict:
    """HF tensors -> our nested param dict for the table's component (``{"params": {...}}``).

    Raises ``KeyError`` naming a missing tensor and ``ValueError`` naming an unexpected one.
    """
    dims = table.dims(cfg)
    tensors = table.normalize(tensors)
    per_layer: dict[tuple[str, ...], list] = {}
    tree: dict = {}
    used = set()
    for hf, parts, transform, layer in _expand(table, cfg):
        if hf not in tensors:
            raise KeyError(f"{table.name} checkpoint lacks tensor {hf!r}")
        used.add(hf)
        value = transform.to_ours(np.asarray(tensors[hf]).astype(dtype), dims)
        if layer is not None and cfg.scan_layers:
            per_layer.setdefault(parts, []).append(value)
        else:
            _set(tree, table.root + _layer_path(parts, layer, cfg.scan_layers), value)
    for parts, values in per_layer.items():
        _set(tree, table.root + _layer_path(parts, 0, True), np.stack(values))
    ignored = [re.compile(p) for p in table.ignore] + [re.compile(re.escape(n) + "$")
                                                        for n in table.optional(cfg)]
    unexpected = [n for n in tensors if n not in used and not any(p.search(n) for p in ignored)]
    if unexpected:
        raise ValueError(f"{table.name} checkpoint has tensors the mapping does not know: "
                         f"{', '.join(sorted(unexpected)[:5])}")
    return tree


def export_hf(table: MappingTable, params: Mapping, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our param tree (``{"params": ...}``, unboxed) -> HF tensor dict for the component."""
    dims = table.dims(cfg)
    out = {}
    for hf, parts, transform, layer in _expand(table, cfg):
        value = np.asarray(_get(params, table.root + _layer_path(parts, layer, cfg.scan_layers)))
        if layer is not None and cfg.scan_layers:
            value = value[layer]
        out[hf] = np.ascontiguousarray(transform.to_hf(value, dims))
    return out


_QWEN3_CONFIG_KEYS = {  # our DecoderConfig field -> HF Qwen3Config key
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads", "num_kv_heads": "num_key_value_heads",
    "head_dim": "head_dim", "intermediate_size": "intermediate_size",
    "rms_norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings",
}


def decoder_config_from_hf(hf: Mapping[str, Any]) -> DecoderConfig:
    """A Qwen3 ``config.json`` -> :class:`DecoderConfig`; unsupported variants fail loudly."""
    if hf.get("model_type") != "qwen3":
        raise ValueError(f"expected a qwen3 config.json, got model_type={hf.get('model_type')!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"rope scaling {rope} is not supported (plain RoPE only)")
    theta = hf.get("rope_theta", rope.get("rope_theta"))
    if theta is None:
        raise ValueError("config.json gives no rope_theta")
    if hf.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not supported")
    values = {ours: hf[key] for ours, key in _QWEN3_CONFIG_KEYS.items() if key in hf}
    values.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    return DecoderConfig(rope_theta=float(theta), **values)


def export_decoder_config(cfg: DecoderConfig) -> dict[str, Any]:
    """:class:`DecoderConfig` -> the fields of a HF ``Qwen3Config``."""
    out = {key: getattr(cfg, ours) for ours, key in _QWEN3_CONFIG_KEYS.items()}
    out.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], rope_theta=cfg.rope_theta,
               hidden_act="silu", attention_bias=False)
    return out
