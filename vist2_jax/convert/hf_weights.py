"""Hugging Face weights into the model: the one place that reads HF folders.

``load_hf_decoder`` reads a Qwen3 folder alone (scoring, text-mode generation);
``init_components_from_hf`` puts a Qwen3 decoder and/or a SigLIP(2) vision tower into
fresh VIST2 params at the start of a stage (``train.init_decoder_hf`` / ``init_vision_hf``).
The name/shape mappings themselves are the declarative tables of ``hf_mapping``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax

from vist2_jax import storage
from vist2_jax.config.schema import Config, ConfigError, ModelConfig
from vist2_jax.convert.hf_mapping import (QWEN3_DECODER, SIGLIP2_VISION, SIGLIP_VISION, MappingTable,
                                          decoder_config_from_hf, import_hf)
from vist2_jax.convert.safetensors_io import read_checkpoint_dir

log = logging.getLogger(__name__)


def _hf_config(directory: Path, what: str) -> dict:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{what}: {directory} has no config.json")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{what}: {config_file}: not JSON ({err})") from None


def vision_table(hf_config: dict) -> MappingTable:
    """SigLIP2 and SigLIP vision towers differ in their patch embedding: pick the table."""
    return SIGLIP2_VISION if "siglip2" in hf_config.get("model_type", "") else SIGLIP_VISION


def vision_format(config: Config) -> str:
    """``siglip2`` when the run's vision tower (through its ``init_from`` chain) started from a
    SigLIP2 folder, else ``siglip``: the HF class whose weight layout an export writes."""
    from vist2_jax.checkpointing.runs import load_config_of

    seen: set[str] = set()
    while True:  # the folders may be local or gs:// (a run read from a bucket): the path layer
        folder = config.train.init_vision_hf
        if folder:
            hf_config = storage.as_path(folder) / "config.json"
            kind = json.loads(hf_config.read_text()).get("model_type", "") if hf_config.is_file() else folder
            return "siglip2" if "siglip2" in kind.lower() else "siglip"
        parent = storage.as_path(config.train.init_from) if config.train.init_from else None
        if parent is None or str(parent) in seen or not (parent / "config.yaml").is_file():
            return "siglip"
        seen.add(str(parent))
        config = load_config_of(parent)


def load_hf_decoder(directory: str | Path, dtype: str = "float32",
                    what: str = "--hf-decoder") -> tuple[ModelConfig, dict]:
    """A HF Qwen3 folder -> (ModelConfig with that decoder, decoder params ``{"params": ...}``)."""
    directory = Path(directory)
    hf = _hf_config(directory, what)
    try:
        decoder = decoder_config_from_hf(hf)
    except (ValueError, KeyError) as err:
        raise ConfigError(f"{what}: {directory / 'config.json'}: {err}") from None
    decoder.validate("decoder")
    config = ModelConfig(decoder=decoder, dtype=dtype, scan_layers=True)
    tree = import_hf(QWEN3_DECODER, read_checkpoint_dir(directory), config)
    return config, {"params": tree["params"]["decoder"]}


def _shapes(tree) -> dict[str, tuple]:
    return {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def init_components_from_hf(config: Config, params: Any, shardings: Any) -> Any:
    """Replace the decoder / vision tower of fresh params with Hugging Face weights."""
    for folder, component in ((config.train.init_decoder_hf, "decoder"), (config.train.init_vision_hf, "vision")):
        if not folder:
            continue
        what = f"train.init_{component}_hf"
        table = QWEN3_DECODER if component == "decoder" else vision_table(_hf_config(Path(folder), what))
        try:
            loaded = import_hf(table, read_checkpoint_dir(folder), config.model)["params"][component]
        except (KeyError, ValueError, OSError) as err:
            raise ConfigError(f"{what}: {folder}: {err}") from None
        want, got = _shapes(params["params"][component]), _shapes(loaded)
        if want != got:
            first = next(k for k in sorted(set(want) | set(got)) if want.get(k) != got.get(k))
            raise ConfigError(f"{what}: {folder} does not fit model.{component}: "
                              f"{first} is {got.get(first)} there, {want.get(first)} here")
        params["params"][component] = jax.device_put(loaded, shardings["params"][component])
        log.info("model.%s initialised from %s", component, folder)
    return params
