"""``vist2 train RECIPE [key=value ...]``: one training stage from a recipe."""

from __future__ import annotations

import logging
import sys

from vist2_jax.cli.errors import UsageError


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train one stage from a recipe YAML")
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--restart", action="store_true",
                        help="when no checkpoint of the workdir can be read, move them aside "
                             "(workdir/previous-<time>/) and start from step 0 instead of refusing")
    parser.set_defaults(func=run)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(args) -> int:
    from data_pipelines.records import BadInput
    from vist2_jax.config import load_config
    from vist2_jax.training.distributed import initialize_from_env
    from vist2_jax.training.trainer import TrainingDiverged, train

    setup_logging()
    config = load_config(args.recipe, args.overrides)
    initialize_from_env()
    try:
        result = train(config, restart=args.restart)
    except (BadInput, TrainingDiverged, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    state = f"preempted by {result.summary['stopped_by']}, checkpoint saved" if result.preempted else "done"
    print(f"{state}: {result.steps_done} steps in {result.workdir}", file=sys.stderr)
    return 0
