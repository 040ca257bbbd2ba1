"""The one typed config schema: frozen dataclasses, validated on construction.

Every field is reachable from a recipe YAML or a ``key=value`` override by its
dotted path (``model.decoder.num_layers=2``). Validation messages always name
that dotted path, so a bad config fails with one line a user can act on.
"""

from __future__ import annotations

import dataclasses
from typing import Literal


class ConfigError(ValueError):
    """A recipe, override or preset that cannot be used; the message names the key."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Qwen3-style decoder. ``head_dim`` is explicit: Qwen3 does not use hidden/heads."""

    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 384
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True

    def validate(self, prefix: str) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size"):
            _require(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
        _require(self.num_heads % self.num_kv_heads == 0, f"{prefix}.num_kv_heads",
                 f"{self.num_kv_heads} KV heads do not divide {self.num_heads} query heads")
        _require(self.head_dim % 2 == 0, f"{prefix}.head_dim", "must be even for RoPE")
        _require(self.rope_theta > 0, f"{prefix}.rope_theta", "must be positive")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP-style ViT tower; its input geometry lives in :class:`LayoutConfig`."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    mlp_dim: int = 512
    layer_norm_eps: float = 1e-6

    def validate(self, prefix: str) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "mlp_dim"):
            _require(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
        _require(self.hidden_size % self.num_heads == 0, f"{prefix}.num_heads",
                 f"{self.num_heads} heads do not divide hidden size {self.hidden_size}")


@dataclasses.dataclass(frozen=True)
class AlignerConfig:
    """Spatial merge of ViT patches, then a projector into the decoder's embedding space.

    ``tanh`` is the paper's per-token ``tanh(x W + b)``; ``mlp`` is Linear-GELU-Linear.
    """

    projector: Literal["mlp", "tanh"] = "mlp"


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """How text chunks and sketch images share a row (DESIGN §1, §4).

    ``text_len`` is L (text tokens per chunk), ``visual_len`` is m (visual tokens per
    image) and must equal ``(image_size / patch_size / merge) ** 2``.
    """

    text_len: int = 64
    visual_len: int = 16
    image_size: int = 128
    patch_size: int = 16
    merge: int = 2
    visual_attends_past_visual: bool = False

    @property
    def patch_grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def compression_ratio(self) -> float:
        return self.text_len / self.visual_len

    def validate(self, prefix: str) -> None:
        for name in ("text_len", "visual_len", "image_size", "patch_size", "merge"):
            _require(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")
        _require(self.image_size % self.patch_size == 0, f"{prefix}.patch_size",
                 f"patch size {self.patch_size} does not divide image size {self.image_size}")
        _require(self.patch_grid % self.merge == 0, f"{prefix}.merge",
                 f"merge {self.merge} does not divide the {self.patch_grid}x{self.patch_grid} patch grid")
        expected = (self.patch_grid // self.merge) ** 2
        _require(self.visual_len == expected, f"{prefix}.visual_len",
                 f"is {self.visual_len} but the layout gives ({self.image_size}/{self.patch_size}"
                 f"/{self.merge})^2 = {expected} visual tokens per image")
        _require(self.text_len % self.visual_len == 0, f"{prefix}.text_len",
                 f"L={self.text_len} is not a whole multiple of m={self.visual_len} "
                 "(the compression ratio L/m must be an integer)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    decoder: DecoderConfig = DecoderConfig()
    vision: VisionConfig = VisionConfig()
    aligner: AlignerConfig = AlignerConfig()
    layout: LayoutConfig = LayoutConfig()
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    scan_layers: bool = True
    remat_policy: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    attention_impl: Literal["auto", "dense", "xla_chunked"] = "auto"

    def validate(self, prefix: str) -> None:
        self.decoder.validate(f"{prefix}.decoder")
        self.vision.validate(f"{prefix}.vision")
        self.layout.validate(f"{prefix}.layout")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What one packed row looks like (DESIGN §2) and where rows come from."""

    seq_len: int = 512
    global_batch_size: int = 8
    images_per_row: int = 8
    source: str = "embedded"

    def validate(self, prefix: str) -> None:
        for name in ("seq_len", "global_batch_size", "images_per_row"):
            _require(getattr(self, name) > 0, f"{prefix}.{name}", "must be positive")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    learning_rate: float = 3e-4
    warmup_steps: int = 10
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0
    z_loss_weight: float = 0.0
    grad_accum_steps: int = 1

    def validate(self, prefix: str) -> None:
        _require(self.steps > 0, f"{prefix}.steps", "must be positive")
        _require(self.learning_rate > 0, f"{prefix}.learning_rate", "must be positive")
        _require(0 <= self.warmup_steps <= self.steps, f"{prefix}.warmup_steps",
                 f"must lie in [0, train.steps={self.steps}]")
        _require(self.weight_decay >= 0, f"{prefix}.weight_decay", "must be >= 0")
        _require(self.grad_clip_norm >= 0, f"{prefix}.grad_clip_norm", "must be >= 0 (0 turns it off)")
        _require(self.z_loss_weight >= 0, f"{prefix}.z_loss_weight", "must be >= 0")
        _require(self.grad_accum_steps > 0, f"{prefix}.grad_accum_steps", "must be positive")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; one axis may be -1, meaning "all devices left over"."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def axis_sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    def validate(self, prefix: str) -> None:
        sizes = self.axis_sizes()
        for name, size in sizes.items():
            _require(size == -1 or size > 0, f"{prefix}.{name}", "must be positive or -1")
        _require(sum(size == -1 for size in sizes.values()) <= 1, prefix,
                 "at most one mesh axis may be -1")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    workdir: str = "runs/default"
    seed: int = 0
    log_every: int = 10


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run. ``preset`` names the model preset the recipe started from."""

    preset: str = "tiny"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()
    run: RunConfig = RunConfig()

    def validate(self) -> "Config":
        self.model.validate("model")
        self.data.validate("data")
        self.train.validate("train")
        self.mesh.validate("mesh")
        return self
