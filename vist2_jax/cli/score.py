"""``vist2 score``: per-token log-probabilities of a token-id sequence under plain causal
text attention, from a Hugging Face Qwen3 folder or a training run's checkpoint, as JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vist2_jax.cli.errors import UsageError


def register(subparsers) -> None:
    parser = subparsers.add_parser("score", help="per-token log-probs of token ids (JSON)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-decoder", metavar="DIR", help="HF Qwen3 folder: config.json + *.safetensors")
    source.add_argument("--checkpoint", metavar="DIR", help="a `vist2 train` / `vist2 demo` run directory")
    parser.add_argument("--token-ids-file", required=True, metavar="F",
                        help="token ids: a JSON list or whitespace/comma separated integers")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.set_defaults(func=run)


def read_token_ids(path: str | Path) -> list[int]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--token-ids-file: no such file {path}")
    text = path.read_text().strip()
    try:
        ids = json.loads(text) if text.startswith("[") else [int(t) for t in text.replace(",", " ").split()]
    except ValueError as err:
        raise UsageError(f"--token-ids-file: {path} does not hold integer token ids ({err})") from None
    if len(ids) < 2 or not all(isinstance(i, int) for i in ids):
        raise UsageError(f"--token-ids-file: {path} must hold at least two integer token ids")
    return ids


def run(args) -> int:
    from vist2_jax.convert.hf_weights import load_hf_decoder
    from vist2_jax.inference.scoring import score_tokens

    ids = read_token_ids(args.token_ids_file)
    if args.checkpoint:
        import dataclasses

        from vist2_jax.checkpointing.runs import load_run

        run = load_run(args.checkpoint)
        model_config = dataclasses.replace(run.config.model, dtype=args.dtype)
        params = {"params": run.params["params"]["decoder"]}
    else:
        model_config, params = load_hf_decoder(args.hf_decoder, dtype=args.dtype)
    vocab = model_config.decoder.vocab_size
    if max(ids) >= vocab or min(ids) < 0:
        raise UsageError(f"--token-ids-file: ids must lie in [0, {vocab}); got {min(ids)}..{max(ids)}")
    logprobs = score_tokens(model_config, params, np.asarray(ids, np.int32))
    print(json.dumps({"token_ids": ids, "logprobs": [None] + [float(x) for x in logprobs],
                      "total_logprob": float(np.sum(logprobs)), "num_scored": len(logprobs)}))
    return 0
