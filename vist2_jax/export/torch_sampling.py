"""Next-token sampling in PyTorch with the exact rules of ``vist2_jax/inference/sampling.py``
(``vist2 generate``): repetition penalty (CTRL/HF rule over prompt + generated tokens),
no-repeat-n-gram bans, then greedy (first maximum on ties) or temperature, top-k (ties with
the k-th kept), top-p (stable sort; a token is kept while the mass before it is < top_p).
Only the random draws differ from JAX (a torch.Generator, not a JAX key). No JAX import."""

from __future__ import annotations

from typing import Sequence

import torch

from vist2_jax.inference.sampling_config import SamplingConfig

_NEG = -1e30


def banned_by_ngrams(history: Sequence[int], n: int) -> set[int]:
    """Tokens that would repeat an n-gram of ``history`` after its last n-1 tokens."""
    if n == 1:
        return set(history)
    if len(history) < n - 1:
        return set()
    prefix = list(history[len(history) - (n - 1):])
    return {history[j + n - 1] for j in range(len(history) - n + 1)
            if list(history[j:j + n - 1]) == prefix}


def sample(logits: torch.Tensor, history: Sequence[int], config: SamplingConfig,
           generator: torch.Generator | None = None) -> int:
    """The next token from logits [V] given prompt + generated ``history``."""
    logits = logits.detach().to("cpu", torch.float32).clone()  # on the host, fp32
    if config.repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), dtype=torch.long)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / config.repetition_penalty,
                                   values * config.repetition_penalty)
    if config.no_repeat_ngram:
        banned = banned_by_ngrams(list(history), config.no_repeat_ngram)
        if banned:
            logits[torch.tensor(sorted(banned), dtype=torch.long)] = _NEG
    if config.temperature == 0.0:
        return int(torch.argmax(logits))
    logits = logits / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.numel())).values[-1]
        logits = torch.where(logits < kth, torch.full_like(logits, _NEG), logits)
    if config.top_p < 1.0:
        order = torch.sort(-logits, stable=True).indices
        probs = torch.softmax(logits[order], dim=-1)
        keep_sorted = (torch.cumsum(probs, dim=-1) - probs) < config.top_p
        keep = torch.zeros_like(keep_sorted)
        keep[order] = keep_sorted
        logits = torch.where(keep, logits, torch.full_like(logits, _NEG))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
