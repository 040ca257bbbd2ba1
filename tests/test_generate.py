"""Generation agrees with training: teacher-forced gcc / pcc / text generation reproduces,
step by step, the logits of one training forward over the equivalent row (fp32, 1e-4);
the cache holds exactly the analytic number of live entries; sampling options behave."""

import hashlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_olm_batch
from vist2_jax.row_contract import CHUNK_ID
from data_pipelines.rows import pack_olm_row
from vist2_jax.row_contract import stack_rows
from vist2_jax.inference.cache import peak_entries
from vist2_jax.inference.generate import Generator
from vist2_jax.inference.sampling import SamplingConfig, sample
from vist2_jax.model.decoder import Qwen3Decoder
from vist2_jax.model.vist2 import Vist2Model


def detokenize(ids):
    return " ".join(str(int(i)) for i in ids)


def make_render(size):
    """Deterministic stand-in renderer: pixels seeded by a hash of the text."""
    def render(text):
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return render


@pytest.fixture(scope="module")
def setup(tiny_config):
    config = tiny_config.model
    model = Vist2Model(config)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), make_olm_batch(config)))
    render = make_render(config.layout.image_size)
    gen = Generator(config, params, render_fn=render, detokenize=detokenize, prefill_chunk=16)
    return config, model, params, render, gen


def training_logits(config, model, params, render, chunks):
    """One training forward over the OLM row of ``chunks`` (visual positions strided by
    ``layout.visual_stride``); returns (logits, row)."""
    lay = config.layout
    images = [render(detokenize(c)) for c in chunks[:-1]]
    seq_len = sum(len(c) + 1 for c in chunks) + (len(chunks) - 1) * lay.visual_len
    row = pack_olm_row([chunks], [images + [None]], seq_len=seq_len + 3, visual_len=lay.visual_len,
                       num_image_slots=max(len(images), 1),
                       image_shape=(lay.image_size, lay.image_size), chunk_token=CHUNK_ID,
                       visual_stride=lay.visual_stride)
    batch = stack_rows([row])
    return np.asarray(jax.jit(model.apply)(params, batch)["logits"])[0], batch


def predicting_rows(chunks, start, count, L, m):
    """Row index whose output predicts stream token s, for s in [start, start+count)."""
    out, base = [], 0
    bounds = []
    for c in chunks:
        bounds.append(base)
        base += len(c)
    for s in range(start, start + count):
        c = max(i for i, b in enumerate(bounds) if b <= s)
        out.append(sum(len(x) + 1 + m for x in chunks[:c]) + (s - bounds[c]))
    return np.array(out)


def max_error_vs_training(setup, render, chunks, stream, prompt_len, result):
    """Max abs difference between the generated tokens' recorded logits and the logits of one
    training forward over the row of ``chunks``, at the rows that predict the same tokens
    (checked to be the generated stream)."""
    config, model, params, _, _ = setup
    L, m = config.layout.text_len, config.layout.visual_len
    logits, batch = training_logits(config, model, params, render, chunks)
    rows = predicting_rows(chunks, prompt_len, len(stream) - prompt_len, L, m)
    np.testing.assert_array_equal(batch["targets"][0, rows], stream[prompt_len:])
    return float(np.abs(result.logits[0] - logits[rows]).max())


def _stream(config, n, seed):
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(4, config.decoder.vocab_size, n)]


@pytest.mark.parametrize("mode,prompt_len,new", [("gcc", 13, 20), ("gcc", 16, 9), ("pcc", 13, 12)])
def test_teacher_forced_generation_matches_training_forward(setup, mode, prompt_len, new, record_property):
    config, model, params, render, gen = setup
    L, m = config.layout.text_len, config.layout.visual_len
    stream = _stream(config, prompt_len + new, seed=prompt_len)
    result = gen.generate([stream[:prompt_len]], mode, new, forced_tokens=np.array([stream[prompt_len:]]),
                          record_logits=True, track_entries=True)
    if mode == "gcc":
        chunks = [stream[i:i + L] for i in range(0, len(stream), L)]
    else:
        k = prompt_len // L
        chunks = [stream[i * L:(i + 1) * L] for i in range(k)] + [stream[k * L:]]
    err = max_error_vs_training(setup, render, chunks, stream, prompt_len, result)
    record_property(f"gen_vs_train_max_abs_{mode}_{prompt_len}_{new}", err)
    assert err < 1e-4
    assert result.peak_entries == peak_entries(mode, prompt_len, new, L, m)
    assert result.tokens[0] == stream[prompt_len:]


