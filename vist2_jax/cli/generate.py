"""``vist2 generate``: stream a continuation of a prompt file in gcc, pcc or text mode.

Checkpoint formats read (``--checkpoint DIR``):
* a training run directory of ``vist2 train`` / ``vist2 demo`` (``config.yaml`` +
  ``checkpoints/``): config, newest readable parameters and the tokenizer saved with them;
* an Orbax ``StandardCheckpointer`` directory holding the unboxed Vist2Model variables
  ``{"params": {"vision": ..., "aligner": ..., "decoder": ...}}`` (scanned-layer layout),
  with the model shape from ``--preset`` and ``--override key=value`` (recipe syntax);
* a Hugging Face Qwen3 folder (config.json + *.safetensors, via
  ``vist2_jax.inference.scoring.load_hf_decoder``): decoder only, so ``--mode text`` only.
``--torch DIR`` runs a ``vist2 export`` folder with the PyTorch runtime instead (same options).
Text goes through the run's tokenizer or ``--tokenizer`` (a SentencePiece ``.model`` or a HF ``tokenizer.json``)
and, for gcc/pcc, the sketch renderer of ``data_pipelines.render`` at the model's image size.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vist2_jax.cli.errors import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="stream generated text (gcc | pcc | text)")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="a training run dir, an Orbax StandardCheckpointer params dir, or a HF Qwen3 folder (text mode)")
    p.add_argument("--torch", metavar="DIR", help="instead of --checkpoint: a `vist2 export` folder, "
                   "run by the PyTorch runtime (vist2_jax/export/torch_vist2.py)")
    p.add_argument("--prompt-file", required=True, metavar="F")
    p.add_argument("--mode", default="gcc", choices=("gcc", "pcc", "text"))
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--tokenizer", metavar="PATH",
                   help="SentencePiece .model or tokenizer.json (default: the one saved in a training run)")
    p.add_argument("--preset", default="tiny", help="model shape of an Orbax checkpoint")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--no-repeat-ngram", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def load_checkpoint(directory: str, preset: str, overrides):
    """(ModelConfig, variables, is_decoder_only, tokenizer or None) from a supported format."""
    path = Path(directory)
    if not path.is_dir():
        raise UsageError(f"--checkpoint: no such directory {path}")
    from vist2_jax.inference.checkpoints import is_run_dir, load_run
    if is_run_dir(path):
        config, params, tokenizer, _ = load_run(path)
        return config.model, params, False, tokenizer
    if (path / "config.json").is_file():
        from vist2_jax.inference.scoring import load_hf_decoder
        config, params = load_hf_decoder(path)
        return config, {"params": {"decoder": params["params"]}}, True, None  # ViT never called
    import orbax.checkpoint as ocp

    from vist2_jax.config import load_config
    config = load_config(overrides=list(overrides), preset=preset).model
    tree = ocp.StandardCheckpointer().restore(path.resolve())
    if "params" not in tree:
        raise UsageError(f"--checkpoint: {path} holds no 'params' tree")
    return config, tree, False, None


def run(args) -> int:
    if args.torch:  # the PyTorch runtime of a `vist2 export` folder; imports no JAX
        from vist2_jax.export.torch_generate import run_torch
        return run_torch(args)
    import numpy as np

    from data_pipelines.tokenizer import load_tokenizer
    from vist2_jax.inference.generate import Generator
    from vist2_jax.inference.sampling import SamplingConfig

    prompt_path = Path(args.prompt_file)
    if not prompt_path.is_file():
        raise UsageError(f"--prompt-file: no such file {prompt_path}")
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    if not args.checkpoint:
        raise UsageError("one of --checkpoint DIR or --torch DIR is required")
    config, variables, decoder_only, tokenizer = load_checkpoint(args.checkpoint, args.preset, args.override)
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer is None:
        raise UsageError("--tokenizer is needed: this checkpoint does not carry one")
    if decoder_only and args.mode != "text":
        raise UsageError(f"--mode {args.mode} needs the ViT and aligner; {args.checkpoint} is a "
                         "decoder-only HF folder (use --mode text)")
    if decoder_only:
        render = lambda text: np.zeros((config.layout.image_size,) * 2 + (3,), np.uint8)  # noqa: E731
    else:
        from data_pipelines.render import RenderConfig, SketchRenderer
        render = SketchRenderer(RenderConfig(image_size=config.layout.image_size)).render
    ids = tokenizer.encode(prompt_path.read_text())
    if not ids:
        raise UsageError(f"--prompt-file: {prompt_path} encodes to no tokens")
    vocab = tokenizer.vocab_size

    def detokenize(tokens):  # the model's vocab may be padded past the tokenizer's
        return tokenizer.decode([t for t in tokens if t < vocab])

    gen = Generator(config, variables, render_fn=render, detokenize=detokenize,
                    chunk_token=tokenizer.special_ids["chunk"])
    stop = tuple(i for name, i in tokenizer.special_ids.items() if name in ("eos", "end"))
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty,
                              no_repeat_ngram=args.no_repeat_ngram, stop_tokens=stop)
    generated, shown = [], [""]

    def on_token(_row, tok):
        generated.append(tok)
        text = detokenize(generated)
        sys.stdout.write(text[len(shown[0]):])
        sys.stdout.flush()
        shown[0] = text

    result = gen.generate([ids], args.mode, args.max_new_tokens, sampling=sampling, seed=args.seed,
                          on_token=on_token)
    sys.stdout.write("\n")
    rate = result.decode_steps / result.decode_s if result.decode_s > 0 else float("nan")
    print(f"[{args.mode}] {len(ids)} prompt tokens, {len(result.tokens[0])} generated; "
          f"time to first token {result.ttft_s:.2f} s, decode {rate:.1f} tokens/s", file=sys.stderr)
    return 0
