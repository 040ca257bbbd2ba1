"""``vist2 bench WHAT``: measurements that go into closing notes and READMEs.

``mask``: block sparsity of the vision-as-memory mask; ``data``: sketch renderer throughput
(``--scale-mb``: start-up, RSS and rows/s on synthetic corpora of given sizes);
``efficiency``: KV memory, FLOPs and speed of gcc vs pcc vs text generation.
"""

from __future__ import annotations


def register(subparsers) -> None:
    from vist2_jax.cli import render
    from vist2_jax.cli import bench_data_scale, bench_efficiency, bench_mask

    bench = subparsers.add_parser("bench", help="measure: mask block sparsity, renderer throughput, generation efficiency")
    what = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    bench_mask.add_mask_parser(what)
    data = what.add_parser("data", help="renderer throughput: sketch images/s per core; --scale-mb: the "
                                        "pipeline on large synthetic corpora (JSON)")
    render.add_bench_data_arguments(data)
    bench_data_scale.add_arguments(data)
    data.set_defaults(func=_bench_data)
    bench_efficiency.add_efficiency_parser(what)


def _bench_data(args) -> int:
    """``bench data``: the renderer bench, or with ``--scale-mb`` the pipeline at scale."""
    from vist2_jax.cli import render

    if not args.scale_mb:
        return render.bench_data(args)
    import json
    from pathlib import Path

    from vist2_jax.cli.bench_data_scale import bench_scale
    from vist2_jax.cli.errors import UsageError

    if any(mb <= 0 for mb in args.scale_mb) or any(w < 0 for w in args.workers) or args.batches <= 0:
        raise UsageError("--scale-mb must be positive, --workers >= 0, --batches positive")
    result = bench_scale(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
