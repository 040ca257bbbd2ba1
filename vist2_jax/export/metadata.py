"""What an export folder carries besides weights: the HF ``config.json`` of the decoder and
the vision tower, the run's font (sha256-checked, with its licence), and the commit of the
code that wrote it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from vist2_jax import storage
from vist2_jax.config.schema import ConfigError, ModelConfig
from vist2_jax.convert.hf_mapping import export_decoder_config


def decoder_hf_config(model: ModelConfig, dtype, special_ids: dict) -> dict:
    out = export_decoder_config(model.decoder)
    out.update(dtype=dtype.name, max_position_embeddings=40960, use_cache=True,
               rope_parameters={"rope_type": "default", "rope_theta": model.decoder.rope_theta},
               pad_token_id=special_ids.get("pad"), bos_token_id=special_ids.get("bos"),
               eos_token_id=special_ids.get("eos"))
    return out


def vision_hf_config(model: ModelConfig, vision: str, dtype) -> dict:
    v, layout = model.vision, model.layout
    out = {"hidden_size": v.hidden_size, "intermediate_size": v.mlp_dim, "num_hidden_layers": v.num_layers,
           "num_attention_heads": v.num_heads, "num_channels": 3, "patch_size": layout.patch_size,
           "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": v.layer_norm_eps, "attention_dropout": 0.0,
           "vision_use_head": False, "dtype": dtype.name}
    if vision == "siglip2":
        out.update(model_type="siglip2_vision_model", architectures=["Siglip2VisionModel"],
                   num_patches=layout.patch_grid ** 2)
    else:
        out.update(model_type="siglip_vision_model", architectures=["SiglipVisionModel"],
                   image_size=layout.image_size)
    return out


def copy_font(renderer: dict, directory: Path, override: str | None) -> tuple[str, str]:
    """Copy the run's font (resolved and checked against its recorded sha256 exactly as
    generation does: ``renderer_from_saved``) and its licence into ``directory``; returns
    (path relative to the export, sha256)."""
    from importlib import resources

    from data_pipelines.fonts import FontError
    from data_pipelines.render import renderer_from_saved

    try:
        source = renderer_from_saved(renderer, override).source
    except FontError as err:
        raise ConfigError(f"--font: {err}") from None
    if source.file.startswith("bundled:"):
        name = source.file.split(":", 1)[1]
        folder = resources.files("data_pipelines").joinpath("font_files")
        licences = [(p.name, p.read_bytes()) for p in folder.iterdir() if "LICENSE" in p.name.upper()]
    else:
        path = storage.as_path(source.file)  # a configured font may live on gs:// too
        name = path.name
        licences = [(p.name, p.read_bytes()) for p in path.parent.iterdir() if p.is_file() and
                    any(word in p.name.upper() for word in ("LICENSE", "LICENCE", "COPYING"))]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(source.data)
    for licence, data in licences:
        (directory / licence).write_bytes(data)
    return f"{directory.name}/{name}", source.sha256


def git_commit() -> str:
    """The commit of this checkout (``+dirty`` with uncommitted changes), or ``unknown``."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")
