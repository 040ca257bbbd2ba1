"""Efficiency of gcc (VIST2) against pcc (Glyph-like) and text generation on one set of weights.

Per mode: peak live KV entries (the analytic formula of :mod:`.cache`, which the generator
tests check against measured cache occupancy) and bytes; FLOPs of the prefill and of the
whole generation, from the compiled programs' cost analysis and from :mod:`.flops`.

Compiled counts need no weights: every program the generator runs (prompt images through
ViT + aligner, a prefill piece, the decode step, a chunk's re-encoding) is lowered on
abstract shapes and compiled. XLA's cost analysis counts a loop body once, so programs are
compiled with unrolled layers at decoder/ViT depths 1 and 2 and extrapolated linearly in
depth (layers are identical; a test finds it within 0.1% of a full-depth unrolled compile).
They are compiled in fp32: XLA:CPU wraps bf16 cache updates in converts it counts as FLOPs.
Time to first token and decode tokens/s are measured on a shape this CPU can run: the
preset with decoder and ViT depth divided by the same factor, in fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vist2_jax.config.presets import preset_model
from vist2_jax.config.schema import ModelConfig
from vist2_jax.inference import flops as F
from vist2_jax.inference.cache import (MODES, CacheLayout, finished_chunks, kv_bytes, peak_entries,
                                       prefill_length, prefill_pieces)
from vist2_jax.inference.generate import (Generator, decode_step, extend_cache, insert_chunk,
                                          prefill_visual)
from vist2_jax.inference.sampling import SamplingConfig
from vist2_jax.kernels.mask import RowMeta
from vist2_jax.model.decoder import KVCache
from vist2_jax.model.layers import DTYPES
from vist2_jax.model.vist2 import Vist2Model, abstract_params, example_batch

GRID = ((8192, 512), (8192, 8192), (32768, 8192))
_I32, _I8 = jnp.int32, jnp.int8


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _meta(batch, length):
    return RowMeta(_sds((batch, length), _I8), *(_sds((batch, length), _I32) for _ in range(3)))


def _program(cfg: ModelConfig, name: str, batch: int, size: int, capacity: int, extra: int):
    """(fn, abstract args) of one generator program at the given shapes."""
    model = Vist2Model(cfg)
    params = nn.unbox(abstract_params(cfg))
    dec, lay = cfg.decoder, cfg.layout
    dtype = DTYPES[cfg.dtype]
    kv = _sds((dec.num_layers, batch, capacity, dec.num_kv_heads, dec.head_dim), dtype)
    cache = KVCache(kv, kv, _meta(batch, capacity))
    image = (lay.image_size, lay.image_size, 3)
    if name == "images":  # size = prefill row length, extra = number of images
        args = (_sds((batch, extra) + image, jnp.uint8), _sds((batch, size), _I8))
        return (lambda p, *a: model.apply(p, *a, method=prefill_visual)), (params,) + args
    if name == "extend":  # size = piece length, extra = 1 when the piece holds visual tokens
        visual = _sds((batch, size, dec.hidden_size), dtype) if extra else None
        fn = lambda p, t, vis, meta, s, c: model.apply(p, t, vis, meta, s, c, None, size - 1,  # noqa: E731
                                                       method=extend_cache)
        return fn, (params, _sds((batch, size), _I32), visual, _meta(batch, size),
                    _sds((batch, size), _I32), cache)
    if name == "decode":  # extra = history length
        fn = lambda p, *a: model.apply(p, *a, SamplingConfig(), method=decode_step)  # noqa: E731
        return fn, (params, _sds((batch,), _I32), _meta(batch, 1)._replace(
            modality=_sds((batch,), _I8), chunk_id=_sds((batch,), _I32),
            segment_id=_sds((batch,), _I32), positions=_sds((batch,), _I32)),
            _sds((batch,), _I32), cache, _sds((batch, extra), _I32), _sds((batch,), _I32),
            jax.random.key(0))
    if name == "insert":
        m = lay.visual_len
        return (lambda p, *a: model.apply(p, *a, method=insert_chunk)), (
            params, _sds((batch,) + image, jnp.uint8), _meta(batch, m), _sds((batch, m), _I32),
            cache, _sds((batch, capacity), jnp.bool_))
    raise ValueError(name)


def _cost(cfg, name, batch, size, capacity, extra) -> float:
    fn, args = _program(cfg, name, batch, size, capacity, extra)
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def _depth(cfg: ModelConfig, dec: int, vit: int) -> ModelConfig:
    """Unrolled, fp32 (XLA:CPU counts bf16<->f32 converts of the whole cache as FLOPs;
    the matmul FLOPs do not depend on the dtype), at the given depths."""
    return dataclasses.replace(
        cfg, scan_layers=False, remat_policy="none", dtype="float32",
        decoder=dataclasses.replace(cfg.decoder, num_layers=dec),
        vision=dataclasses.replace(cfg.vision, num_layers=vit))


@functools.lru_cache(maxsize=None)
def compiled_flops(cfg: ModelConfig, name: str, batch: int, size: int, capacity: int, extra: int,
                   full_depth: bool = False) -> float:
    """Cost-analysis FLOPs of one program, extrapolated from depths 1 and 2 (or compiled at
    full depth, unrolled, with ``full_depth``)."""
    if full_depth:
        return _cost(_depth(cfg, cfg.decoder.num_layers, cfg.vision.num_layers), name, batch, size,
                     capacity, extra)
    base = _cost(_depth(cfg, 1, 1), name, batch, size, capacity, extra)
    total = base
    if name != "images":
        total += (cfg.decoder.num_layers - 1) * (
            _cost(_depth(cfg, 2, 1), name, batch, size, capacity, extra) - base)
    if name in ("images", "insert"):
        total += (cfg.vision.num_layers - 1) * (
            _cost(_depth(cfg, 1, 2), name, batch, size, capacity, extra) - base)
    return total


def mode_report(cfg: ModelConfig, mode: str, prompt: int, new: int, prefill_chunk: int = 1024,
                compiled: bool = True) -> dict:
    """Memory and FLOPs of one row's generation (batch 1) in ``mode``."""
    lay, dec = cfg.layout, cfg.decoder
    L, m = lay.text_len, lay.visual_len
    layout = CacheLayout.for_generation(mode, [prompt], new, L, m)
    capacity = layout.capacity
    length = prefill_length(mode, prompt, L, m)
    pieces, piece = prefill_pieces(length, prefill_chunk)
    k = 0 if mode == "text" else prompt // L
    compressions = finished_chunks(mode, prompt, new, L) - k
    dbytes = jnp.dtype(DTYPES[cfg.dtype]).itemsize
    peak = peak_entries(mode, prompt, new, L, m)
    out = {"peak_kv_entries": peak,
           "peak_kv_bytes": kv_bytes(peak, dec.num_layers, dec.num_kv_heads, dec.head_dim, dbytes),
           "allocated_kv_entries": capacity,
           "allocated_kv_bytes": kv_bytes(capacity, dec.num_layers, dec.num_kv_heads, dec.head_dim, dbytes),
           "prefill_entries": length, "prefill_pieces": [pieces, piece], "prompt_images": k,
           "chunk_reencodings": compressions}
    analytic = F.generation_flops(cfg, mode, prompt, new, capacity, pieces, piece)
    out.update({f"flops_{key}_analytic": analytic[key] for key in
                ("prefill_executed", "total_executed", "prefill_attended", "total_attended")})
    if compiled:
        prefill = pieces * compiled_flops(cfg, "extend", 1, piece, capacity, int(k > 0))
        if k:
            prefill += compiled_flops(cfg, "images", 1, pieces * piece, capacity, k)
        decode = (new - 1) * compiled_flops(cfg, "decode", 1, 1, capacity, prompt + new)
        reencode = compressions * compiled_flops(cfg, "insert", 1, m, capacity, 0) if compressions else 0.0
        out["flops_prefill_compiled"] = prefill
        out["flops_total_compiled"] = prefill + decode + reencode
        out["compiled_vs_analytic_rel_err"] = max(
            abs(out["flops_prefill_compiled"] / analytic["prefill_executed"] - 1),
            abs(out["flops_total_compiled"] / analytic["total_executed"] - 1))
    return out


