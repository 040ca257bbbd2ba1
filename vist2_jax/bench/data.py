"""``vist2 bench data``: sketch renderer throughput (images/s per core, glyph atlas vs Pillow)
and, with ``--workers``, rows/s of the whole Grain pipeline per worker count."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from data_pipelines.render import RenderConfig, RenderRejected, SketchRenderer
from vist2_jax import storage
from vist2_jax.cli.errors import UsageError


def add_parser(bench_subparsers) -> None:
    from vist2_jax.bench import data_scale

    parser = bench_subparsers.add_parser("data", help="renderer throughput: sketch images/s per core; "
                                                      "--scale-mb: the pipeline on large synthetic corpora (JSON)")
    add_bench_data_arguments(parser)
    data_scale.add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The renderer bench, or with ``--scale-mb`` the pipeline at scale."""
    if not args.scale_mb:
        return bench_data(args)
    from vist2_jax.bench.data_scale import bench_scale

    if any(mb <= 0 for mb in args.scale_mb) or any(w < 0 for w in args.workers) or args.batches <= 0:
        raise UsageError("--scale-mb must be positive, --workers >= 0, --batches positive")
    result = bench_scale(args)
    if args.json:
        storage.write_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def add_bench_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--text-len", type=int, default=256, help="L: tokens per chunk")
    parser.add_argument("--chars-per-token", type=float, default=4.0,
                        help="without --tokenizer, a chunk is L * this many corpus characters")
    parser.add_argument("--tokenizer", default=None,
                        help="a .model or tokenizer.json: chunk real token ids and detokenize")
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="*", default=[],
                        help="also time the full pipeline (rows/s) with each of these data.num_workers")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per pipeline repeat")
    parser.add_argument("--recipe", default=None, help="pipeline recipe (default: the tiny preset)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                        help="pipeline config override (repeatable)")


def bench_chunks(text_len: int, count: int, chars_per_token: float = 4.0,
                 tokenizer_path: str | None = None) -> list[str]:
    """Consecutive chunks of the embedded corpus, as the pipeline would cut them."""
    from data_pipelines.corpus import embedded_documents

    docs = embedded_documents()
    chunks: list[str] = []
    if tokenizer_path:
        from data_pipelines.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_path)
        for doc in docs:
            ids = tok.encode(doc)
            chunks += [tok.decode(ids[i:i + text_len]) for i in range(0, len(ids), text_len)]
            if len(chunks) >= count:
                break
    else:
        text, n = "\n".join(docs), max(1, round(text_len * chars_per_token))
        chunks = [text[i:i + n] for i in range(0, min(len(text), n * count), n)]
    if len(chunks) < count:
        raise UsageError(f"the embedded corpus gives only {len(chunks)} chunks; use --chunks <= that")
    return chunks[:count]


def bench_data(args: argparse.Namespace) -> int:
    if args.chunks <= 0 or args.repeats <= 0:
        raise UsageError("--chunks and --repeats must be positive")
    chunks = bench_chunks(args.text_len, args.chunks, args.chars_per_token, args.tokenizer)
    result = {"image_size": args.image_size, "text_len": args.text_len, "chunks": len(chunks),
              "repeats": args.repeats, "mean_chars_per_chunk": sum(map(len, chunks)) / len(chunks),
              "chunk_source": (f"tokenizer {args.tokenizer}" if args.tokenizer else
                               f"{args.chars_per_token} chars/token of embedded corpus"),
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "python": sys.version.split()[0]},
              "note": "one process, one thread: images/s per core; rejected chunks count as work"}
    for method in ("atlas", "pillow"):
        renderer = SketchRenderer(RenderConfig(image_size=args.image_size))
        for chunk in chunks:  # warm-up: builds the atlases, fills the counters once
            try:
                renderer.render(chunk, method=method)
            except RenderRejected:
                pass
        fit = dict(renderer.counters, by_font_px=dict(renderer.by_size))
        rates = []
        for _ in range(args.repeats):
            start, done = time.perf_counter(), 0
            for chunk in chunks:
                try:
                    renderer.render(chunk, method=method)
                    done += 1
                except RenderRejected:
                    pass
            rates.append(done / (time.perf_counter() - start))
        result[method] = {"images_per_s_median": statistics.median(rates), "images_per_s": rates,
                          "fit": fit}
        result["renderer_config"] = renderer.renderer_config()
        print(f"{method:>6}: {statistics.median(rates):8.1f} images/s/core (median of {args.repeats}; "
              f"{fit['rendered']} rendered, {fit['rejected']} rejected, by font px {fit['by_font_px']})")
    result["speedup"] = result["atlas"]["images_per_s_median"] / result["pillow"]["images_per_s_median"]
    print(f"atlas/pillow speedup {result['speedup']:.1f}x at {args.image_size}x{args.image_size}, "
          f"L={args.text_len}, {result['mean_chars_per_chunk']:.0f} chars/chunk ({result['chunk_source']})")
    if args.workers:
        result["pipeline"] = bench_pipeline(args)
    if args.json:
        storage.write_atomic(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def bench_pipeline(args: argparse.Namespace) -> dict:
    """Rows/s of the full pipeline (sample -> render -> pack -> batch) per worker count:
    after one warm-up batch (worker start, renderer build), ``--batches`` batches timed,
    median over ``--repeats`` fresh iterators."""
    import tempfile

    from data_pipelines.pipeline import build_pipeline
    from vist2_jax.config import load_config

    if any(w < 0 for w in args.workers) or args.batches <= 0:
        raise UsageError("--workers must be >= 0 and --batches positive")
    base = [*(["data.tokenizer=" + args.tokenizer] if args.tokenizer else []), *args.overrides]
    out = {"batches": args.batches, "repeats": args.repeats, "by_workers": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for workers in args.workers:
            steps = 1_000_000  # never the end of the data: read-ahead cannot pre-fill the timed span
            config = load_config(args.recipe, overrides=[*base, f"data.num_workers={workers}",
                                                         f"train.steps={steps}", "train.warmup_steps=0"])
            pipeline = build_pipeline(config, workdir)
            dataset, rates = pipeline.train_dataset(), []
            for _ in range(args.repeats):
                iterator = iter(dataset)
                next(iterator)
                start = time.perf_counter()
                for _ in range(args.batches):
                    next(iterator)
                rates.append(args.batches * pipeline.local_batch_size / (time.perf_counter() - start))
                iterator.close()
            out["by_workers"][str(workers)] = {"rows_per_s_median": statistics.median(rates), "rows_per_s": rates}
            print(f"pipeline, {workers} workers: {statistics.median(rates):8.1f} rows/s (median of "
                  f"{args.repeats}; {args.batches} batches of {pipeline.local_batch_size} rows, "
                  f"seq_len {config.data.seq_len}, stage {config.data.stage})")
    out["config"] = {"recipe": args.recipe, "overrides": base, "cpus": os.cpu_count()}
    return out
