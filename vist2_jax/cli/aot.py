"""``vist2 aot RECIPE --topology SLICE [key=value ...] [--json FILE]``: compile the recipe's
real train step for a TPU slice from this host (libtpu, no TPU needed) and print per-chip
memory, FLOPs and the compiler's estimates; exit 1 naming the largest buffers when it
does not fit. ``vist2 aot --sweep recipes/sweep.yaml``: every run of a sweep, riskiest
first (stage 3, largest size), results saved after each compile, README table rewritten.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vist2_jax import storage
from vist2_jax.cli.errors import UsageError

STAGE_RISK = ("stage3_olm", "stage4_sft", "stage2_ocr", "stage1_caption")


def register(subparsers) -> None:
    parser = subparsers.add_parser("aot", help="compile a recipe's train step for a TPU slice, "
                                               "report memory and estimated MFU")
    parser.add_argument("recipe", nargs="?", help="recipe YAML")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--topology", help="slice name: v5p-8 ... v5p-256, v5e-256, v6e-256")
    parser.add_argument("--json", metavar="FILE", help="write the report(s) as JSON")
    parser.add_argument("--sweep", metavar="FILE", help="compile every run of a sweep file")
    parser.add_argument("--readme", metavar="FILE", default="README.md",
                        help="with --sweep: the file whose recipe table is rewritten")
    parser.add_argument("--resume", action="store_true",
                        help="with --sweep --json: keep runs already in FILE, compile the rest")
    parser.add_argument("--table-only", action="store_true",
                        help="with --sweep --json: rewrite the table from FILE, compile nothing")
    parser.set_defaults(func=run)


def _compile(recipe: str, overrides: list[str], topology: str):
    from vist2_jax.aot.compile import compile_train_step
    from vist2_jax.aot.topology import get_slice
    from vist2_jax.config import load_config

    config = load_config(recipe, overrides)
    label = " ".join([recipe, *overrides])
    return config, compile_train_step(config, get_slice(topology), label)


def run(args) -> int:
    if args.sweep:
        return run_sweep(args)
    if not args.recipe or not args.topology:
        raise UsageError("give RECIPE and --topology SLICE (or --sweep FILE)")
    from vist2_jax.aot.report import describe

    config, report = _compile(args.recipe, args.overrides, args.topology)
    print(describe(report, config))
    if args.json:
        storage.write_atomic(args.json, json.dumps(report.as_dict(), indent=2))
    return 0 if report.fits else 1


def run_sweep(args) -> int:
    from vist2_jax.aot.report import table, update_readme
    from vist2_jax.sweeps.spec import expand

    runs = expand(args.sweep)
    order = sorted(runs, key=lambda r: (STAGE_RISK.index(r["stage"]) if r["stage"] in STAGE_RISK
                                        else len(STAGE_RISK), -float(r["size"].rstrip("b"))))
    out = Path(args.json) if args.json else None
    done = {}
    if (args.resume or args.table_only) and out and out.exists():
        done = {(r["size"], r["stage"]): r for r in json.loads(out.read_text())}
    for r in order:
        if (r["size"], r["stage"]) in done or args.table_only:
            continue
        if not r["accelerator"]:
            raise UsageError(f"{args.sweep}: run {r['size']} has no accelerator (a slice name)")
        print(f"compiling {r['size']} {r['stage']} for {r['accelerator']} ...", file=sys.stderr, flush=True)
        _, report = _compile(r["recipe"], r["overrides"], r["accelerator"])
        done[r["size"], r["stage"]] = {"size": r["size"], "stage": r["stage"], **report.as_dict()}
        if out:
            out.write_text(json.dumps(list(done.values()), indent=2))
    rows = [done.get((r["size"], r["stage"]), {"size": r["size"], "stage": r["stage"], "slice":
                                               r["accelerator"], "skipped": "not run"}) for r in runs]
    text = table(rows)
    print(text)
    if args.readme:
        update_readme(Path(args.readme), text)
    return 0 if all(row.get("fits") for row in rows) else 1
