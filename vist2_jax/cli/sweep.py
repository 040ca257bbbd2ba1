"""``vist2 sweep FILE [--launcher tpu|slurm|gke]``: expand a sweep file into its runs and
the exact launch command of each (every stage of every size), validating every recipe.
A run is ``recipes/STAGE.yaml size=SIZE root=ROOT``; with ``--launcher slurm`` the size's
8xH100 variant (``sizes/SIZE-h100x8.yaml``) where there is one. ``root:`` in the sweep file
is where runs and prepared data live (a bucket for TPU pods, whose hosts share no disk)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import yaml

from vist2_jax.config.schema import ConfigError

LAUNCHERS = ("tpu", "slurm", "gke")


def register(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help="expand a sweep file into runs and launch commands")
    parser.add_argument("sweep_file")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="tpu")
    parser.add_argument("--json", action="store_true", help="print the runs as JSON")
    parser.set_defaults(func=run)


def expand(sweep_file: str | Path, launcher: str = "tpu") -> list[dict]:
    from vist2_jax.config import load_config

    sweep_file = Path(sweep_file)
    try:
        spec = yaml.safe_load(sweep_file.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"sweep: cannot read {sweep_file}: {err}") from None
    recipes = sweep_file.parent
    runs = []
    for entry in spec.get("runs", []):
        for stage in spec.get("stages", []):
            recipe = recipes / f"{stage}.yaml"  # one file per stage; the size picks sizes/SIZE.yaml
            size = entry["size"]
            if launcher == "slurm" and (recipes / "sizes" / f"{size}-h100x8.yaml").exists():
                size = f"{size}-h100x8"  # the GPU node variant of the size
            args = [recipe.as_posix(), f"size={size}", *([f"root={spec['root']}"] if spec.get("root") else [])]
            config = load_config(recipe, args[1:])  # every expanded recipe must validate
            if launcher == "tpu":
                command = ["launch/tpu_pod.sh", "--tpu", entry["tpu"], "--zone", entry["zone"], "--", *args]
            elif launcher == "slurm":
                command = ["sbatch", f"--nodes={entry.get('nodes', 1)}", "launch/slurm.sbatch", *args]
            else:
                command = ["launch/gke.sh", "--name", f"{entry['tpu']}-{stage.replace('_', '-')}",
                           "--image", entry.get("image", "IMAGE"), "--accelerator", "tpu-v5p-slice",
                           "--topology", entry.get("topology", "TOPOLOGY"), "--workers",
                           str(entry.get("workers", 1)), "--", *args]
            runs.append({"size": entry["size"], "stage": stage, "recipe": args[0], "overrides": args[1:],
                         "accelerator": entry.get("accelerator", ""), "workdir": config.run.workdir,
                         "steps": config.train.steps, "global_batch_size": config.data.global_batch_size,
                         "command": shlex.join(command)})
    return runs


def run(args) -> int:
    runs = expand(args.sweep_file, args.launcher)
    if args.json:
        print(json.dumps(runs, indent=2))
        return 0
    for r in runs:
        print(f"# {r['size']} {r['stage']}: {r['steps']} steps x {r['global_batch_size']} rows -> {r['workdir']}")
        print(r["command"])
    return 0
