"""``vist2 render``: one text file -> the sketch the model would see."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from data_pipelines.png import png_bytes
from data_pipelines.render import RenderRejected, renderer_for_config


def _usage_error(message: str) -> Exception:
    from vist2_jax.cli.errors import UsageError

    return UsageError(message)


def register(subparsers) -> None:
    p = subparsers.add_parser("render", help="render a text file as the sketch image the model sees")
    p.add_argument("--text-file", required=True, help="UTF-8 text, rendered as one chunk")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--recipe", default=None, help="recipe YAML (image size from model.layout)")
    p.add_argument("--font", default=None,
                   help="font file, same as data.font_path=F (default: the bundled DejaVu Sans Mono)")
    p.add_argument("--method", choices=("auto", "atlas", "pillow"), default="auto")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    p.set_defaults(func=run_render)


def run_render(args: argparse.Namespace) -> int:
    from vist2_jax.config import load_config

    font = [f"data.font_path={args.font}"] if args.font else []
    config = load_config(args.recipe, overrides=[*args.overrides, *font])
    try:
        text = Path(args.text_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _usage_error(f"--text-file: no such file {args.text_file}") from None
    except UnicodeDecodeError as err:
        raise _usage_error(f"--text-file: {args.text_file} is not UTF-8 ({err.reason})") from None
    renderer = renderer_for_config(config.data, config.model.layout.image_size)
    if config.data.sketch_tile_tokens:  # token-aligned tiles draw token groups: the tokenizer cuts them
        if not config.data.tokenizer:
            raise _usage_error(f"data.sketch_tile_tokens={config.data.sketch_tile_tokens} draws token groups: "
                               "pass the run's tokenizer as data.tokenizer=PATH")
        from data_pipelines.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.data.tokenizer)
        text = renderer.sketch_text(tokenizer.encode(text), tokenizer.decode)
    try:
        image = renderer.render(text, method=args.method, where=args.text_file)
    except RenderRejected as err:
        raise _usage_error(f"{args.text_file}: {err}") from None
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(png_bytes(image))  # the same bytes on every machine
    size = next(s for s, n in renderer.by_size.items() if n)
    meta = renderer.renderer_config()
    print(f"wrote {args.out}: {'x'.join(map(str, image.shape))} uint8, font {size}px "
          f"{os.path.basename(meta['font_file'])} (sha256 {meta['font_sha256'][:12]}), "
          f"{renderer.stats.missing_glyphs} missing glyphs replaced")
    if renderer.stats.missing_glyphs:
        print(f"missing glyphs: {renderer.stats.missing_summary()}")
    return 0
