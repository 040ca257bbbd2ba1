"""The sampling options of ``vist2 generate``, shared by the JAX generator and the PyTorch
runtime (``vist2 generate --torch`` maps it onto transformers' GenerationConfig); no JAX import."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` switch those off;
    ``repetition_penalty`` follows the CTRL/HF rule over prompt + generated tokens;
    ``no_repeat_ngram`` bans any token that would repeat an n-gram already seen."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self):
        for name, ok, rule in (("temperature", self.temperature >= 0, ">= 0"), ("top_k", self.top_k >= 0, ">= 0"),
                               ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                               ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
                               ("no_repeat_ngram", self.no_repeat_ngram >= 0, ">= 0")):
            if not ok:
                raise ValueError(f"{name} must be {rule}, got {getattr(self, name)}")
