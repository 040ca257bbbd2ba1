"""``vist2 data prepare SOURCE --out DIR [--workers N]``: raw files -> a prepared source.

Reads ``.txt`` / ``.jsonl`` / ``.jsonl.gz`` / parquet files below SOURCE (or a caption
folder, or a manual-dir layout of the TFDS builders) and writes the random-access folder
that ``data.source=DIR`` reads lazily (``data_pipelines/prepare.py``). Shows a progress
bar, prints the good / bad counts, logs bad records with file:line (all of them land in
``DIR/bad_records.jsonl``) and resumes when run again after an interruption.
"""

from __future__ import annotations

import argparse
import json


def add_parser(what) -> None:
    from data_pipelines.readers import LAYOUTS

    p = what.add_parser("prepare", help="raw text / jsonl / parquet / corpus layouts -> a prepared, "
                                        "lazily read source (resumable)")
    p.add_argument("source", help="a file or folder of raw records")
    p.add_argument("--out", required=True, help="the prepared folder (local or gs://)")
    p.add_argument("--workers", type=int, default=1, help="processes preparing shards in parallel")
    p.add_argument("--layout", default="text", choices=("text", "captions", *LAYOUTS),
                   help="text: .txt/.jsonl/.jsonl.gz/.parquet files; captions: an image folder with "
                        "captions; others: the TFDS builders' manual-dir layouts")
    p.add_argument("--max-chars", type=int, default=100_000,
                   help="store longer documents as consecutive pieces of at most this many characters")
    p.add_argument("--shard-mb", type=float, default=64, help="input megabytes per shard (unit of resume)")
    p.add_argument("--tokenizer", default="",
                   help="also store token ids of this tokenizer (runs with the same file read them "
                        "instead of tokenizing on read)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from data_pipelines.prepare import prepare
    from data_pipelines.records import BadInput
    from vist2_jax.cli.errors import UsageError

    if args.workers < 1 or args.shard_mb <= 0:
        raise UsageError("--workers must be >= 1 and --shard-mb positive")
    try:
        result = prepare(args.source, args.out, workers=args.workers, layout=args.layout,
                         max_chars=args.max_chars, shard_mb=args.shard_mb, tokenizer=args.tokenizer,
                         progress=not args.no_progress)
    except BadInput as err:
        raise UsageError(str(err)) from None
    counts = result["counts"]
    print(f"prepared {args.out}: {counts['good']} good records ({counts['stored']} stored), "
          f"{counts['bad']} bad of {counts['read']} read; {counts['doc']} documents, {counts['chat']} chats, "
          f"{counts['caption']} captions; {result['shards']} shards, {result['units_resumed']} already done; "
          f"{result['seconds']:.1f} s")
    if counts["bad"]:
        print(f"bad records by kind: {json.dumps(counts['bad_kinds'])}; each with its file:line in "
              f"{args.out}/bad_records.jsonl")
    return 0
