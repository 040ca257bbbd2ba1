"""Typed configuration: schema, presets, and the YAML + ``key=value`` loader."""

from vist2_jax.config.loader import load_config, parse_overrides
from vist2_jax.config.presets import PRESETS, preset_model
from vist2_jax.config.schema import (AlignerConfig, Config, ConfigError, CurriculumPoint, DataConfig,
                                     DecoderConfig, LayoutConfig, MeshConfig, ModelConfig,
                                     RunConfig, TrainConfig, VisionConfig)

__all__ = [
    "AlignerConfig", "Config", "ConfigError", "CurriculumPoint", "DataConfig", "DecoderConfig", "LayoutConfig",
    "MeshConfig", "ModelConfig", "PRESETS", "RunConfig", "TrainConfig", "VisionConfig",
    "load_config", "parse_overrides", "preset_model",
]
