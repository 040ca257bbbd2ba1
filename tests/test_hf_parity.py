"""Parity with the Hugging Face reference: tiny random models built with transformers,
saved as safetensors, loaded through our declarative mapping tables."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the torch extra is part of `make test`")
transformers = pytest.importorskip("transformers")

from vist2_jax.config import ModelConfig  # noqa: E402
from vist2_jax.config.schema import LayoutConfig, VisionConfig  # noqa: E402
from vist2_jax.convert.hf_mapping import (QWEN3_DECODER, SIGLIP2_VISION, SIGLIP_VISION,  # noqa: E402
                                          export_hf, import_hf)
from vist2_jax.convert.safetensors_io import read_checkpoint_dir  # noqa: E402
from vist2_jax.convert.hf_weights import load_hf_decoder  # noqa: E402
from vist2_jax.inference.scoring import decoder_text_logits  # noqa: E402
from vist2_jax.model.vision import VisionTower  # noqa: E402

TOL = 1e-4


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def tiny_qwen3(tmp_path_factory, tied):
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,  # head_dim != hidden/heads
        rms_norm_eps=1e-6, tie_word_embeddings=tied, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    model = transformers.Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # norms start at 1; randomise them so the mapping of each is tested
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    path = tmp_path_factory.mktemp(f"qwen3_tied{tied}")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def qwen3(request, tmp_path_factory):
    return tiny_qwen3(tmp_path_factory, request.param)


TOKENS = np.random.default_rng(0).integers(0, 512, size=(2, 48)).astype(np.int32)


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens).long()).logits.numpy()


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "unrolled"])
def test_qwen3_decoder_logits_match_transformers(qwen3, scan, record_property):
    model, path = qwen3
    config, params = load_hf_decoder(path)
    config = dataclasses.replace(config, scan_layers=scan)
    if not scan:
        tree = import_hf(QWEN3_DECODER, read_checkpoint_dir(path), config)
        params = {"params": tree["params"]["decoder"]}
    ours = jax.jit(decoder_text_logits, static_argnums=0)(config, params, TOKENS)
    err = rel_err(ours, hf_logits(model, TOKENS))
    record_property(f"qwen3 logits max rel err (tied={config.decoder.tie_embeddings}, scan={scan})", err)
    assert err < TOL


def test_qwen3_export_round_trip_into_transformers(qwen3, record_property):
    model, path = qwen3
    config, params = load_hf_decoder(path)
    rng = np.random.default_rng(1)
    noisy = jax.tree_util.tree_map(lambda x: np.asarray(x) + 0.01 * rng.standard_normal(x.shape).astype(np.float32),
                                   params)
    tensors = export_hf(QWEN3_DECODER, {"params": {"decoder": noisy["params"]}}, config)
    fresh = transformers.Qwen3ForCausalLM(model.config).eval()
    missing, unexpected = fresh.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()},
                                                strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"} and (config.decoder.tie_embeddings or not missing)
    ours = jax.jit(decoder_text_logits, static_argnums=0)(config, noisy, TOKENS)
    err = rel_err(ours, hf_logits(fresh, TOKENS))
    record_property(f"qwen3 export round trip max rel err (tied={config.decoder.tie_embeddings})", err)
    assert err < TOL


def test_score_cli_matches_transformers_logprobs(qwen3, tmp_path):
    model, path = qwen3
    ids = TOKENS[0, :20].tolist()
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids)))
    proc = subprocess.run([sys.executable, "-m", "vist2_jax.cli.main", "score", "--hf-decoder", str(path),
                           "--token-ids-file", str(tmp_path / "ids.txt")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    logits = torch.from_numpy(hf_logits(model, np.asarray([ids], np.int32))[0])
    want = torch.log_softmax(logits, -1)[torch.arange(19), torch.tensor(ids[1:])].numpy()
    assert report["logprobs"][0] is None
    np.testing.assert_allclose(report["logprobs"][1:], want, rtol=1e-4, atol=1e-4)
    assert report["total_logprob"] == pytest.approx(float(want.sum()), rel=1e-4)


def test_score_cli_bad_inputs(qwen3, tmp_path):
    _, path = qwen3
    (tmp_path / "bad.txt").write_text("1 2 banana")
    (tmp_path / "big.txt").write_text("1 2 99999")
    for name, words in [("bad.txt", "does not hold integer"), ("big.txt", "must lie in"),
                        ("absent.txt", "no such file")]:
        proc = subprocess.run([sys.executable, "-m", "vist2_jax.cli.main", "score", "--hf-decoder", str(path),
                               "--token-ids-file", str(tmp_path / name)], capture_output=True, text=True)
        assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def our_vision_config():
    return ModelConfig(vision=VisionConfig(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128),
                       layout=LayoutConfig(text_len=8, visual_len=4, image_size=64, patch_size=16, merge=2),
                       dtype="float32")


def randomise_norms(model):
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))


PIXELS = np.random.default_rng(2).uniform(-1, 1, size=(2, 64, 64, 3)).astype(np.float32)


def test_siglip_vision_features_match_transformers(tmp_path, record_property):
    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(image_size=64, **VISION)).eval()
    randomise_norms(hf)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    config = our_vision_config()
    tensors = read_checkpoint_dir(tmp_path)
    params = {"params": import_hf(SIGLIP_VISION, tensors, config)["params"]["vision"]}
    # A full SiglipModel checkpoint prefixes the tower with ``vision_model.`` and adds a text tower.
    full = {f"vision_model.{k}": v for k, v in tensors.items()} | {"text_model.x.weight": np.zeros(2)}
    jax.tree_util.tree_map(np.testing.assert_array_equal, import_hf(SIGLIP_VISION, full, config),
                           {"params": {"vision": params["params"]}})
    ours = jax.jit(VisionTower(config).apply)(params, PIXELS)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(PIXELS).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    err = rel_err(ours, ref)
    record_property("siglip vision features max rel err", err)
    assert err < TOL


def test_siglip2_vision_features_match_transformers(tmp_path, record_property):
    torch.manual_seed(0)
    hf = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(num_patches=16, **VISION)).eval()
    randomise_norms(hf)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    config = our_vision_config()
    params = {"params": import_hf(SIGLIP2_VISION, read_checkpoint_dir(tmp_path), config)["params"]["vision"]}
    ours = jax.jit(VisionTower(config).apply)(params, PIXELS)
    # NaFlex input: patches flattened in (row, col, channel) order, 4x4 grid, all valid.
    patches = PIXELS.reshape(2, 4, 16, 4, 16, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 16 * 16 * 3)
    with torch.no_grad():
        ref = hf(pixel_values=torch.from_numpy(patches), pixel_attention_mask=torch.ones(2, 16, dtype=torch.long),
                 spatial_shapes=torch.tensor([[4, 4], [4, 4]])).last_hidden_state.numpy()
    err = rel_err(ours, ref)
    record_property("siglip2 vision features max rel err", err)
    assert err < TOL


def test_mapping_reports_missing_and_unknown_tensors(qwen3):
    _, path = qwen3
    config, _ = load_hf_decoder(path)
    tensors = dict(read_checkpoint_dir(path))
    extra = dict(tensors, **{"model.layers.0.self_attn.rogue.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="rogue"):
        import_hf(QWEN3_DECODER, extra, config)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        import_hf(QWEN3_DECODER, tensors, config)
