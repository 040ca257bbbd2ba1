"""``vist2 bench efficiency``: KV memory, FLOPs (compiled and analytic) and measured speed
of gcc vs pcc vs text generation on the same weights; JSON report and a PNG plot."""

from __future__ import annotations

import json
import sys

from vist2_jax import storage
from vist2_jax.cli.errors import UsageError


def add_parser(bench_subparsers) -> None:
    p = bench_subparsers.add_parser("efficiency", help="memory / FLOPs / speed of gcc vs pcc vs text")
    p.add_argument("--preset", default="0.6b", help="preset name, or several comma-separated")
    p.add_argument("--prompt-tokens", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=8192)
    p.add_argument("--grid", action="store_true",
                   help="also report the standard grid (8k,512), (8k,8k), (32k,8k)")
    p.add_argument("--no-compile", action="store_true", help="analytic FLOPs only")
    p.add_argument("--time", action="store_true", help="measure TTFT and decode tokens/s")
    p.add_argument("--depth-factor", type=int, default=14,
                   help="timed shape: decoder and ViT depth divided by this factor")
    p.add_argument("--timed-new-tokens", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="PNG")
    p.set_defaults(func=run)


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(args) -> int:
    from vist2_jax.config.presets import preset_model
    from vist2_jax.bench.efficiency import GRID, grid_point, time_modes, timed_config

    presets = [p.strip() for p in args.preset.split(",") if p.strip()]
    if args.prompt_tokens < 1 or args.new_tokens < 1:
        raise UsageError("--prompt-tokens and --new-tokens must be >= 1")
    points = [(args.prompt_tokens, args.new_tokens)]
    if args.grid:
        points += [p for p in GRID if p not in points]
    report = {"flop_method": "compiled: jit(...).lower(abstract shapes).compile().cost_analysis(), "
                             "unrolled fp32 programs at depths 1 and 2, extrapolated linearly in depth; "
                             "executed = dense attention over the static cache; attended = mask's "
                             "allowed pairs only (ideal kernel)", "presets": {}}
    for name in presets:
        cfg = preset_model(name)
        rows = []
        for n, m in points:
            _log(f"{name}: N={n} M={m}")
            row = grid_point(cfg, n, m, compiled=not args.no_compile)
            rows.append(row)
            _print_point(name, row)
        report["presets"][name] = {"layout": {"L": cfg.layout.text_len, "m": cfg.layout.visual_len},
                                   "kv_dtype": cfg.dtype, "grid": rows}
    if args.time:
        cfg = timed_config(presets[0], args.depth_factor)
        _log(f"timing {presets[0]} at decoder {cfg.decoder.num_layers} / ViT {cfg.vision.num_layers} "
             f"layers, N={args.prompt_tokens}, {args.timed_new_tokens} new tokens")
        timed = time_modes(cfg, args.prompt_tokens, args.timed_new_tokens, args.repeats, log=_log)
        flops = grid_point(cfg, args.prompt_tokens, args.timed_new_tokens, compiled=not args.no_compile)
        timed["shape"] = {"preset": presets[0], "depth_factor": args.depth_factor,
                          "decoder_layers": cfg.decoder.num_layers, "vit_layers": cfg.vision.num_layers,
                          "dtype": cfg.dtype, "prompt_tokens": args.prompt_tokens,
                          "new_tokens": args.timed_new_tokens, "batch": 1}
        timed["flops"] = {mode: {k: v for k, v in d.items() if k.startswith("flops_")}
                          for mode, d in flops["modes"].items()}
        report["timed"] = timed
        print(f"timed shape {timed['shape']}")
        for mode in ("text", "pcc", "gcc"):
            t = timed[mode]
            print(f"  {mode:4s} TTFT {t['ttft_s_median']:.3f} s  decode {t['decode_tokens_per_s_median']:.1f} tok/s")
        print(f"  TTFT text/gcc = {timed['ttft_speedup_text_over_gcc']:.2f}x, "
              f"pcc/gcc = {timed['ttft_speedup_pcc_over_gcc']:.2f}x")
    if args.json:
        storage.write_atomic(args.json, json.dumps(report, indent=1))
    if args.plot:
        from vist2_jax.bench.efficiency import plot_scaling
        plot_scaling(preset_model(presets[-1]), presets[-1], args.new_tokens, args.plot)
    return 0


def _print_point(name, row):
    print(f"[{name}] prompt {row['prompt_tokens']} + new {row['new_tokens']}")
    for mode, d in row["modes"].items():
        line = (f"  {mode:4s} peak KV {d['peak_kv_entries']:>7d} entries {d['peak_kv_bytes'] / 2**20:9.1f} MiB"
                f" | prefill {d['flops_prefill_attended_analytic']:.3e} total {d['flops_total_attended_analytic']:.3e}"
                " attended FLOPs")
        if "flops_total_compiled" in d:
            line += (f" | compiled prefill {d['flops_prefill_compiled']:.3e} total {d['flops_total_compiled']:.3e}"
                     f" (vs analytic {100 * d['compiled_vs_analytic_rel_err']:.2f}%)")
        print(line)
    for pair, r in row["ratios"].items():
        print(f"  {pair}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
    print(f"  gcc KV cut vs text: {100 * row['gcc_kv_cut_vs_text']:.1f}%")
