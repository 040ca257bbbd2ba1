"""``vist2 generate --torch DIR``: stream a continuation with the PyTorch runtime, taking the
same options as the JAX path (mode, max new tokens, sampling, seed); stop tokens are the
tokenizer's ``eos`` and ``end``. No JAX import."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from vist2_jax.cli.errors import UsageError
from vist2_jax.cli.generation_io import sampling_from_args, streaming_printer


def run_torch(args) -> int:
    from vist2_jax.export.torch_vist2 import TorchVist2

    prompt_path, folder = Path(args.prompt_file), Path(args.torch)
    if not prompt_path.is_file():
        raise UsageError(f"--prompt-file: no such file {prompt_path}")
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    if not (folder / "vist2_config.json").is_file():
        raise UsageError(f"--torch: {folder} is not a `vist2 export` folder (no vist2_config.json)")
    if args.tokenizer:
        raise UsageError("--tokenizer does not apply to --torch (the export carries its tokenizer)")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr to the one summary line
    model = TorchVist2.load(folder)
    ids = model.tokenizer.encode(prompt_path.read_text())
    if not ids:
        raise UsageError(f"--prompt-file: {prompt_path} encodes to no tokens")
    stop = tuple(i for name, i in model.tokenizer.special_ids.items() if name in ("eos", "end"))
    sampling = sampling_from_args(args, stop)
    on_token = streaming_printer(model.detokenize)

    start = time.perf_counter()
    model.generate([ids], args.mode, args.max_new_tokens, sampling=sampling, seed=args.seed, on_token=on_token)
    sys.stdout.write("\n")
    elapsed = time.perf_counter() - start
    print(f"[{args.mode}, torch] {len(ids)} prompt tokens, {len(on_token.generated)} generated in {elapsed:.2f} s",
          file=sys.stderr)
    return 0
