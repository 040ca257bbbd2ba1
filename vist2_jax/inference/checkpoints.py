"""Load what inference needs from a training run directory (``vist2 train`` / ``vist2 demo``):
the resolved config (``config.yaml``), the newest readable checkpoint's parameters, and
the tokenizer and renderer config saved inside that checkpoint."""

from __future__ import annotations

from pathlib import Path

import flax.linen as nn
import yaml

from vist2_jax.config.loader import build
from vist2_jax.config.schema import Config, ConfigError


def is_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.yaml").is_file() and (path / "checkpoints").is_dir()


def load_run(workdir: str | Path):
    """(Config, ``{"params": ...}`` on the default device, tokenizer, step) of a run."""
    from data_pipelines.tokenizer import load_tokenizer
    from vist2_jax.model.vist2 import abstract_params
    from vist2_jax.training.checkpoint import RunCheckpoints, restore_params, write_tokenizer_asset

    workdir = Path(workdir)
    if not is_run_dir(workdir):
        raise ConfigError(f"--checkpoint: {workdir} is not a training run (no config.yaml + checkpoints/)")
    config = build(Config, yaml.safe_load((workdir / "config.yaml").read_text())).validate()
    step, params = restore_params(workdir, nn.unbox(abstract_params(config.model)))
    checkpoints = RunCheckpoints(workdir, keep=1000, async_save=False)
    try:
        asset = checkpoints.read_json(step, "tokenizer")
    finally:
        checkpoints.close()
    tokenizer = load_tokenizer(write_tokenizer_asset(asset, workdir / "checkpoints" / f"tokenizer_step_{step}"))
    return config, params, tokenizer, step


def load_run_renderer(workdir: str | Path, step: int, font_path: str | None = None):
    """The SketchRenderer a run trained with, from the renderer config saved at ``step``
    (``data_pipelines.render.renderer_from_saved``: a font whose sha256 differs from the
    recorded one is a FontError)."""
    from data_pipelines.render import renderer_from_saved
    from vist2_jax.training.checkpoint import RunCheckpoints

    checkpoints = RunCheckpoints(workdir, keep=1000, async_save=False)
    try:
        saved = checkpoints.read_json(step, "renderer")
    finally:
        checkpoints.close()
    return renderer_from_saved(saved, font_path)
