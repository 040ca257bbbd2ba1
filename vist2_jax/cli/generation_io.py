"""What both ``vist2 generate`` paths (JAX and ``--torch``) share: the sampling flags and the
streaming printer. No JAX import."""

from __future__ import annotations

import sys

from vist2_jax.cli.errors import UsageError


def sampling_from_args(args, stop_tokens):
    """The sampling flags as a SamplingConfig (JAX-free; shared by ``--torch``); a bad value
    is one line naming its flag."""
    from vist2_jax.inference.sampling_config import SamplingConfig

    try:
        return SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                              repetition_penalty=args.repetition_penalty,
                              no_repeat_ngram=args.no_repeat_ngram, stop_tokens=tuple(stop_tokens))
    except ValueError as err:
        raise UsageError(f"--{str(err).replace('_', '-')}") from None


def streaming_printer(detokenize):
    """``on_token(row, token)`` that writes each new piece of the decoded text to stdout."""
    generated, shown = [], [""]

    def on_token(_row, tok):
        generated.append(tok)
        text = detokenize(generated)
        sys.stdout.write(text[len(shown[0]):])
        sys.stdout.flush()
        shown[0] = text
    on_token.generated = generated
    return on_token