def test_strided_visual_positions_generate_as_they_train(setup):
    """model.layout.visual_stride=2 (a visual token takes two positions, docs/design.md §2):
    teacher-forced gcc reproduces the training forward over the row built with that stride."""
    import dataclasses

    config, model, params, render, _ = setup
    config = dataclasses.replace(config, layout=dataclasses.replace(config.layout, visual_stride=2))
    gen = Generator(config, params, render_fn=render, detokenize=detokenize, prefill_chunk=16)
    L = config.layout.text_len
    stream = _stream(config, 13 + 20, seed=3)
    result = gen.generate([stream[:13]], "gcc", 20, forced_tokens=np.array([stream[13:]]), record_logits=True)
    chunks = [stream[i:i + L] for i in range(0, len(stream), L)]
    logits, batch = training_logits(config, model, params, render, chunks)
    visual = batch["positions"][0][batch["modality"][0] == 2]
    assert (np.diff(visual[:config.layout.visual_len]) == 2).all()
    rows = predicting_rows(chunks, 13, 20, L, config.layout.visual_len)
    assert float(np.abs(result.logits[0] - logits[rows]).max()) < 1e-4
    unstrided = training_logits(setup[0], model, params, render, chunks)[0]
    assert float(np.abs(unstrided[rows] - logits[rows]).max()) > 1e-3  # the stride reaches RoPE


def test_text_mode_matches_plain_causal_forward(setup, record_property):
    config, model, params, _, gen = setup
    stream = _stream(config, 30, seed=5)
    n = 11
    result = gen.generate([stream[:n]], "text", 30 - n, forced_tokens=np.array([stream[n:]]),
                          record_logits=True, track_entries=True)
    tokens = jnp.asarray([stream[:-1]], jnp.int32)
    ref = Qwen3Decoder(config).apply({"params": params["params"]["decoder"]}, tokens,
                                     jnp.arange(29)[None], method=Qwen3Decoder.text_logits)
    err = float(np.abs(result.logits[0] - np.asarray(ref)[0, n - 1:]).max())
    record_property("gen_vs_causal_max_abs_text", err)
    assert err < 1e-4
    assert result.peak_entries == peak_entries("text", n, 30 - n, 8, 4) == 29


def test_batched_prompts_of_different_lengths_match_single_rows(setup):
    config, _, _, _, gen = setup
    streams = [_stream(config, 30, seed=s) for s in (7, 8)]
    lens = (5, 14)
    forced = np.array([s[n:n + 12] for s, n in zip(streams, lens)])
    both = gen.generate([s[:n] for s, n in zip(streams, lens)], "gcc", 12, forced_tokens=forced,
                        record_logits=True)
    for b, (s, n) in enumerate(zip(streams, lens)):
        one = gen.generate([s[:n]], "gcc", 12, forced_tokens=forced[b:b + 1], record_logits=True)
        np.testing.assert_allclose(both.logits[b], one.logits[0], atol=1e-4)


def test_greedy_is_deterministic_and_stops(setup):
    config, _, _, _, gen = setup
    prompt = _stream(config, 10, seed=9)
    first = gen.generate([prompt], "gcc", 12)
    again = gen.generate([prompt], "gcc", 12)
    assert first.tokens == again.tokens and len(first.tokens[0]) == 12
    stop = first.tokens[0][3]
    stopped = gen.generate([prompt], "gcc", 12, sampling=SamplingConfig(stop_tokens=(stop,)))
    assert stopped.tokens[0] == first.tokens[0][:first.tokens[0].index(stop) + 1]
    sampled = gen.generate([prompt, prompt], "gcc", 12, seed=3,
                           sampling=SamplingConfig(temperature=1.0, top_k=20, top_p=0.9,
                                                   repetition_penalty=1.3, no_repeat_ngram=2))
    for row in sampled.tokens:
        pairs = list(zip(row, row[1:]))
        assert len(pairs) == len(set(pairs))  # no repeated bigram among generated tokens


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    hist, hlen = jnp.zeros((1, 4), jnp.int32), jnp.zeros((1,), jnp.int32)
    draws = {int(sample(logits, hist, hlen, jax.random.key(i), SamplingConfig(temperature=1.0, top_p=0.7))[0])
             for i in range(64)}
    assert draws == {0, 1}
    draws = {int(sample(logits, hist, hlen, jax.random.key(i), SamplingConfig(temperature=1.0, top_k=1))[0])
             for i in range(16)}
    assert draws == {0}
    # history 1 0 1: the bigram (1, 0) exists, so after the last token 1, token 0 is banned
    hist, hlen = jnp.array([[1, 0, 1, 0]], jnp.int32), jnp.array([3], jnp.int32)
    assert int(sample(logits, hist, hlen, jax.random.key(0), SamplingConfig(no_repeat_ngram=2))[0]) == 1
    # a strong repetition penalty moves greedy off the seen tokens 0 and 1
    assert int(sample(logits, hist, hlen, jax.random.key(0), SamplingConfig(repetition_penalty=100.0))[0]) == 2


