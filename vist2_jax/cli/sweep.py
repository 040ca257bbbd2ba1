"""``vist2 sweep [run|status|report] FILE``: a sweep file's variants and stages
(``vist2_jax/sweeps``).

- ``vist2 sweep FILE [--launcher L] [--json]``: every stage of every variant with its launch
  command, each recipe validated (nothing runs).
- ``vist2 sweep run FILE [--launcher local|tpu|slurm|gke] [--only KEY=VALUE ...] [--dry-run]``:
  train the stages in order, skipping finished ones, retrying failed ones.
- ``vist2 sweep status FILE``: one line per variant and stage, from the run folders.
- ``vist2 sweep report FILE --out DIR [--eval ocr,memory]``: report.md and plots."""

from __future__ import annotations

import json

from vist2_jax.cli.errors import UsageError
from vist2_jax.sweeps.spec import LAUNCHERS

ACTIONS = ("run", "status", "report")
EVAL_TASKS = ("ocr", "memory")


def register(subparsers) -> None:
    parser = subparsers.add_parser("sweep", help="a sweep's runs: launch commands, run, status, report")
    parser.add_argument("words", nargs="+", metavar="[run|status|report] FILE")
    parser.add_argument("--launcher", choices=LAUNCHERS, default=None,
                        help="run: local (default) | tpu | slurm | gke; FILE alone: tpu (default)")
    parser.add_argument("--only", nargs="+", default=[], metavar="KEY=VALUE",
                        help="only the variants with these settings (name, size or a grid key)")
    parser.add_argument("--dry-run", action="store_true", help="run: print what would be launched")
    parser.add_argument("--poll-s", type=float, default=2.0, help="run: seconds between looks at a running stage")
    parser.add_argument("--out", help="report: output folder (local or gs://)")
    parser.add_argument("--eval", default="", help="report: tasks to run on finished stages lacking them (ocr,memory)")
    parser.add_argument("--eval-limit", type=int, default=0, help="report --eval: chunks / rows (0: the task default)")
    parser.add_argument("--json", action="store_true", help="FILE alone: print the runs as JSON")
    parser.set_defaults(func=run)


def run(args) -> int:
    from vist2_jax.sweeps import spec

    action, rest = (args.words[0], args.words[1:]) if args.words[0] in ACTIONS else ("print", args.words)
    if len(rest) != 1:
        raise UsageError("usage: vist2 sweep [run|status|report] FILE [options]")
    if action == "print":
        runs = spec.expand(rest[0], args.launcher or "tpu")
        if args.json:
            print(json.dumps(runs, indent=2))
            return 0
        for r in runs:
            print(f"# {r['variant']} {r['stage']}: {r['steps']} steps x {r['global_batch_size']} rows -> {r['workdir']}")
            print(r["command"])
        return 0
    launcher = args.launcher or "local"
    sweep = spec.load_sweep(rest[0], launcher)
    if args.only:
        sweep = sweep.select(args.only)
    if action == "run":
        from vist2_jax.sweeps.runner import Runner, dry_run

        if args.dry_run:
            print("\n".join(dry_run(sweep, launcher)))
            return 0
        return Runner(sweep, launcher, args.poll_s).run()
    if action == "status":
        from vist2_jax.sweeps.state import status_lines

        print("\n".join(status_lines(sweep)))
        return 0
    from vist2_jax.sweeps.report import write_report

    if not args.out:
        raise UsageError("sweep report needs --out DIR")
    tasks = [t.strip() for t in args.eval.split(",") if t.strip()]
    for task in tasks:
        if task not in EVAL_TASKS:
            raise UsageError(f"--eval {task}: choose from {', '.join(EVAL_TASKS)}")
    print(write_report(sweep, args.out, tasks, args.eval_limit))
    return 0
