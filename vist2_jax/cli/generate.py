"""``vist2 generate``: stream a continuation of a prompt file in gcc, pcc or text mode.

Checkpoint formats read (``--checkpoint DIR``):
* a training run directory of ``vist2 train`` / ``vist2 demo`` (``config.yaml`` +
  ``checkpoints/``): config, newest readable parameters and the tokenizer saved with them;
* an Orbax ``StandardCheckpointer`` directory holding the unboxed Vist2Model variables
  ``{"params": {"vision": ..., "aligner": ..., "decoder": ...}}`` (scanned-layer layout),
  with the model shape from ``--preset`` and ``--override key=value`` (recipe syntax);
* a Hugging Face Qwen3 folder (config.json + *.safetensors, via
  ``vist2_jax.convert.hf_weights.load_hf_decoder``): decoder only, so ``--mode text`` only.
``--torch DIR`` runs a ``vist2 export`` folder with the PyTorch runtime instead (same options).
Text goes through the run's tokenizer or ``--tokenizer`` (a SentencePiece ``.model`` or a HF ``tokenizer.json``)
and, for gcc/pcc, the sketch renderer: a run's own, rebuilt from the renderer config saved
in its checkpoint (a font whose sha256 differs from the recorded one is refused); for an
Orbax directory, the one the preset and overrides describe (``data.font_*``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from vist2_jax import storage
from vist2_jax.cli.errors import UsageError
from vist2_jax.cli.generation_io import sampling_from_args, streaming_printer


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="stream generated text (gcc | pcc | text)")
    p.add_argument("--checkpoint", metavar="DIR",
                   help="a training run dir, an Orbax StandardCheckpointer params dir, or a HF Qwen3 folder (text mode)")
    p.add_argument("--torch", metavar="DIR", help="instead of --checkpoint: a `vist2 export` folder, "
                   "run by transformers with its own remote code (vist2_jax/export/modeling_vist2.py)")
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
    p.add_argument("--font", default=None, metavar="PATH",
                   help="the run's configured font file when it lives at another path here (same sha256)")
    p.set_defaults(func=run)


def load_checkpoint(directory: str, preset: str, overrides, font: str | None = None):
    """(ModelConfig, variables, renderer or None when decoder-only, tokenizer or None) from a
    supported format."""
    from data_pipelines.fonts import FontError
    from data_pipelines.render import renderer_for_config
    from vist2_jax.checkpointing.runs import load_run, resolve_run_dir
    from vist2_jax.config.schema import ConfigError

    path = storage.as_path(directory)
    if not path.is_dir():
        raise UsageError(f"--checkpoint: no such directory {path}")
    if (path / "config.json").is_file():
        from vist2_jax.convert.hf_weights import load_hf_decoder
        config, params = load_hf_decoder(path, what="--checkpoint")
        return config, {"params": {"decoder": params["params"]}}, None, None  # ViT never called
    try:
        resolve_run_dir(path)
    except ConfigError:
        pass
    else:
        run = load_run(path)
        try:
            renderer = run.sketch_renderer(font)
        except FontError as err:
            raise UsageError(f"--checkpoint: {run.workdir} step {run.step}: {err}") from None
        return run.config.model, run.params, renderer, run.tokenizer
    if not any((path / name).exists() for name in ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt")):
        raise UsageError(f"--checkpoint: {path} is not a training run, a step folder (run/checkpoints/N), "
                         "a demo directory, a HF folder (config.json) or an Orbax params checkpoint")
    import orbax.checkpoint as ocp

    from vist2_jax.config import load_config
    config = load_config(overrides=[*overrides, *([f"data.font_path={font}"] if font else [])], preset=preset)
    renderer = renderer_for_config(config.data, config.model.layout.image_size)
    try:
        tree = ocp.StandardCheckpointer().restore(storage.absolute(path))
    except Exception as err:  # orbax/tensorstore raise many kinds for damaged files
        raise UsageError(f"--checkpoint: {path}: unreadable Orbax checkpoint ({type(err).__name__})") from None
    if "params" not in tree:
        raise UsageError(f"--checkpoint: {path} holds no 'params' tree")
    return config.model, tree, renderer, None


def run(args) -> int:
    sampling_from_args(args, ())  # a bad sampling flag fails before the (slow) model load
    if args.torch:  # the PyTorch runtime of a `vist2 export` folder; imports no JAX
        from vist2_jax.cli.generate_torch import run_torch
        return run_torch(args)
    import numpy as np

    from data_pipelines.tokenizer import load_tokenizer
    from vist2_jax.inference.generate import Generator

    prompt_path = Path(args.prompt_file)
    if not prompt_path.is_file():
        raise UsageError(f"--prompt-file: no such file {prompt_path}")
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    if not args.checkpoint:
        raise UsageError("one of --checkpoint DIR or --torch DIR is required")
    config, variables, renderer, tokenizer = load_checkpoint(args.checkpoint, args.preset, args.override,
                                                             args.font)
    decoder_only = renderer is None
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
        if renderer.config.image_size != config.layout.image_size:
            raise UsageError(f"--checkpoint: its renderer draws {renderer.config.image_size}px sketches, "
                             f"the model reads {config.layout.image_size}px")
        render = lambda text: renderer.render(text, where=f"generate {prompt_path}")  # noqa: E731
    ids = tokenizer.encode(prompt_path.read_text())
    if not ids:
        raise UsageError(f"--prompt-file: {prompt_path} encodes to no tokens")
    vocab = tokenizer.vocab_size

    def detokenize(tokens):  # the model's vocab may be padded past the tokenizer's
        return tokenizer.decode([t for t in tokens if t < vocab])

    sketch_text = None if decoder_only else (lambda tokens: renderer.sketch_text(tokens, detokenize))  # noqa: E731
    gen = Generator(config, variables, render_fn=render, detokenize=detokenize,
                    chunk_token=tokenizer.special_ids["chunk"], sketch_text=sketch_text)
    stop = tuple(i for name, i in tokenizer.special_ids.items() if name in ("eos", "end"))
    sampling = sampling_from_args(args, stop)
    on_token = streaming_printer(detokenize)

    result = gen.generate([ids], args.mode, args.max_new_tokens, sampling=sampling, seed=args.seed,
                          on_token=on_token)
    sys.stdout.write("\n")
    rate = result.decode_steps / result.decode_s if result.decode_s > 0 else float("nan")
    print(f"[{args.mode}] {len(ids)} prompt tokens, {len(result.tokens[0])} generated; "
          f"time to first token {result.ttft_s:.2f} s, decode {rate:.1f} tokens/s", file=sys.stderr)
    if renderer is not None and renderer.stats.missing_glyphs:
        print(f"[renderer] missing glyphs drawn as {renderer.replacement}: {renderer.stats.missing_summary()}",
              file=sys.stderr)
    return 0