_RATIO_KEYS = ("peak_kv_entries", "peak_kv_bytes", "flops_prefill_compiled", "flops_total_compiled",
               "flops_prefill_attended_analytic", "flops_total_attended_analytic")


def grid_point(cfg: ModelConfig, prompt: int, new: int, compiled: bool = True) -> dict:
    modes = {mode: mode_report(cfg, mode, prompt, new, compiled=compiled) for mode in MODES}
    ratios = {}
    for a, b in (("gcc", "text"), ("gcc", "pcc")):
        ratios[f"{a}/{b}"] = {key: modes[a][key] / modes[b][key] for key in _RATIO_KEYS
                              if key in modes[a]}
    return {"prompt_tokens": prompt, "new_tokens": new, "modes": modes, "ratios": ratios,
            "gcc_kv_cut_vs_text": 1 - ratios["gcc/text"]["peak_kv_entries"]}


def timed_config(preset: str, factor: int) -> ModelConfig:
    """The preset with decoder and ViT depth divided by ``factor`` (rounded, >= 1), fp32."""
    cfg = preset_model(preset)
    return dataclasses.replace(
        cfg, dtype="float32",
        decoder=dataclasses.replace(cfg.decoder, num_layers=max(1, round(cfg.decoder.num_layers / factor))),
        vision=dataclasses.replace(cfg.vision, num_layers=max(1, round(cfg.vision.num_layers / factor))))


