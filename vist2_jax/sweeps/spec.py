"""A sweep file and its expansion into variants and stages.

```yaml
root: gs://BUCKET/vist2          # {root} of the recipes; runs go to {root}/runs/VARIANT/STAGE
recipes: .                       # folder of the stage recipes, relative to this file (default)
stages: [stage1_caption, stage2_ocr, stage3_olm, stage4_sft]   # RECIPES/STAGE.yaml, in order
retries: 2                       # relaunches of a failed or preempted stage (default 2)
overrides: [key=value, ...]      # for every stage of every variant (optional)
grid:                            # optional: every combination, for every entry of runs
  model.layout.text_len: [128, 256]
  train.learning_rate: [1.0e-4, 3.0e-4]
names: {train.learning_rate: lr} # optional short labels of grid keys in variant names
runs:                            # size (size=NAME of the recipes), optional name, overrides,
  - {size: 0.6b, tpu: vist2-0p6b, accelerator: v5p-32, zone: us-east5-a}   # + launcher fields
```

A variant is one entry of ``runs`` with one value per grid key, named readably
(``0.6b-L128_lr0.0001``); ``size`` may be a grid key too. Stage ``i`` of a variant trains
in ``{root}/runs/VARIANT/STAGE`` from the parameters of stage ``i-1`` (``train.init_from``)
and, when the recipe names no ``data.tokenizer``, with the tokenizer stage 1 trained.
Every stage's config is resolved through ``load_config`` when the file is read, so a
mistyped grid key or value fails at once with one line naming it."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from vist2_jax.config.schema import Config, ConfigError

KEYS = ("root", "recipes", "stages", "retries", "overrides", "grid", "names", "runs")
LAUNCH_FIELDS = ("tpu", "zone", "accelerator", "nodes", "image", "topology", "workers")
ENTRY_KEYS = ("size", "name", "overrides", *LAUNCH_FIELDS)
LABELS = {"model.decoder.hidden_size": "w", "model.decoder.num_layers": "d", "model.layout.text_len": "L",
          "model.layout.visual_len": "m", "train.learning_rate": "lr", "train.steps": "steps",
          "data.global_batch_size": "bs", "size": ""}  # default labels; others: the key's last part
LAUNCHERS = ("local", "tpu", "slurm", "gke")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage of one variant: ``vist2 train RECIPE *overrides``."""

    variant: str
    name: str
    index: int
    recipe: str
    overrides: tuple[str, ...]
    config: Config
    entry: dict  # the runs entry: launcher fields (tpu, zone, accelerator ...)

    @property
    def workdir(self) -> str:
        return self.config.run.workdir

    @property
    def steps(self) -> int:
        return self.config.train.steps

    def train_args(self) -> list[str]:
        """``RECIPE key=value ...`` as ``vist2 train`` takes them."""
        return [self.recipe, *self.overrides]


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    size: str
    settings: dict  # grid key -> value (and size)
    stages: tuple[Stage, ...]


@dataclasses.dataclass(frozen=True)
class Sweep:
    path: str
    root: str
    retries: int
    variants: tuple[Variant, ...]

    def stages(self) -> list[Stage]:
        return [stage for variant in self.variants for stage in variant.stages]

    def select(self, only: list[str]) -> "Sweep":
        """The variants whose settings match every ``KEY=VALUE`` (``name``/``size`` or a grid key)."""
        wanted = []
        for item in only:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--only {item}: expected KEY=VALUE")
            wanted.append((key.strip(), value.strip()))
        keys = {"name", *itertools.chain.from_iterable(v.settings for v in self.variants)}
        for key, _ in wanted:
            if key not in keys:
                raise ConfigError(f"--only {key}: not a setting of this sweep; choose from {', '.join(sorted(keys))}")
        picked = tuple(v for v in self.variants
                       if all(_text({"name": v.name, **v.settings}[key]) == _text(_parse(value)) for key, value in wanted))
        if not picked:
            raise ConfigError(f"--only {' '.join(only)}: no variant of {self.path} matches")
        return dataclasses.replace(self, variants=picked)


