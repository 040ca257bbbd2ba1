"""``vist2 export RUN_DIR --out DIR``: a run's checkpoint as a Hugging Face model folder
(config.json with auto_map, safetensors, tokenizer, renderer + font, the runtime's code, a
model card), streamed tensor by tensor; prints a JSON summary with the process's peak RSS."""

from __future__ import annotations

import json
import re
import resource
import sys
import time

from vist2_jax.cli.errors import UsageError

_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20,
          "GIB": 2 ** 30}


def parse_size(text: str) -> int:
    """``5GB``, ``500MiB``, ``1000000`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise UsageError(f"--max-shard-size: {text!r} is not a size like 5GB, 500MiB or 1000000")
    return max(1, int(float(match.group(1)) * _UNITS[match.group(2).upper()]))


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a run's checkpoint as a Hugging Face model (trust_remote_code)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a vist2 train / demo run dir (or a demo dir: its last stage)")
    p.add_argument("--out", required=True, metavar="DIR", help="new (or empty) output folder")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest readable)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights dtype (default float32: lossless for fp32 master weights)")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors shard limit (default 5GB)")
    p.add_argument("--font", metavar="FILE", help="the run's font file when its recorded path is not on "
                   "this host (checked against the recorded sha256)")
    p.add_argument("--vision-format", default="auto", choices=("auto", "siglip", "siglip2"),
                   help="HF vision class to write (auto: the one the run was initialised from)")
    p.set_defaults(func=run)


def run(args) -> int:
    from vist2_jax.export.exporter import export_run

    started = time.time()
    result = export_run(args.run_dir, args.out, step=args.step, dtype=args.dtype,
                        max_shard_bytes=parse_size(args.max_shard_size), font=args.font,
                        vision=args.vision_format)
    print(json.dumps({
        "out": str(result.out), "run_dir": str(result.run_dir), "step": result.step,
        "checkpoint_bytes": result.checkpoint_bytes, "largest_tensor_bytes": result.largest_tensor_bytes,
        "written_bytes": result.written_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds": round(time.time() - started, 2)}, indent=2))
    sys.stdout.flush()
    return 0