def _hash_render(size):
    def render(text):
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return render


def time_modes(cfg: ModelConfig, prompt: int, new: int, repeats: int = 3, prefill_chunk: int = 1024,
               log=print) -> dict:
    """Median TTFT and decode tokens/s per mode on random weights (one warm-up run each).
    Rendering uses a hash stand-in (cost of the real renderer: ~0.5 ms per chunk)."""
    params = nn.unbox(jax.jit(Vist2Model(cfg).init)(jax.random.key(0), example_batch(cfg)))
    gen = Generator(cfg, params, render_fn=_hash_render(cfg.layout.image_size),
                    detokenize=lambda ids: " ".join(map(str, ids)), prefill_chunk=prefill_chunk)
    ids = [int(t) for t in np.random.default_rng(0).integers(10, cfg.decoder.vocab_size, prompt)]
    out = {}
    for mode in MODES:
        runs = []
        for i in range(repeats + 1):
            res = gen.generate([ids], mode, new, forced_tokens=np.full((1, new), 11))
            runs.append((res.ttft_s, res.decode_steps / max(res.decode_s, 1e-9)))
            log(f"  timed {mode} run {i}: ttft {res.ttft_s:.2f}s, decode {runs[-1][1]:.1f} tok/s"
                + (" (warm-up)" if i == 0 else ""))
        out[mode] = {"ttft_s_median": statistics.median(r[0] for r in runs[1:]),
                     "decode_tokens_per_s_median": statistics.median(r[1] for r in runs[1:]),
                     "ttft_s_runs": [r[0] for r in runs[1:]],
                     "decode_tokens_per_s_runs": [r[1] for r in runs[1:]]}
    out["ttft_speedup_text_over_gcc"] = out["text"]["ttft_s_median"] / out["gcc"]["ttft_s_median"]
    out["ttft_speedup_pcc_over_gcc"] = out["pcc"]["ttft_s_median"] / out["gcc"]["ttft_s_median"]
    return out


def scaling_curves(cfg: ModelConfig, new_tokens: int, prompts=None) -> dict:
    """Per mode, analytic peak KV bytes and whole-generation attended FLOPs vs prompt length."""
    lay, dec = cfg.layout, cfg.decoder
    prompts = prompts or [2 ** k for k in range(10, 17)]
    itemsize = 2 if DTYPES[cfg.dtype].__name__ == "bfloat16" else 4
    out = {}
    for mode in ("text", "pcc", "gcc"):
        mem, fl = [], []
        for n in prompts:
            peak = peak_entries(mode, n, new_tokens, lay.text_len, lay.visual_len)
            mem.append(kv_bytes(peak, dec.num_layers, dec.num_kv_heads, dec.head_dim, itemsize))
            cap = CacheLayout.for_generation(mode, [n], new_tokens, lay.text_len, lay.visual_len).capacity
            pieces, piece = prefill_pieces(prefill_length(mode, n, lay.text_len, lay.visual_len), 1024)
            fl.append(F.generation_flops(cfg, mode, n, new_tokens, cap, pieces, piece)["total_attended"])
        out[mode] = {"kv_bytes": mem, "flops": fl}
    return {"prompts": prompts, "modes": out}


def plot_scaling(cfg: ModelConfig, name: str, new_tokens: int, path: str) -> dict:
    """Peak KV bytes and generation FLOPs of gcc / pcc / text against prompt length, log-log."""
    from vist2_jax.plotting import line_charts

    curves = scaling_curves(cfg, new_tokens)
    modes, prompts = curves["modes"], curves["prompts"]
    panels = [{"series": {m: list(zip(prompts, d[key])) for m, d in modes.items()}, "title": title,
               "x_label": "prompt tokens", "y_label": unit, "log_x": True, "log_y": True}
              for key, title, unit in (("kv_bytes", f"{name}: peak KV cache (+{new_tokens} new tokens)", "bytes"),
                                       ("flops", f"{name}: generation FLOPs (attended)", "FLOPs"))]
    line_charts(panels, path)
    return curves