def _parse(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _text(value: Any) -> str:
    """A value as it appears in names and overrides (YAML flow style for lists)."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value)


def variant_name(base: str, settings: dict, labels: dict) -> str:
    """``tiny`` + {hidden_size: 128, text_len: 32} -> ``tiny-w128_L32`` (path-safe)."""
    parts = [f"{labels.get(k, LABELS.get(k, k.rsplit('.', 1)[-1]))}{_text(v)}" for k, v in settings.items()
             if k != "size"]
    name = base + ("-" + "_".join(parts) if parts else "")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def load_sweep(path: str | Path, launcher: str = "local") -> Sweep:
    """Read, expand and validate a sweep file (``launcher`` picks the SLURM size variants)."""
    from vist2_jax.config import load_config

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"sweep: cannot read {path}: {err}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"sweep: {path} must hold a mapping")
    for key in spec:
        if key not in KEYS:
            raise ConfigError(f"sweep {path}: unknown key {key!r}; known keys: {', '.join(KEYS)}")
    stages, entries = spec.get("stages") or [], spec.get("runs") or []
    if not stages or not entries:
        raise ConfigError(f"sweep {path}: needs stages: [...] and runs: [...]")
    root = str(spec.get("root") or "").rstrip("/")
    recipes = path.parent / str(spec.get("recipes", "."))
    retries = spec.get("retries", 2)
    if not isinstance(retries, int) or retries < 0:
        raise ConfigError(f"sweep {path}: retries must be an integer >= 0, got {retries!r}")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"sweep {path}: grid maps config keys to non-empty lists of values")
    common = [str(o) for o in spec.get("overrides") or []]
    variants, seen = [], set()
    for entry in entries:
        if not isinstance(entry, dict) or "size" not in entry:
            raise ConfigError(f"sweep {path}: each runs entry needs size: NAME, got {entry!r}")
        for key in entry:
            if key not in ENTRY_KEYS:
                raise ConfigError(f"sweep {path}: runs entry {entry['size']}: unknown key {key!r}")
        for values in itertools.product(*grid.values()):
            settings = {"size": str(entry["size"]), **dict(zip(grid, values))}
            size = str(settings["size"])
            name = variant_name(str(entry.get("name", size)) if "size" not in grid else size,
                                settings, spec.get("names") or {})
            if name in seen:
                raise ConfigError(f"sweep {path}: two variants are both named {name}; give runs entries a name:")
            seen.add(name)
            recipe_size = size
            if launcher == "slurm" and (recipes / "sizes" / f"{size}-h100x8.yaml").exists():
                recipe_size = f"{size}-h100x8"  # the GPU node variant of the size
            chain, previous = [], None
            for index, stage in enumerate(stages):
                recipe = recipes / f"{stage}.yaml"
                workdir = f"{root}/runs/{name}/{stage}" if root else f"runs/{name}/{stage}"
                overrides = [f"size={recipe_size}", *([f"root={root}"] if root else []), *common,
                             *map(str, entry.get("overrides") or []),
                             *(f"{k}={_text(v)}" for k, v in settings.items() if k != "size"),
                             f"run.workdir={workdir}", *([f"train.init_from={previous}"] if previous else [])]
                try:
                    config = load_config(recipe, overrides)
                    if chain and not config.data.tokenizer:  # a chain keeps the tokenizer its first stage made
                        overrides.append(f"data.tokenizer={chain[0].workdir}/tokenizer.model")
                        config = load_config(recipe, overrides)
                except ConfigError as err:
                    raise ConfigError(f"sweep {path}, variant {name}, {stage}: {err}") from None
                chain.append(Stage(name, stage, index, recipe.as_posix(), tuple(overrides), config, dict(entry)))
                previous = workdir
            variants.append(Variant(name, size, settings, tuple(chain)))
    return Sweep(path.as_posix(), root or ".", retries, tuple(variants))


def launch_command(stage: Stage, launcher: str, log_dir: str = "") -> list[str]:
    """The command that trains ``stage`` with ``launcher`` (``launch/`` scripts for clusters)."""
    import sys

    entry, args = stage.entry, stage.train_args()
    if launcher == "local":
        return [sys.executable, "-m", "vist2_jax.cli.main", "train", *args]
    if launcher == "tpu":
        return ["launch/tpu_pod.sh", "--tpu", str(entry.get("tpu", "TPU")), "--zone", str(entry.get("zone", "ZONE")),
                *(["--log-dir", log_dir] if log_dir else []), "--", *args]
    if launcher == "slurm":
        return ["sbatch", "--parsable", f"--nodes={entry.get('nodes', 1)}",
                *([f"--output={log_dir}/slurm-%j.log"] if log_dir else []), "launch/slurm.sbatch", *args]
    if launcher == "gke":
        return ["launch/gke.sh", "--name", job_name(stage), "--image", str(entry.get("image", "IMAGE")),
                "--accelerator", "tpu-v5p-slice", "--topology", str(entry.get("topology", "TOPOLOGY")),
                "--workers", str(entry.get("workers", 1)), "--", *args]
    raise ConfigError(f"--launcher {launcher}: choose one of {', '.join(LAUNCHERS)}")


def job_name(stage: Stage) -> str:
    """A Kubernetes name (lowercase, digits, '-', at most 63 characters) for a stage."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"{stage.variant}-{stage.name}".lower()).strip("-")
    return name[:63].rstrip("-")


def expand(sweep_file: str | Path, launcher: str = "tpu") -> list[dict]:
    """Every stage of every variant with its launch command, as plain dicts (``vist2 sweep
    FILE --json``, ``vist2 aot --sweep``)."""
    sweep = load_sweep(sweep_file, launcher)
    return [{"size": v.size, "variant": v.name, "stage": s.name, "recipe": s.recipe, "overrides": list(s.overrides),
             "accelerator": s.entry.get("accelerator", ""), "workdir": s.workdir, "steps": s.steps,
             "global_batch_size": s.config.data.global_batch_size,
             "command": shlex.join(launch_command(s, launcher))}
            for v in sweep.variants for s in v.stages]
