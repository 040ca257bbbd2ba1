"""The efficiency arithmetic: peak KV entries, the mask's attended pairs, compiled vs
analytic FLOPs (including the depth extrapolation), the paper's 4x bounds, and the CLIs."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import make_olm_batch
from vist2_jax.row_contract import CHUNK_ID
from data_pipelines.rows import pack_olm_row
from vist2_jax.row_contract import stack_rows
from vist2_jax.config.presets import preset_model
from vist2_jax.inference import flops as F
from vist2_jax.inference.cache import peak_entries
from vist2_jax.bench.efficiency import compiled_flops, grid_point, mode_report
from vist2_jax.kernels.mask import TEXT, VISUAL, RowMeta, vision_memory_mask


def test_kv_cut_at_4x_meets_the_bound():
    text = peak_entries("text", 8192, 8192, 256, 64)
    gcc = peak_entries("gcc", 8192, 8192, 256, 64)
    bound = (16384 * 64 // 256 + 256) / 16384  # m/L of the text cache plus the current chunk
    assert text == 16383 and gcc == 63 * 64 + 256
    assert 1 - gcc / text >= 0.73 and gcc / text <= bound


@pytest.mark.parametrize("mode,n,new", [("gcc", 13, 20), ("gcc", 16, 9), ("pcc", 13, 12), ("gcc", 3, 30)])
def test_attended_pairs_equal_the_training_mask(mode, n, new):
    """Pairs counted by flops.generation_attended_pairs == mask entries of the equivalent training row,
    summed over the queries the generator actually computes."""
    L, m = 8, 4
    stream = list(range(10, 10 + n + new))
    k = n // L
    if mode == "gcc":
        chunks = [stream[i:i + L] for i in range(0, len(stream), L)]
    else:
        chunks = [stream[i * L:(i + 1) * L] for i in range(k)] + [stream[k * L:]]
    images = [np.zeros((2, 2, 3), np.uint8)] * len(chunks)
    seq = sum(len(c) + 1 for c in chunks) + (len(chunks) - 1) * m
    row = stack_rows([pack_olm_row([chunks], [images], seq_len=seq, visual_len=m,
                                   num_image_slots=len(chunks), image_shape=(2, 2), chunk_token=CHUNK_ID)])
    mask = np.asarray(vision_memory_mask(RowMeta.from_batch(row)))[0]
    fed = []
    index = 0  # stream index of the next text token along the row
    for pos in range(seq):
        mod, chunk = row["modality"][0, pos], row["chunk_id"][0, pos]
        if mod == VISUAL:
            fed.append(pos)
        elif mod == TEXT and row["tokens"][0, pos] == CHUNK_ID and row["targets"][0, pos] != 0:
            fed.append(pos) if chunk > k else None
        elif mod == TEXT:
            full_last = mode == "gcc" and (index + 1) % L == 0
            if chunk > k and index <= n + new - 2 and not full_last:
                fed.append(pos)
            index += 1
    assert F.generation_attended_pairs(mode, n, new, L, m)["total"] == int(mask[fed].sum())


@pytest.fixture(scope="module")
def small_real():
    """The 0.6b preset at a short context: compiles in seconds, real head_dim and GQA."""
    return preset_model("0.6b")


def test_compiled_and_analytic_flops_agree(small_real, record_property):
    point = grid_point(small_real, 1024, 300)
    for mode, report in point["modes"].items():
        record_property(f"compiled_vs_analytic_0.6b_1k_{mode}", report["compiled_vs_analytic_rel_err"])
        assert report["compiled_vs_analytic_rel_err"] < 0.05
    assert point["modes"]["gcc"]["chunk_reencodings"] == 1


def test_depth_extrapolation_equals_full_depth_compile(tiny_config):
    cfg = dataclasses.replace(tiny_config.model, decoder=dataclasses.replace(tiny_config.model.decoder, num_layers=3),
                              vision=dataclasses.replace(tiny_config.model.vision, num_layers=3))
    for name, size, extra in (("decode", 1, 40), ("insert", 4, 0), ("images", 24, 2)):
        fast = compiled_flops(cfg, name, 1, size, 37, extra)
        full = compiled_flops(cfg, name, 1, size, 37, extra, full_depth=True)
        assert fast == pytest.approx(full, rel=1e-3), name  # fusion decisions differ slightly


@pytest.mark.slow
def test_8b_prefill_flops_at_8k(record_property):
    cfg = preset_model("8b")
    gcc = mode_report(cfg, "gcc", 8192, 1)
    text = mode_report(cfg, "text", 8192, 1)
    ratio = gcc["flops_prefill_compiled"] / text["flops_prefill_compiled"]
    attended = gcc["flops_prefill_attended_analytic"] / text["flops_prefill_attended_analytic"]
    record_property("8b_prefill_gcc_over_text_compiled", ratio)
    record_property("8b_prefill_gcc_over_text_attended", attended)
    assert ratio <= 0.30 and attended <= 0.30
    assert gcc["compiled_vs_analytic_rel_err"] < 0.05 and text["compiled_vs_analytic_rel_err"] < 0.05


def test_bench_cli_writes_json_and_plot(tmp_path):
    from vist2_jax.cli.main import main
    out, png = tmp_path / "e.json", tmp_path / "e.png"
    assert main(["bench", "efficiency", "--preset", "tiny", "--prompt-tokens", "256", "--new-tokens", "64",
                 "--no-compile", "--json", str(out), "--plot", str(png)]) == 0
    import json
    report = json.loads(out.read_text())
    modes = report["presets"]["tiny"]["grid"][0]["modes"]
    assert set(modes) == {"gcc", "pcc", "text"} and png.stat().st_size > 1000


def test_generate_cli_streams_text(tmp_path, tiny_config, capsys):
    import orbax.checkpoint as ocp

    from data_pipelines.tokenizer import train_tokenizer
    from vist2_jax.cli.main import main
    from vist2_jax.model.vist2 import Vist2Model
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    train_tokenizer([corpus], 320, tmp_path / "tok")
    params = nn.unbox(jax.jit(Vist2Model(tiny_config.model).init)(jax.random.key(0),
                                                                  make_olm_batch(tiny_config.model)))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save((tmp_path / "ckpt").resolve(), params)
    ckpt.wait_until_finished()
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the quick brown fox jumps over the lazy dog " * 3)
    overrides = ["model.decoder.num_layers=2", "model.vision.num_layers=2", "model.decoder.vocab_size=512",
                 "model.layout.image_size=64", "model.layout.visual_len=4", "model.layout.text_len=8"]
    argv = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--prompt-file", str(prompt),
            "--tokenizer", str(tmp_path / "tok.model"), "--max-new-tokens", "12", "--mode", "gcc"]
    for o in overrides:
        argv += ["--override", o]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip()
