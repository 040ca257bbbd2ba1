"""``vist2 eval RUN_DIR --task NAME``: evaluate a training run's newest readable checkpoint
with its own config, tokenizer and renderer config (``vist2_jax/evaluation``).

Tasks: ``ocr`` (CER / exact match of greedy reconstruction from sketches), ``memory`` (loss
with true vs blank sketches vs raw text: the memory gain and the compression gap),
``longbench`` / ``loogle`` / ``gsm8k`` (local JSONL in the published layout via ``--data``,
generation in ``--mode``)."""

from __future__ import annotations

import argparse
import json
import sys

from vist2_jax import storage
from vist2_jax.cli.errors import UsageError

TASKS = ("ocr", "memory", "longbench", "loogle", "gsm8k")


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="evaluate a run: ocr | memory | longbench | loogle | gsm8k")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a `vist2 train` / `vist2 demo` stage directory")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", metavar="PATH", help="benchmark JSONL file or folder; for ocr/memory a "
                   "folder of held-out .txt/.jsonl documents (default: the run's source, evaluation seed)")
    p.add_argument("--limit", type=int, default=0, help="chunks (ocr), rows (memory) or examples; 0: "
                   "32 chunks, 24 rows, every example")
    p.add_argument("--text-len", type=int, default=0, metavar="L", help="ocr/memory: chunks of L tokens "
                   "(the ratio L/m; memory: in the window the run's curriculum trains L in); 0: the run's own")
    p.add_argument("--mode", default="gcc", choices=("gcc", "pcc", "text"), help="generation mode")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-prompt-tokens", type=int, default=8192, help="middle truncation, as LongBench")
    p.add_argument("--max-new-tokens", type=int, default=0, help="cap on each task's answer length")
    p.add_argument("--json", metavar="F", help="write the full result (with predictions) here")
    p.set_defaults(func=run)


def default_args(run_dir, task: str, **values) -> argparse.Namespace:
    """The arguments of ``vist2 eval RUN_DIR --task TASK`` with its defaults, ``values`` set:
    for callers that evaluate in-process (the sweep report), so a new option needs no edit there."""
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return argparse.Namespace(**{**vars(parser.parse_args(["eval", str(run_dir), "--task", task])), **values})


def evaluate(args) -> dict:
    from vist2_jax.checkpointing.runs import resolve_run_dir
    from vist2_jax.evaluation.context import load_context

    if args.limit < 0 or args.batch_size < 1:
        raise UsageError("--limit must be >= 0 and --batch-size >= 1")
    resolve_run_dir(args.run_dir, "RUN_DIR")  # a run, a step folder or a demo dir; else one line
    if args.task in ("longbench", "loogle", "gsm8k") and not args.data:
        raise UsageError(f"--task {args.task} needs --data (a local JSONL file or folder)")
    ctx = load_context(args.run_dir)
    m = ctx.config.model.layout.visual_len
    if args.text_len < 0 or args.text_len % m:
        raise UsageError(f"--text-len {args.text_len}: must be a whole multiple of the run's m={m} (0: the run's own)")
    if args.task == "ocr":
        from vist2_jax.evaluation.ocr import evaluate_ocr
        result = evaluate_ocr(ctx, args.limit or 32, data=args.data, text_lens=[args.text_len] if args.text_len else None)
    elif args.task == "memory":
        from vist2_jax.evaluation.memory import evaluate_memory
        result = evaluate_memory(ctx, args.limit or 24, data=args.data, text_len=args.text_len)
    else:
        from vist2_jax.evaluation.benchmarks import LOADERS
        from vist2_jax.evaluation.generation import evaluate_generation
        examples = LOADERS[args.task](args.data)
        examples = examples[:args.limit] if args.limit else examples
        if not examples:
            raise UsageError(f"--data: {args.data} holds no examples")
        result = evaluate_generation(ctx, examples, args.mode, args.batch_size, args.max_prompt_tokens,
                                     args.max_new_tokens)
    return {"task": args.task, "run": str(args.run_dir), "step": ctx.step, **result}


def run(args) -> int:
    result = evaluate(args)
    for key, value in result.items():
        if isinstance(value, (int, float, str)):
            print(f"{key:<28}{value:.4f}" if isinstance(value, float) else f"{key:<28}{value}")
    for sample in result.get("samples", []) + result.get("predictions", [])[:3]:
        print(json.dumps(sample, ensure_ascii=False)[:300], file=sys.stderr)
    if args.json:
        storage.write_atomic(args.json, json.dumps(result, indent=2, ensure_ascii=False))
    return 0
