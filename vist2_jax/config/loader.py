"""Load a :class:`Config` from a YAML recipe plus ``key=value`` overrides.

Resolution order (later wins): the model preset named by ``preset`` (default ``tiny``),
the recipe chain (a recipe may name a ``base:`` recipe, relative to itself, or a list of them,
merged in order: a stage recipe plus an overlay such as ``recipes/proof/proof.yaml``), the chain's
``stages:`` entry for the run's ``data.stage``, then the command-line overrides. Every key
and value is checked against the schema; a mistake raises :class:`ConfigError` naming the
dotted key.

One stage file serves every size: ``{size}`` in a ``base:`` path or a string value is
replaced by the size named on the command line (``size=NAME``, a loader key, not a config
field; ``preset=NAME`` also selects), so ``recipes/stage3_olm.yaml size=8b`` chains to
``recipes/sizes/8b.yaml`` and ``size=8b-h100x8`` to its GPU variant; a size file's
``stages: {olm: {...}}`` holds what that size tunes per stage (remat, accumulation).
``{root}`` likewise becomes ``root=PATH`` (default ``.``): where a sweep keeps its runs and
prepared data, e.g. ``root=gs://my-bucket/vist2`` on a pod, whose hosts share no disk.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from vist2_jax.config.presets import preset_model
from vist2_jax.config.schema import Config, ConfigError, DataConfig

DEFAULT_ROOT = "."  # {root} in recipes when root= is not given


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["model.decoder.num_layers=2", ...]`` -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item}: overrides look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {err}") from None
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is set both as a value and as a section")
        node[parts[-1]] = value
    return tree


def _substitute(tree: Any, size: str | None, root: str, where: Path) -> Any:
    """``{size}`` and ``{root}`` in every string of ``tree`` -> the size name and the root."""
    if isinstance(tree, dict):
        return {k: _substitute(v, size, root, where) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_substitute(v, size, root, where) for v in tree]
    if isinstance(tree, str) and "{size}" in tree:
        if not size:
            raise ConfigError(f"size: {where} is shared by every size; name one, e.g. size=0.6b")
        tree = tree.replace("{size}", size)
    if isinstance(tree, str) and "{root}" in tree:  # no root: paths stay relative ("runs/...")
        tree = tree.replace("{root}/", "") if root == DEFAULT_ROOT else tree.replace("{root}", root)
    return tree


def _read_recipe(path: Path, seen: tuple[Path, ...] = (), size: str | None = None,
                 root: str = DEFAULT_ROOT) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"base: recipe chain loops back to {path}")
    if not path.is_file():
        raise ConfigError(f"recipe: no such file {path}")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"recipe: {path} is not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 1]!r});"
                          " a recipe is a YAML file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"recipe: {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe: {path} must hold a mapping at the top level")
    size = size or (tree.get("preset") if isinstance(tree.get("preset"), str) else None)
    tree = _substitute(tree, size, root, path)
    base = tree.pop("base", None)
    if base is None:
        return tree
    bases = base if isinstance(base, list) else [base]
    if not bases or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"base: in {path} must name a recipe or a list of recipes, got {base!r}")
    merged: dict[str, Any] = {}
    for name in bases:
        merged = _merge(merged, _read_recipe(path.parent / name, seen + (path,), size, root))
    return _merge(merged, tree)


def _apply_stage_tuning(tree: dict[str, Any], stage: Any = None) -> dict[str, Any]:
    """Merge the ``stages:`` entry of the run's ``data.stage`` (a size's per-stage tuning);
    ``stage`` set on the command line wins over the recipe's."""
    tuning = tree.pop("stages", None) or {}
    if not isinstance(tuning, Mapping):
        raise ConfigError(f"stages: expected a mapping of stage name to settings, got {tuning!r}")
    stages = typing.get_args(typing.get_type_hints(DataConfig)["stage"])
    for name in tuning:
        if name not in stages:
            raise ConfigError(f"stages.{name}: unknown stage; choose from {', '.join(stages)}")
    data = tree.get("data")
    stage = stage or (data.get("stage") if isinstance(data, Mapping) else None) or DataConfig.stage
    return _merge(tree, tuning.get(stage) or {})


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _coerce(value: Any, kind: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(kind):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[-1])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_kind = typing.get_args(kind)[0]
        if dataclasses.is_dataclass(item_kind):
            return tuple(build(item_kind, item, f"{key}[{i}]") for i, item in enumerate(value))
        return tuple(_coerce(item, item_kind, f"{key}[{i}]") for i, item in enumerate(value))
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"schema type {kind!r} of {key} has no loader")  # a schema bug, not user error


def build(cls: type, tree: Any, prefix: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a nested mapping, checking every key and type."""
    where = prefix or "config"
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{where}: expected a section (mapping), got {tree!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in tree:
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"{prefix + '.' if prefix else ''}{key}: unknown key{suggestion}")
    kwargs = {}
    for name in names:
        if name not in tree:
            continue
        key = f"{prefix}.{name}" if prefix else name
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = build(kind, tree[name], key)
        else:
            kwargs[name] = _coerce(tree[name], kind, key)
    return cls(**kwargs)


# What earlier versions saved (RUN/config.yaml, the checkpoint's config item) that this
# schema reads differently: (section, key) -> the value as this schema wants it.
_SAVED_UPGRADES = {
    ("data", "ocr_shuffle"): lambda value: float(value) if isinstance(value, bool) else value,  # was a bool
}


def build_saved(tree: Any) -> Config:
    """A run's saved config (any version of this code), upgraded, built and validated."""
    if isinstance(tree, Mapping):
        tree = {section: dict(values) if isinstance(values, Mapping) else values for section, values in tree.items()}
        for (section, key), upgrade in _SAVED_UPGRADES.items():
            if isinstance(tree.get(section), dict) and key in tree[section]:
                tree[section][key] = upgrade(tree[section][key])
    return build(Config, tree).validate()


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (YAML-safe) of a config, for saving the resolved run config."""
    return dataclasses.asdict(config)


def load_config(recipe: str | Path | None = None, overrides: Sequence[str] = (),
                preset: str | None = None) -> Config:
    """Resolve preset -> recipe chain -> overrides into a validated :class:`Config`."""
    cli = parse_overrides(overrides)
    size = cli.pop("size", None)
    if size is not None and not isinstance(size, str):
        size = str(size)
    root = str(cli.pop("root", DEFAULT_ROOT)).rstrip("/") or DEFAULT_ROOT
    named = size or preset or (cli.get("preset") if isinstance(cli.get("preset"), str) else None)
    tree: dict[str, Any] = _read_recipe(Path(recipe), size=named, root=root) if recipe else {}
    data = cli.get("data")
    tree = _merge(_apply_stage_tuning(tree, data.get("stage") if isinstance(data, dict) else None), cli)
    if preset is not None:
        tree["preset"] = preset
    name = tree.get("preset", Config.preset)
    if not isinstance(name, str):
        raise ConfigError(f"preset: expected a preset name, got {name!r}")
    base = to_dict(Config(preset=name, model=preset_model(name)))
    return build(Config, _merge(base, tree)).validate()