@pytest.fixture(scope="module")
def real_tokenizer(tmp_path_factory):
    """The SentencePiece tokenizer a run trains on the embedded corpus."""
    from data_pipelines.pipeline import resolve_tokenizer
    from vist2_jax.config import load_config

    return resolve_tokenizer(load_config(), tmp_path_factory.mktemp("gen_tok"))


def capped_render(size, max_tokens):
    """The stand-in renderer, refusing (like a full sketch) any text of more than ``max_tokens``."""
    from data_pipelines.render import RenderRejected

    inner = make_render(size)

    def render(text):
        if len(text.split()) > max_tokens:
            raise RenderRejected(f"{len(text.split())} tokens do not fit")
        return inner(text)
    return render


@pytest.mark.parametrize("mode,prompt_len,new", [("gcc", 13, 20), ("pcc", 19, 6)])
def test_chunks_close_early_where_the_renderer_stops_and_carry_the_rest(setup, mode, prompt_len, new,
                                                                        record_property):
    """A chunk closes before the token its sketch cannot take (the chunk rule), and that token
    is predicted again by the next chunk's marker. Teacher-forced logits equal one training
    forward over the row with those variable-length chunks: nothing dropped, positions and
    chunk ids as in training."""
    config, _, params, _, _ = setup
    L, cap = config.layout.text_len, 5
    render = capped_render(config.layout.image_size, cap)
    gen = Generator(config, params, render_fn=render, detokenize=detokenize, prefill_chunk=16)
    stream = _stream(config, prompt_len + new, seed=prompt_len + 1)
    result = gen.generate([stream[:prompt_len]], mode, new, forced_tokens=np.array([stream[prompt_len:]]),
                          record_logits=True)
    # The chunk rule by hand: this renderer takes 5 tokens, so a chunk closes before its 6th.
    # gcc checks every token it feeds (not the last, never fed); pcc compresses the prompt only.
    walked = stream[:-1] if mode == "gcc" else stream[:prompt_len]
    chunks = [walked[i:i + cap] for i in range(0, len(walked), cap)]
    chunks[-1] = chunks[-1] + stream[len(walked):]
    assert max(len(c) for c in chunks[:-1]) < L
    err = max_error_vs_training(setup, render, chunks, stream, prompt_len, result)
    record_property(f"gen_early_close_vs_train_max_abs_{mode}", err)
    assert err < 1e-4
    assert result.tokens[0] == stream[prompt_len:]


@pytest.mark.parametrize("prompt", [
    "\n".join(str(i) for i in range(1, 201)),  # many short lines
    "supercalifragilisticexpialidocious" * 12 + " end",  # a very long word
    "first\n\n\n\n\n\n\n\n\n\n\n\nlast",  # blank lines
    "mixed: 混合文字 עברית العربية 😀 Ελληνικά\n" * 6,  # scripts the font may lack
])
def test_gcc_generates_from_any_text_with_the_real_renderer(tiny_config, real_tokenizer, prompt):
    from data_pipelines.render import RenderConfig, SketchRenderer

    config, tokenizer = tiny_config.model, real_tokenizer
    vocab = min(tokenizer.vocab_size, config.decoder.vocab_size)
    params = nn.unbox(jax.jit(Vist2Model(config).init)(jax.random.key(1), make_olm_batch(config)))
    renderer = SketchRenderer(RenderConfig(image_size=config.layout.image_size))
    gen = Generator(config, params, render_fn=renderer.render,
                    detokenize=lambda ids: tokenizer.decode([t for t in ids if t < vocab]), prefill_chunk=64)
    ids = [t for t in tokenizer.encode(prompt) if t < vocab]
    for mode in ("gcc", "pcc"):
        result = gen.generate([ids], mode, 24)
        assert len(result.tokens[0]) == 24
