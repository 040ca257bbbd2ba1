"""``vist2`` entry point. Each command module exposes ``register(subparsers)``, which adds
its parser and sets ``func`` (``args -> exit code``). Config mistakes end in one line
on stderr and exit code 2, never a traceback from deep inside Flax.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vist2_jax.cli.errors import user_errors

# Command modules, in the order ``vist2 --help`` lists them.
COMMAND_MODULES = (
    "vist2_jax.cli.params",
    "vist2_jax.cli.score",
    "vist2_jax.cli.check",
    "vist2_jax.cli.render",
    "vist2_jax.cli.data_preview",
    "vist2_jax.cli.bench",
    "vist2_jax.cli.train",
    "vist2_jax.cli.demo",
    "vist2_jax.cli.sweep",
    "vist2_jax.cli.aot",
    "vist2_jax.cli.generate",
    "vist2_jax.cli.export",
    "vist2_jax.cli.eval",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vist2", description="VIST2-JAX: vision-text compressed LMs.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except user_errors() as err:
        print(f"vist2 {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
