"""``vist2 bench WHAT``: measurements that go into closing notes and READMEs. The
measuring code lives in the bench room (``vist2_jax/bench/``); each module there adds its
own sub-command.

``mask``: block sparsity of the vision-as-memory mask; ``data``: sketch renderer and
pipeline throughput (``--scale-mb``: start-up, RSS and rows/s on synthetic corpora of given
sizes); ``efficiency``: KV memory, FLOPs and speed of gcc vs pcc vs text; ``attention``:
attention implementations timed beside causal attention.
"""

from __future__ import annotations

BENCH_MODULES = ("vist2_jax.bench.mask", "vist2_jax.bench.data", "vist2_jax.bench.efficiency_cli",
                 "vist2_jax.bench.attention")


def register(subparsers) -> None:
    import importlib

    bench = subparsers.add_parser("bench", help="measure: mask block sparsity, data throughput, generation efficiency, attention speed")
    what = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    for name in BENCH_MODULES:
        importlib.import_module(name).add_parser(what)
