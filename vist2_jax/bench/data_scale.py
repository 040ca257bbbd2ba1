"""``vist2 bench data --scale-mb 200 2000``: the data pipeline at pretraining scale.

For each size: writes a synthetic corpus of that many megabytes of ``.jsonl`` documents
on disk (paragraphs of the embedded corpus drawn at random, no download), prepares it
(``vist2 data prepare`` with the tokenizer, so ids are stored), then measures for each
``--workers`` count, in a fresh process: pipeline start-up (``build_pipeline`` to the
first batch, after the imports), host RSS (the main process and its Grain workers) and
rows/s (median over ``--repeats`` windows of ``--batches`` batches). Corpora are removed
afterwards unless ``--keep`` (a kept, finished corpus is reused by the next run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

FILE_MB = 64


def add_arguments(parser) -> None:
    parser.add_argument("--scale-mb", type=float, nargs="*", default=[],
                        help="scale mode: synthetic corpora of these sizes (MB), prepared and read lazily")
    parser.add_argument("--scale-dir", default="/tmp/vist2_bench_scale", help="where the corpora go")
    parser.add_argument("--prepare-workers", type=int, default=2, help="processes of `data prepare`")
    parser.add_argument("--keep", action="store_true", help="keep the corpora")


def synthetic_corpus(out: Path, megabytes: float, seed: int = 0) -> int:
    """``megabytes`` of ``{"text": ...}`` lines in files of ``FILE_MB``; returns documents written.
    A finished corpus (marked ``COMPLETE``) is reused, so an interrupted bench resumes."""
    import numpy as np

    from data_pipelines.corpus import embedded_documents

    if (out / "COMPLETE").is_file():
        return int((out / "COMPLETE").read_text())
    shutil.rmtree(out, ignore_errors=True)

    paragraphs = [p for doc in embedded_documents() for p in doc.split("\n") if len(p) > 40]
    rng, target, written, docs, part = np.random.default_rng(seed), int(megabytes * 2**20), 0, 0, 0
    out.mkdir(parents=True, exist_ok=True)
    while written < target:
        with open(out / f"part-{part:05d}.jsonl", "w", encoding="utf-8") as f:
            size = 0
            while size < FILE_MB * 2**20 and written + size < target:
                picks = rng.integers(0, len(paragraphs), int(rng.integers(2, 40)))
                line = json.dumps({"text": "\n".join(paragraphs[i] for i in picks)}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
                docs += 1
        written += size
        part += 1
    (out / "COMPLETE").write_text(str(docs))
    return docs


MEASURE = """
import json, sys, time, statistics
import psutil
args = json.loads(sys.argv[1])
started = time.perf_counter()
from data_pipelines.pipeline import build_pipeline
from vist2_jax.config import load_config
start = time.perf_counter()  # start-up: after the imports, which do not depend on the data
config = load_config(args["recipe"], overrides=args["overrides"])
pipeline = build_pipeline(config, args["workdir"])
built = time.perf_counter()
iterator = iter(pipeline.train_dataset())
next(iterator)
first = time.perf_counter()
rates = []
for _ in range(args["repeats"]):
    t = time.perf_counter()
    for _ in range(args["batches"]):
        next(iterator)
    rates.append(args["batches"] * pipeline.local_batch_size / (time.perf_counter() - t))
me = psutil.Process()
children = me.children(recursive=True)
rss = me.memory_info().rss + sum(c.memory_info().rss for c in children)
print(json.dumps({"startup_s": first - start, "build_pipeline_s": built - start, "imports_s": start - started,
                  "rows_per_s": rates,
                  "rows_per_s_median": statistics.median(rates), "rss_main_mb": me.memory_info().rss / 2**20,
                  "rss_total_mb": rss / 2**20, "processes": 1 + len(children)}))
iterator.close()
"""


def _measure(prepared: Path, tokenizer: str, workers: int, args) -> dict:
    overrides = [f"data.source={prepared}", f"data.tokenizer={tokenizer}", f"data.num_workers={workers}",
                 "train.steps=1000000", "train.warmup_steps=0", *args.overrides]
    payload = json.dumps({"recipe": args.recipe, "overrides": overrides, "workdir": str(prepared.parent / "work"),
                          "batches": args.batches, "repeats": args.repeats})
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    done = subprocess.run([sys.executable, "-c", MEASURE, payload], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"measuring {prepared} with {workers} workers failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_scale(args) -> dict:
    """Generate, prepare and measure each ``--scale-mb`` size; prints one line per run."""
    from data_pipelines.pipeline import resolve_tokenizer
    from data_pipelines.prepare import prepare
    from vist2_jax.config import load_config

    root = Path(args.scale_dir)
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = args.tokenizer or str(resolve_tokenizer(load_config(args.recipe), root / "tokenizer").path)
    out = {"cpus": os.cpu_count(), "tokenizer": tokenizer, "by_size_mb": {}}
    workers = args.workers or [0]
    try:
        for megabytes in args.scale_mb:
            raw, prepared = root / f"raw_{megabytes:g}mb", root / f"prepared_{megabytes:g}mb"
            t = time.perf_counter()
            docs = synthetic_corpus(raw, megabytes)
            generated = time.perf_counter() - t
            manifest = prepare(str(raw), str(prepared), workers=args.prepare_workers, tokenizer=tokenizer,
                               progress=False)
            entry = {"documents": docs, "generate_s": generated, "prepare_s": manifest["seconds"],
                     "prepared_mb": sum(p.stat().st_size for p in prepared.rglob("*") if p.is_file()) / 2**20,
                     "by_workers": {}}
            print(f"{megabytes:g} MB: {docs} documents, generated in {generated:.0f} s, prepared in "
                  f"{manifest['seconds']:.0f} s with {args.prepare_workers} workers", flush=True)
            for w in workers:
                result = entry["by_workers"][str(w)] = _measure(prepared, tokenizer, w, args)
                print(f"  {w} workers: start-up {result['startup_s']:.2f} s (build_pipeline "
                      f"{result['build_pipeline_s']:.2f} s), RSS {result['rss_total_mb']:.0f} MB in "
                      f"{result['processes']} processes, {result['rows_per_s_median']:.1f} rows/s "
                      f"(median of {args.repeats})", flush=True)
            out["by_size_mb"][f"{megabytes:g}"] = entry
            if not args.keep:
                shutil.rmtree(raw, ignore_errors=True)
                shutil.rmtree(prepared, ignore_errors=True)
    finally:
        if not args.keep:
            for path in root.glob("raw_*"):
                shutil.rmtree(path, ignore_errors=True)
            for path in root.glob("prepared_*"):
                shutil.rmtree(path, ignore_errors=True)
    sizes = list(out["by_size_mb"])
    if len(sizes) >= 2:
        small, large = out["by_size_mb"][sizes[0]]["by_workers"], out["by_size_mb"][sizes[-1]]["by_workers"]
        out["ratio_large_to_small"] = {w: {key: large[w][key] / small[w][key]
                                           for key in ("startup_s", "rss_total_mb", "rows_per_s_median")}
                                       for w in small}
        for w, ratio in out["ratio_large_to_small"].items():
            print(f"{sizes[-1]} MB / {sizes[0]} MB, {w} workers: start-up x{ratio['startup_s']:.2f}, "
                  f"RSS x{ratio['rss_total_mb']:.2f}, rows/s x{ratio['rows_per_s_median']:.2f}")
    return out
