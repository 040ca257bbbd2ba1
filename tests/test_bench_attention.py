"""``vist2 bench attention`` on CPU at a tiny size: the JSON report's fields, block figures
equal to ``bench mask``'s, timed CPU paths, and the Pallas kernels reported as not timed."""

import json

import pytest

from vist2_jax.bench import attention as bench_attention
from vist2_jax.bench import mask as bench_mask
from vist2_jax.cli.main import main

ARGS = ["bench", "attention", "--text-len", "8", "--visual-len", "4", "--heads", "4",
        "--kv-heads", "2", "--head-dim", "16", "--block", "16", "32", "--repeats", "2"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "attention.json"
    assert main(ARGS + ["--seq-len", "96", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_report_fields_and_timings(report):
    assert report["platform"] == "cpu" and report["heads"] == 4 and report["kv_heads"] == 2
    [case] = report["cases"]
    assert case["baseline"]["impl"] == "causal xla"
    assert case["baseline"]["fwd_ms"] > 0 and case["baseline"]["fwd_bwd_ms"] > 0
    assert [r["impl"] for r in case["results"]] == ["xla_chunked", "dense"]
    for r in case["results"]:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["bound_block"] == 16
        for key in ("fwd", "fwd_bwd"):
            over = r[f"{key}_ms"] / case["baseline"][f"{key}_ms"]
            assert r[f"{key}_over_causal"] == pytest.approx(over)
            assert r[f"{key}_over_bound"] == pytest.approx(over / r["density_bound"])
    skipped = {(n["impl"], n["block"]) for n in case["not_timed"]}
    assert skipped == {("pallas_tpu/pallas_gpu", 16), ("pallas_tpu/pallas_gpu", 32)}
    assert all("interpret mode" in n["reason"] for n in case["not_timed"])


def test_block_figures_equal_bench_mask(report):
    [case] = report["cases"]
    for block in (16, 32):
        assert case["blocks"][str(block)] == bench_mask.bench(96, 8, 4, block)["visual_first"]
    smallest = case["blocks"]["16"]["visited_fraction_of_causal"]
    assert smallest < 1  # the bound means something at this size
    assert all(r["density_bound"] == smallest for r in case["results"])


def test_long_cases_are_not_timed_on_cpu(monkeypatch, capsys):
    monkeypatch.setattr(bench_attention, "CPU_MAX_SEQ", 64)
    assert main(ARGS + ["--seq-len", "96"]) == 0
    out = capsys.readouterr().out
    assert "block 16: visits" in out
    assert "not timed: causal xla: S > 64 is not timed on CPU" in out
    assert "fwd ms" not in out


def test_gpu_implementations_lower_for_cuda():
    """What the bench times on a GPU (the Triton kernel at blocks 64 and 128, xla_chunked,
    dense), forward+backward, lowers for ``cuda`` from this CPU. (The cuDNN baseline needs
    a GPU to lower.)"""
    import jax
    import jax.numpy as jnp
    from jax import export

    from vist2_jax.kernels.mask import RowMeta
    from vist2_jax.kernels.pallas_gpu import gpu_lowering_target

    run, _, (baseline, _) = bench_attention.implementations("gpu", (64, 128), False, True)
    assert [(name, block) for name, block, *_ in run] == [
        ("pallas_gpu", 64), ("pallas_gpu", 128), ("xla_chunked", None), ("dense", None)]
    assert baseline == "causal cudnn"
    spec = jax.ShapeDtypeStruct
    args = (spec((1, 256, 4, 64), jnp.bfloat16), spec((1, 256, 2, 64), jnp.bfloat16),
            spec((1, 256, 2, 64), jnp.bfloat16),
            RowMeta(spec((1, 256), jnp.int8), *[spec((1, 256), jnp.int32)] * 3))
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for name, block, fn, _ in run:
        grad = jax.jit(jax.grad(lambda q, k, v, m, fn=fn: jnp.sum(fn(q, k, v, m).astype(jnp.float32)),
                                argnums=(0, 1, 2)))
        with gpu_lowering_target():
            text = export.export(grad, platforms=["cuda"], disabled_checks=checks)(*args).mlir_module()
        assert text.count("__gpu$xla.gpu.triton") == (3 if name == "pallas_gpu" else 0), (name, block)
