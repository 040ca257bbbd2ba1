"""``vist2 params --preset NAME``: parameter counts per component, as JSON."""

from __future__ import annotations

import json

from vist2_jax.config import load_config


def register(subparsers) -> None:
    parser = subparsers.add_parser("params", help="print parameter counts per component (JSON)")
    parser.add_argument("--preset", default="tiny", help="model preset (tiny, 0.6b, 1.7b, 4b, 8b)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.set_defaults(func=run)


def run(args) -> int:
    from vist2_jax.model.vist2 import param_counts

    config = load_config(overrides=args.overrides, preset=args.preset)
    counts = param_counts(config.model)
    print(json.dumps({"preset": config.preset, **counts}, indent=2))
    return 0
