"""Loading a run back: the one place that turns a run directory into what the next consumer
needs (the next training stage, generation, scoring, evaluation, export).

A run directory is what ``vist2 train`` writes: ``config.yaml`` + ``checkpoints/<step>/``
(Orbax: params, optimizer state, Grain state, config, tokenizer bytes, renderer config).
``resolve_run_dir`` also accepts what users point at in practice: a step folder
(``.../checkpoints/40``) and a ``vist2 demo`` directory (its newest stage that has a
checkpoint). Any of them may be local or on an object store (``gs://``; see ``storage``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import yaml
from etils import epath

from vist2_jax import storage
from vist2_jax.checkpointing.checkpoints import RunCheckpoints, write_tokenizer_asset
from vist2_jax.config.loader import build_saved
from vist2_jax.config.schema import Config, ConfigError


@dataclasses.dataclass
class LoadedRun:
    """A run's resolved config, one checkpoint's params, its tokenizer and renderer config."""

    workdir: epath.Path  # local or gs://
    step: int
    config: Config
    params: Any  # {"params": {"vision", "aligner", "decoder"}} on the default device
    tokenizer: Any
    renderer: dict  # the renderer config saved with the checkpoint

    def sketch_renderer(self, font_path: str | None = None):
        """The SketchRenderer this run trained with, from its saved renderer config; a font
        whose sha256 differs from the recorded one is a one-line ``FontError``. ``font_path``:
        the same font file at another path on this machine."""
        from data_pipelines.render import renderer_from_saved

        return renderer_from_saved(self.renderer, font_path)


def is_run_dir(path: storage.PathLike) -> bool:
    path = storage.as_path(path)
    return (path / "config.yaml").is_file() and (path / "checkpoints").is_dir()


def resolve_run_dir(path: storage.PathLike, what: str = "--checkpoint") -> tuple[epath.Path, int | None]:
    """(run directory, step or None) for a run dir, a step folder or a demo directory."""
    path = storage.as_path(path)
    if not path.exists():
        raise ConfigError(f"{what}: no such directory {path}")
    if is_run_dir(path):
        return path, None
    if path.name.isdigit() and path.parent.name == "checkpoints" and is_run_dir(path.parent.parent):
        return path.parent.parent, int(path.name)
    stages = sorted(child for child in path.iterdir() if child.is_dir() and is_run_dir(child)) \
        if path.is_dir() else []
    with_steps = [stage for stage in stages if any(p.name.isdigit() for p in (stage / "checkpoints").iterdir())]
    if with_steps:
        return with_steps[-1], None
    raise ConfigError(f"{what}: {path} is not a training run (no config.yaml + checkpoints/, "
                      "no step folder, no stage directory with checkpoints)")


def load_config_of(workdir: storage.PathLike) -> Config:
    path = storage.as_path(workdir) / "config.yaml"
    try:
        return build_saved(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: {err}") from None


def restore_params(workdir: storage.PathLike, abstract_params: Any, step: int | None = None,
                   what: str = "train.init_from") -> tuple[int, Any]:
    """(step, params) of the newest readable checkpoint of a run (or of ``step``)."""
    checkpoints = RunCheckpoints(workdir, keep=1000, async_save=False)
    try:
        if step is not None and step not in checkpoints.steps():
            raise ConfigError(f"{what}: {checkpoints.directory} has no step {step} "
                              f"(steps: {checkpoints.steps() or 'none'})")
        found = checkpoints.restore_latest({"params": abstract_params}, params_only=True, only_step=step)
    finally:
        checkpoints.close()
    if found is None:
        detail = "; ".join(f"step {s}: {r}" for s, r in sorted(checkpoints.unreadable.items()))
        raise ConfigError(f"{what}: no readable checkpoint under {checkpoints.directory}"
                          + (f" ({detail})" if detail else ""))
    return found[0], found[1]["params"]


def load_run(path: storage.PathLike, step: int | None = None, what: str = "--checkpoint") -> LoadedRun:
    """Everything inference, evaluation and export need from a run, in one call."""
    from data_pipelines.tokenizer import load_tokenizer
    from vist2_jax.model.vist2 import abstract_params

    workdir, step_in_path = resolve_run_dir(path, what)
    config = load_config_of(workdir)
    step, params = restore_params(workdir, nn.unbox(abstract_params(config.model)),
                                  step if step is not None else step_in_path, what)
    checkpoints = RunCheckpoints(workdir, keep=1000, async_save=False)
    try:
        asset = checkpoints.read_json(step, "tokenizer")
        renderer = checkpoints.read_json(step, "renderer")
    finally:
        checkpoints.close()
    # reading a run writes nothing into it (a bucket may be read-only): the tokenizer file
    # goes to a local folder of this process
    tokenizer = load_tokenizer(write_tokenizer_asset(asset, storage.scratch_folder(f"{workdir}@{step}/tokenizer")))
    return LoadedRun(workdir, step, config, params, tokenizer, renderer)
