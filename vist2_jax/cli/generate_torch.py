"""``vist2 generate --torch DIR``: stream a continuation from a ``vist2 export`` folder with
transformers' ``generate`` on the exported model (the folder's own runtime), taking the same
options as the JAX path (mode, max new tokens, sampling, seed); stop tokens are the
tokenizer's ``eos`` and ``end``. No JAX import."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from vist2_jax.cli.errors import UsageError
from vist2_jax.cli.generation_io import sampling_from_args, streaming_printer


def generate_kwargs(sampling) -> dict:
    """A SamplingConfig (``vist2 generate`` flags) as ``generate`` keywords (GenerationConfig)."""
    kwargs = dict(do_sample=sampling.temperature > 0, repetition_penalty=sampling.repetition_penalty,
                  no_repeat_ngram_size=sampling.no_repeat_ngram, eos_token_id=list(sampling.stop_tokens))
    if sampling.temperature > 0:
        kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
    return kwargs


class _Streamer:
    """A transformers streamer calling ``on_token(row, token)`` for each generated token."""

    def __init__(self, on_token):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value):
        if not self.prompt_seen:  # generate puts the prompt first
            self.prompt_seen = True
            return
        for tok in value.reshape(-1).tolist():
            self.on_token(0, tok)

    def end(self):
        pass


def run_torch(args) -> int:
    import torch

    from vist2_jax.export.modeling_vist2 import Vist2ForCausalLM

    prompt_path, folder = Path(args.prompt_file), Path(args.torch)
    if not prompt_path.is_file():
        raise UsageError(f"--prompt-file: no such file {prompt_path}")
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    config = folder / "config.json"
    if not config.is_file() or json.loads(config.read_text()).get("model_type") != "vist2":
        raise UsageError(f"--torch: {folder} is not a `vist2 export` folder (no vist2 config.json)")
    if args.tokenizer:
        raise UsageError("--tokenizer does not apply to --torch (the export carries its tokenizer)")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep stderr to the one summary line
    model = Vist2ForCausalLM.from_pretrained(folder).eval()
    ids = model.tokenizer.encode(prompt_path.read_text())
    if not ids:
        raise UsageError(f"--prompt-file: {prompt_path} encodes to no tokens")
    stop = tuple(i for name, i in model.tokenizer.special_ids.items() if name in ("eos", "end"))
    sampling = sampling_from_args(args, stop)
    on_token = streaming_printer(model.detokenize)

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model.generate(torch.tensor([ids]), mode=args.mode, max_new_tokens=args.max_new_tokens,
                   pad_token_id=model.tokenizer.special_ids["pad"], streamer=_Streamer(on_token),
                   **generate_kwargs(sampling))
    sys.stdout.write("\n")
    elapsed = time.perf_counter() - start
    print(f"[{args.mode}, torch] {len(ids)} prompt tokens, {len(on_token.generated)} generated in {elapsed:.2f} s",
          file=sys.stderr)
    return 0
