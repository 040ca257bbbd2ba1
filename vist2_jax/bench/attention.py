"""``vist2 bench attention``: the vision-as-memory attention implementations beside plain
causal attention (the text-only baseline), timed on the local accelerator.

A case is one synthetic OLM row per batch entry (:func:`vist2_jax.bench.mask.synthetic_meta`).
Timings are the median of ``repeats`` calls after a compiling warm-up, in ms: forward,
and forward+backward (the gradient of ``sum(out * cotangent)`` in q, k, v). The block
kernel (``pallas_gpu`` / ``pallas_tpu``) runs at every ``--block`` on the visual-first
row (the decoder's order; the permutation itself is not timed) and includes building its
block tables; ``xla_chunked`` and ``dense`` (where its S^2 logits fit) run too.

Ratios: ``over_causal`` is time / causal time; ``over_bound`` divides that by the density
bound, visited blocks / causal blocks at the block (the figures of ``bench mask``, which
are reported per block): 1.0 means time proportional to the visited blocks.
``xla_chunked`` and ``dense`` are held to the bound of the smallest block.

Baseline: cuDNN causal flash attention on GPU (``jax.nn.dot_product_attention(...,
is_causal=True, implementation="cudnn")``), XLA's on TPU and CPU. On CPU the Pallas
kernels only run in interpret mode and are not timed, nor is any case longer than
:data:`CPU_MAX_SEQ`; the block figures are always reported.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

KERNEL = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}
DEFAULT_BLOCKS = {"gpu": (64, 128), "tpu": (128, 256), "cpu": (64, 128)}
CPU_MAX_SEQ = 2048
CPU_MEMORY = 2 << 30      # bytes assumed free for dense on a host without memory stats
DENSE_FRACTION = 0.25     # dense runs if ~4 fp32 [B, H, S, S] arrays fit in this share


def add_parser(bench_subparsers):
    p = bench_subparsers.add_parser(
        "attention", help="time block-sparse / chunked / dense attention vs causal, JSON")
    p.add_argument("--seq-len", type=int, nargs="+", default=[8192])
    p.add_argument("--text-len", type=int, default=128, help="text tokens per chunk (L)")
    p.add_argument("--visual-len", type=int, default=32, help="visual tokens per image (m)")
    p.add_argument("--docs", type=int, default=1, help="documents packed into each row")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--block", type=int, nargs="+", help="kernel block sizes (default per platform)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--visual-attends-past-visual", action="store_true")
    p.add_argument("--json", metavar="FILE", help="also write the report here")
    p.set_defaults(func=run)
    return p


def _median_ms(fn, args, repeats):
    import jax

    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def time_attention(attend, args, repeats):
    """{fwd_ms, fwd_bwd_ms} of ``attend(q, k, v, meta)``; ``args`` is (q, k, v, meta, cot)."""
    import jax
    import jax.numpy as jnp

    def loss(q, k, v, meta, cot):
        return jnp.sum(attend(q, k, v, meta).astype(jnp.float32) * cot.astype(jnp.float32))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return {"fwd_ms": _median_ms(jax.jit(attend), args[:4], repeats),
            "fwd_bwd_ms": _median_ms(grad, args, repeats)}


def implementations(platform, blocks, flag, dense_fits):
    """[(name, block, attend, wants visual-first meta)] to time and [(name, block, reason)]
    not to."""
    import jax

    from vist2_jax.kernels.attention import attention, block_sparse_visual_first

    run, skip = [], []
    kernel = KERNEL.get(platform)
    for block in blocks:
        if kernel is None:
            skip.append(("pallas_tpu/pallas_gpu", block, f"Pallas kernels run only in interpret mode on {platform}"))
            continue
        run.append((kernel, block, lambda q, k, v, m, b=block: block_sparse_visual_first(
            q, k, v, m, impl=kernel, block=b, reorder=False, interpret=False,
            visual_attends_past_visual=flag), True))
    for name in ("xla_chunked", "dense"):
        if name == "dense" and not dense_fits:
            skip.append((name, None, "S^2 logits do not fit the device memory"))
            continue
        run.append((name, None, lambda q, k, v, m, n=name: attention(
            q, k, v, m, impl=n, visual_attends_past_visual=flag), False))
    causal = "cudnn" if platform == "gpu" else "xla"
    baseline = (f"causal {causal}", lambda q, k, v, m: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=causal))
    return run, skip, baseline


def _memory(device):
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("bytes_limit", CPU_MEMORY)


def bench_case(seq, args, platform, device):
    """One sequence length: block figures, timings and ratios."""
    import jax
    import jax.numpy as jnp

    from vist2_jax.bench.mask import order_stats, synthetic_meta
    from vist2_jax.kernels.mask import RowMeta
    from vist2_jax.kernels.reorder import permute_meta, visual_first_permutation

    flag = args.visual_attends_past_visual
    meta, _ = synthetic_meta(seq, args.text_len, args.visual_len, args.docs)
    first = permute_meta(meta, visual_first_permutation(meta)[0])
    blocks = args.block or DEFAULT_BLOCKS.get(platform, DEFAULT_BLOCKS["cpu"])
    figures = {str(b): order_stats(first, b, flag) for b in blocks}
    case = {"seq_len": seq, "text_len": args.text_len, "visual_len": args.visual_len,
            "docs": args.docs, "blocks": figures, "results": [], "not_timed": []}
    dense_bytes = 16 * args.batch * args.heads * seq * seq
    run, skip, (base_name, base_fn) = implementations(
        platform, blocks, flag, dense_bytes <= DENSE_FRACTION * _memory(device))
    if platform == "cpu" and seq > CPU_MAX_SEQ:
        skip += [(name, block, f"S > {CPU_MAX_SEQ} is not timed on CPU")
                 for name, block, *_ in run + [(base_name, None)]]
        run, base_fn = [], None
    case["not_timed"] = [{"impl": n, "block": b, "reason": r} for n, b, r in skip]
    if base_fn is None:
        return case

    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    q_shape = (args.batch, seq, args.heads, args.head_dim)
    kv_shape = (args.batch, seq, args.kv_heads, args.head_dim)
    q, k, v, cot = (jax.device_put(jnp.asarray(rng.normal(size=s), dtype), device)
                    for s in (q_shape, kv_shape, kv_shape, q_shape))
    rows = [RowMeta(*(jax.device_put(jnp.tile(a, (args.batch, 1)), device) for a in m))
            for m in (meta, first)]
    base = time_attention(base_fn, (q, k, v, rows[0], cot), args.repeats)
    case["baseline"] = {"impl": base_name, **base}
    smallest = str(min(blocks))
    for name, block, fn, visual_first in run:
        try:
            timed = time_attention(fn, (q, k, v, rows[visual_first], cot), args.repeats)
        except Exception as error:  # noqa: BLE001 - report the failure, time the rest
            case["not_timed"].append({"impl": name, "block": block,
                                      "reason": f"{type(error).__name__}: {str(error)[:300]}"})
            continue
        bound_block = str(block) if block else smallest
        bound = figures[bound_block]["visited_fraction_of_causal"]
        result = {"impl": name, "block": block, **timed, "bound_block": int(bound_block),
                  "density_bound": bound}
        for key in ("fwd", "fwd_bwd"):
            over = timed[f"{key}_ms"] / base[f"{key}_ms"]
            result[f"{key}_over_causal"] = over
            result[f"{key}_over_bound"] = over / bound
        case["results"].append(result)
    return case


def _print_case(case, out):
    print(f"\nS={case['seq_len']} L={case['text_len']} m={case['visual_len']} docs={case['docs']}",
          file=out)
    for block, f in case["blocks"].items():
        print(f"  block {block}: visits {f['visited_blocks']} of {f['causal_blocks']} causal blocks "
              f"(density bound {f['visited_fraction_of_causal']:.3f}), "
              f"{100 * f['partial_fraction_of_visited']:.0f}% partial", file=out)
    if "baseline" in case:
        b = case["baseline"]
        print(f"  {'impl':<14}{'block':>6}{'fwd ms':>9}{'f+b ms':>9}{'fwd/causal':>12}"
              f"{'f+b/causal':>12}{'fwd/bound':>11}{'f+b/bound':>11}", file=out)
        print(f"  {b['impl']:<14}{'-':>6}{b['fwd_ms']:>9.3f}{b['fwd_bwd_ms']:>9.3f}", file=out)
        for r in case["results"]:
            print(f"  {r['impl']:<14}{r['block'] or '-':>6}{r['fwd_ms']:>9.3f}{r['fwd_bwd_ms']:>9.3f}"
                  f"{r['fwd_over_causal']:>12.2f}{r['fwd_bwd_over_causal']:>12.2f}"
                  f"{r['fwd_over_bound']:>11.2f}{r['fwd_bwd_over_bound']:>11.2f}", file=out)
    for n in case["not_timed"]:
        print(f"  not timed: {n['impl']}{'' if n['block'] is None else ' block ' + str(n['block'])}: "
              f"{n['reason']}", file=out)


def run(args) -> int:
    import jax

    device = jax.devices()[0]
    platform = device.platform
    report = {"device": device.device_kind, "platform": platform, "dtype": args.dtype,
              "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
              "head_dim": args.head_dim, "repeats": args.repeats,
              "visual_attends_past_visual": args.visual_attends_past_visual,
              "cases": [bench_case(seq, args, platform, device) for seq in args.seq_len]}
    print(f"{report['device']} ({platform}), {args.dtype}, B={args.batch} "
          f"H={args.heads}/{args.kv_heads} D={args.head_dim}, median of {args.repeats}")
    for case in report["cases"]:
        _print_case(case, sys.stdout)
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
    return 0
