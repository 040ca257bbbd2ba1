"""Parameter counts: the decoder of every preset against transformers' Qwen3 built on the
meta device from the published configs, and the ``vist2 params`` command."""

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="the torch extra is part of `make test`")
transformers = pytest.importorskip("transformers")

from vist2_jax.config import load_config  # noqa: E402
from vist2_jax.model.vist2 import param_counts  # noqa: E402

# Published Qwen3 configs (hidden, layers, heads, kv heads, intermediate, tied).
PUBLISHED = {
    "0.6b": (1024, 28, 16, 8, 3072, True),
    "1.7b": (2048, 28, 16, 8, 6144, True),
    "4b": (2560, 36, 32, 8, 9728, True),
    "8b": (4096, 36, 32, 8, 12288, False),
}


def transformers_count(hidden, layers, heads, kv_heads, intermediate, tied):
    config = transformers.Qwen3Config(
        vocab_size=151936, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=128, intermediate_size=intermediate,
        tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    with torch.device("meta"):
        model = transformers.Qwen3ForCausalLM(config)
    return sum(p.numel() for p in model.parameters())  # tied weights counted once


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_decoder_counts_match_transformers(preset, record_property):
    ours = param_counts(load_config(preset=preset).model)
    reference = transformers_count(*PUBLISHED[preset])
    record_property(f"{preset} decoder params (ours = transformers)", ours["decoder"])
    assert ours["decoder"] == reference
    assert ours["total"] == ours["vision"] + ours["aligner"] + ours["decoder"]


def test_vit_l16_tower_count():
    ours = param_counts(load_config(preset="0.6b").model)
    hidden, mlp, layers, patches = 1024, 4096, 24, 256
    per_layer = 4 * (hidden * hidden + hidden) + 2 * hidden * mlp + mlp + hidden + 4 * hidden
    embeddings = 16 * 16 * 3 * hidden + hidden + patches * hidden
    assert ours["vision"] == layers * per_layer + embeddings + 2 * hidden


def test_params_cli_prints_json():
    proc = subprocess.run([sys.executable, "-m", "vist2_jax.cli.main", "params", "--preset", "8b"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["preset"] == "8b"
    assert report["decoder"] == transformers_count(*PUBLISHED["8b"])
    assert set(report) >= {"vision", "aligner", "decoder", "total"}
