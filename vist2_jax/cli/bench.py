"""``vist2 bench WHAT``: measurements that go into closing notes and READMEs.

``mask``: block sparsity of the vision-as-memory mask; ``data``: sketch renderer throughput;
``efficiency``: KV memory, FLOPs and speed of gcc vs pcc vs text generation;
``attention``: attention implementations timed beside causal attention
(:mod:`vist2_jax.bench.attention`).
"""

from __future__ import annotations


def register(subparsers) -> None:
    from vist2_jax.cli import render
    from vist2_jax.cli import bench_efficiency, bench_mask

    bench = subparsers.add_parser("bench", help="measure: mask block sparsity, renderer throughput, generation efficiency, attention speed")
    what = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    bench_mask.add_mask_parser(what)
    data = what.add_parser("data", help="renderer throughput: sketch images/s per core (JSON)")
    render.add_bench_data_arguments(data)
    data.set_defaults(func=render.bench_data)
    bench_efficiency.add_efficiency_parser(what)
    from vist2_jax.bench import attention as bench_attention
    bench_attention.add_parser(what)
