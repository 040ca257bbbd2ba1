"""Export to PyTorch: a run saved in the trainer's Orbax format is exported by ``vist2 export``
and run by the PyTorch runtime; logits and generations must match JAX (fp32, 1e-4),
transformers must load the parts as is, the runtime must import without JAX, and the
export must stream (peak RSS bounded by the largest stored tensor, not the model)."""

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch", reason="the torch extra is part of `make test`")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)  # tiny models: more threads only spin on a busy CPU box

from conftest import make_olm_batch  # noqa: E402
from data_pipelines.pipeline import resolve_tokenizer  # noqa: E402
from data_pipelines.render import RenderConfig, SketchRenderer  # noqa: E402
from vist2_jax.config import load_config  # noqa: E402
from vist2_jax.config.loader import to_dict  # noqa: E402
from vist2_jax.checkpointing.runs import resolve_run_dir  # noqa: E402
from vist2_jax.export.exporter import export_run  # noqa: E402
from data_pipelines.render import renderer_from_saved  # noqa: E402
from vist2_jax.export.torch_vist2 import TorchVist2  # noqa: E402
from vist2_jax.checkpointing.runs import load_run  # noqa: E402
from vist2_jax.inference.generate import Generator  # noqa: E402
from vist2_jax.inference.scoring import decoder_text_logits  # noqa: E402
from vist2_jax.model.vist2 import Vist2Model, abstract_params  # noqa: E402
from vist2_jax.checkpointing.checkpoints import RunCheckpoints, tokenizer_asset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
PROMPT = "It was the best of times, it was the worst of times, it was the age of wisdom."


def save_run(workdir: Path, config, states: dict, tokenizer) -> None:
    """A run dir as ``vist2 train`` writes it: config.yaml and, per step, the same Orbax
    items the trainer saves (params, opt_state, config, tokenizer, renderer)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    renderer = SketchRenderer(RenderConfig(image_size=config.model.layout.image_size,
                                           font_sizes=config.data.font_sizes)).renderer_config()
    checkpoints = RunCheckpoints(workdir, keep=10, async_save=False)
    for step, params in states.items():
        checkpoints.save(step, {"params": params, "opt_state": {"count": np.asarray(step, np.int32)}}, None,
                         to_dict(config), tokenizer_asset(tokenizer), renderer)
    checkpoints.close()


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_config):
    """A tiny run with checkpoints at steps 2 and 4, exported (newest) into small shards."""
    tmp = tmp_path_factory.mktemp("export")
    tokenizer = resolve_tokenizer(tiny_config, tmp)
    model = Vist2Model(tiny_config.model)
    params = jax.tree_util.tree_map(np.asarray, nn.unbox(jax.jit(model.init)(
        jax.random.key(0), make_olm_batch(tiny_config.model))))
    rng = np.random.default_rng(1)
    older = jax.tree_util.tree_map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype), params)
    save_run(tmp / "run", tiny_config, {2: older, 4: params}, tokenizer)
    result = export_run(tmp / "run", tmp / "out", max_shard_bytes=400_000)
    loaded = load_run(tmp / "run")
    config, restored, tokenizer, step = loaded.config, loaded.params, loaded.tokenizer, loaded.step
    saved = json.loads((tmp / "out" / "renderer.json").read_text())
    jax_renderer = renderer_from_saved(saved)  # the run's own font (bundled, matched by hash)
    return dict(tmp=tmp, config=config, params=restored, older=older, tokenizer=tokenizer, step=step,
                result=result, out=tmp / "out", torch=TorchVist2.load(tmp / "out"), renderer=jax_renderer)


def detokenizer(tokenizer):
    return lambda ids: tokenizer.decode([t for t in ids if t < tokenizer.vocab_size])


def test_export_folder_is_complete(run):
    out, result = run["out"], run["result"]
    assert result.step == run["step"] == 4
    vist2 = json.loads((out / "vist2_config.json").read_text())
    layout = run["config"].model.layout
    assert vist2["layout"] == {"text_len": layout.text_len, "visual_len": layout.visual_len,
                               "image_size": layout.image_size, "patch_size": layout.patch_size,
                               "merge": layout.merge, "visual_attends_past_visual": False}
    assert vist2["aligner"]["projector"] == run["config"].model.aligner.projector
    assert vist2["tokenizer"]["special_ids"]["chunk"] == run["tokenizer"].special_ids["chunk"]
    assert (out / vist2["tokenizer"]["file"]).read_bytes() == Path(run["tokenizer"].path).read_bytes()
    assert vist2["renderer"]["font_sha256"] == json.loads((out / "renderer.json").read_text())["font_sha256"]
    assert (out / "decoder" / "model.safetensors.index.json").is_file()  # sharded above the limit
    readme = (out / "README.md").read_text()
    assert str(run["tmp"] / "run") in readme and "step 4" in readme and vist2["source"]["git_commit"] in readme
    # the runtime's sketches are the run's: same settings, same font bytes
    ids = run["tokenizer"].encode(PROMPT)[:8]
    np.testing.assert_array_equal(run["torch"].try_render(ids), run["renderer"].render(run["tokenizer"].decode(ids)))


def test_interleaved_row_logits_match_jax(run, record_property):
    config = run["config"].model
    batch = make_olm_batch(config, chunk_counts=((4,), (2, 1, 2)), seq_len=112, num_slots=4, seed=3)
    ref = np.asarray(jax.jit(Vist2Model(config).apply)(run["params"], batch)["logits"])
    ours = run["torch"].forward_rows(batch).numpy()
    err = float(np.abs(ours - ref).max())
    record_property("export: torch vs jax row logits max abs err", err)
    assert err < TOL


def test_siglip2_tanh_aligner_and_visual_past_visual(run, record_property):
    """The other options of a run: SigLIP2 tower layout, the paper's tanh aligner, and
    visual tokens reading earlier chunks' visual tokens."""
    tmp = run["tmp"]
    config = load_config(overrides=[
        "model.decoder.num_layers=2", "model.vision.num_layers=2", "model.decoder.vocab_size=512",
        "model.layout.image_size=64", "model.layout.visual_len=4", "model.layout.text_len=8",
        "model.aligner.projector=tanh", "model.layout.visual_attends_past_visual=true"])
    batch = make_olm_batch(config.model, chunk_counts=((4,), (2, 2)), seq_len=112, seed=5)
    model = Vist2Model(config.model)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), batch))
    save_run(tmp / "run_tanh", config, {1: jax.tree_util.tree_map(np.asarray, params)}, run["tokenizer"])
    export_run(tmp / "run_tanh", tmp / "out_tanh", vision="siglip2")
    exported = TorchVist2.load(tmp / "out_tanh")
    assert isinstance(exported.vision, transformers.Siglip2VisionModel)
    ref = np.asarray(jax.jit(model.apply)(params, batch)["logits"])
    err = float(np.abs(exported.forward_rows(batch).numpy() - ref).max())
    record_property("export: siglip2 + tanh + visual_attends_past_visual row logits max abs err", err)
    assert err < TOL


@pytest.mark.parametrize("mode,new", [("gcc", 64), ("pcc", 20), ("text", 20)])
def test_greedy_generation_matches_jax(run, mode, new, record_property):
    config, tokenizer = run["config"].model, run["tokenizer"]
    prompt = tokenizer.encode(PROMPT)[:13]
    gen = Generator(config, run["params"], render_fn=run["renderer"].render, detokenize=detokenizer(tokenizer),
                    chunk_token=tokenizer.special_ids["chunk"])
    ref = gen.generate([prompt], mode, new, record_logits=True)
    tokens, logits = run["torch"].generate([prompt], mode, new, record_logits=True)
    agree = sum(a == b for a, b in zip(tokens[0], ref.tokens[0]))
    steps = min(len(logits[0]), ref.logits.shape[1])
    err = float(np.abs(logits[0][:steps] - ref.logits[0, :steps]).max())
    record_property(f"export: {mode} greedy tokens equal (of {new})", agree)
    record_property(f"export: {mode} generation logits max abs err", err)
    assert tokens[0] == ref.tokens[0] and len(tokens[0]) == new
    assert err < TOL


class CappedRenderer:
    """The run's renderer, refusing (like a full sketch) any text of more than ``cap`` tokens."""

    def __init__(self, inner, tokenizer, cap):
        self.inner, self.tokenizer, self.cap = inner, tokenizer, cap

    def render(self, text, **kwargs):
        from data_pipelines.render import RenderRejected

        if len(self.tokenizer.encode(text)) > self.cap:
            raise RenderRejected(f"more than {self.cap} tokens")
        return self.inner.render(text, **kwargs)

    def try_render(self, text, **kwargs):
        from data_pipelines.render import RenderRejected

        try:
            return self.render(text, **kwargs)
        except RenderRejected:
            return None


def test_chunks_closed_early_generate_the_same_in_jax_and_pytorch(run, monkeypatch, record_property):
    """With a renderer that takes fewer than L tokens, both runtimes close chunks by the chunk
    rule at the same tokens and re-predict the same way: identical greedy tokens."""
    config, tokenizer = run["config"].model, run["tokenizer"]
    capped = CappedRenderer(run["renderer"], tokenizer, cap=config.layout.text_len // 2)
    prompt = tokenizer.encode(PROMPT)[:13]
    gen = Generator(config, run["params"], render_fn=capped.render, detokenize=detokenizer(tokenizer),
                    chunk_token=tokenizer.special_ids["chunk"])
    ref = gen.generate([prompt], "gcc", 40, record_logits=True)
    monkeypatch.setattr(run["torch"], "renderer", capped)
    tokens, logits = run["torch"].generate([prompt], "gcc", 40, record_logits=True)
    err = float(np.abs(np.stack(logits[0]) - ref.logits[0]).max())
    record_property("export: gcc with early-closed chunks, logits max abs err", err)
    assert ref.layout.visual_chunks > (13 + 40) // config.layout.text_len + 1  # more chunks than full ones
    assert tokens[0] == ref.tokens[0] and err < TOL


def test_transformers_loads_decoder_and_text_logits_match(run, record_property):
    hf = transformers.Qwen3ForCausalLM.from_pretrained(run["out"] / "decoder").eval()
    tokens = np.random.default_rng(4).integers(0, run["config"].model.decoder.vocab_size, (2, 40)).astype(np.int32)
    with torch.no_grad():
        ours = hf(torch.from_numpy(tokens).long()).logits.numpy()
    decoder = {"params": run["params"]["params"]["decoder"]}
    ref = np.asarray(jax.jit(decoder_text_logits, static_argnums=0)(run["config"].model, decoder, tokens))
    err = float(np.abs(ours - ref).max())
    record_property("export: transformers Qwen3 text logits vs jax max abs err", err)
    assert err < TOL


def test_runtime_imports_and_generates_with_jax_blocked(run):
    prompt = run["tokenizer"].encode(PROMPT)[:13]
    code = ("import json, sys\n"
            "for name in ('jax', 'jaxlib', 'flax', 'orbax', 'optax'):\n"
            "    sys.modules[name] = None  # any import of them now raises\n"
            "from vist2_jax.export.torch_vist2 import TorchVist2\n"
            f"model = TorchVist2.load({str(run['out'])!r})\n"
            f"print(json.dumps(model.generate([{prompt!r}], 'gcc', 12)))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == run["torch"].generate([prompt], "gcc", 12)


def test_generate_cli_torch(run, tmp_path, capsys):
    from vist2_jax.cli.main import main

    (tmp_path / "prompt.txt").write_text(PROMPT)
    assert main(["generate", "--torch", str(run["out"]), "--prompt-file", str(tmp_path / "prompt.txt"),
                 "--mode", "gcc", "--max-new-tokens", "10"]) == 0
    ids = run["tokenizer"].encode(PROMPT)
    want = run["torch"].detokenize(run["torch"].generate([ids], "gcc", 10)[0])
    assert capsys.readouterr().out == want + "\n"


def test_export_cli_step_dtype_and_fallback(run, tmp_path, caplog):
    """--step picks an older checkpoint (bf16 weights); a damaged newest checkpoint is
    reported and the previous readable one exported; a non-empty --out is refused."""
    out = tmp_path / "bf16"
    proc = subprocess.run([sys.executable, "-m", "vist2_jax.cli.main", "export", str(run["tmp"] / "run"),
                           "--out", str(out), "--step", "2", "--dtype", "bfloat16"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["step"] == 2
    model = TorchVist2.load(out)
    assert model.dtype == torch.bfloat16
    embedding = model.lm.model.embed_tokens.weight.detach().float().numpy()
    want = run["older"]["params"]["decoder"]["embedding"]
    np.testing.assert_allclose(embedding, want, rtol=1e-2, atol=1e-6)  # bf16 rounding of step 2's weights
    assert not np.allclose(embedding, run["params"]["params"]["decoder"]["embedding"], atol=1e-3)

    damaged = tmp_path / "damaged"
    subprocess.run(["cp", "-r", str(run["tmp"] / "run"), str(damaged)], check=True)
    for data in (damaged / "checkpoints" / "4" / "params").rglob("d/*"):
        data.write_bytes(b"garbage")
    with caplog.at_level(logging.ERROR, logger="vist2_jax.export.exporter"):
        result = export_run(damaged, tmp_path / "fallback")
    assert result.step == 2 and "checkpoint step 4" in caplog.text and "unreadable" in caplog.text
    assert not (tmp_path / ".fallback.partial").exists()
    proc = subprocess.run([sys.executable, "-m", "vist2_jax.cli.main", "export", str(damaged), "--out",
                           str(tmp_path / "explicit"), "--step", "4"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.startswith("vist2 export: error: --step 4:")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "explicit").exists()
    proc = subprocess.run([sys.executable, "-m", "vist2_jax.cli.main", "export", str(damaged), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "not an empty folder" in proc.stderr


def upload_folder(local: Path, remote: str) -> None:
    """An object-store copy of a local folder (a run dir): every file uploaded by its path."""
    from vist2_jax import storage

    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        storage.upload(file, f"{remote}/{file.relative_to(local).as_posix()}")


def download_folder(remote, local: Path) -> list[str]:
    """A local copy of a remote folder; returns the relative file names."""
    prefix, names = os.fspath(remote).split("://", 1)[-1].rstrip("/"), []
    for folder, _, files in remote.walk():  # folders come back without the scheme
        for name in files:
            names.append(f"{os.fspath(folder).split('://', 1)[-1][len(prefix):].strip('/')}/{name}".lstrip("/"))
    for name in names:
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes((remote / name).read_bytes())
    return sorted(names)


def test_export_from_and_to_a_bucket(run, tmp_path, gcs_bucket, monkeypatch, capsys):
    """A run on gs:// (a Cloud Storage emulator) exported to a gs:// --out holds the same files
    as the local export of that run (tensors, configs, tokenizer, font), which the PyTorch
    runtime loads; the local staging folder is removed; a non-empty gs:// --out is refused."""
    from safetensors.numpy import load_file

    from vist2_jax import storage
    from vist2_jax.cli.main import main

    run_url = f"{gcs_bucket}/export/{tmp_path.name}/run"
    upload_folder(run["tmp"] / "run", run_url)
    out = storage.as_path(f"{gcs_bucket}/export/{tmp_path.name}/out")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the export is staged
    result = export_run(run_url, out, max_shard_bytes=400_000)
    assert result.step == 4 and str(result.out) == str(out)
    assert list(tmp_path.iterdir()) == []  # staging folder removed

    local, reference = tmp_path / "downloaded", run["out"]
    names = download_folder(out, local)
    assert names == sorted(p.relative_to(reference).as_posix() for p in reference.rglob("*") if p.is_file())
    for name in names:
        if name.endswith(".safetensors"):
            ours, want = load_file(local / name), load_file(reference / name)
            assert list(ours) == list(want)
            for key in want:
                np.testing.assert_array_equal(ours[key], want[key])
        elif name == "vist2_config.json":  # equal but for where and when it was exported
            ours, want = json.loads((local / name).read_text()), json.loads((reference / name).read_text())
            assert ours.pop("source")["run_dir"] == run_url
            want.pop("source")
            assert ours == want
        elif name.endswith(".json"):
            assert json.loads((local / name).read_text()) == json.loads((reference / name).read_text())
        elif name != "README.md":  # tokenizer, font and its licence
            assert (local / name).read_bytes() == (reference / name).read_bytes()
    assert run_url in (local / "README.md").read_text()
    prompt = run["tokenizer"].encode(PROMPT)[:13]
    assert TorchVist2.load(local).generate([prompt], "gcc", 12) == run["torch"].generate([prompt], "gcc", 12)

    # a non-empty gs:// --out: one line, exit code 2, nothing written
    capsys.readouterr()
    assert main(["export", run_url, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == f"vist2 export: error: --out: {out} exists and is not an empty folder\n"
    assert download_folder(out, tmp_path / "after") == names

    # an upload failing half-way: the objects already uploaded are deleted, staging removed
    failing = storage.as_path(f"{gcs_bucket}/export/{tmp_path.name}/failing")
    calls, real_upload = [], storage.upload

    def upload(local_file, destination):
        if len(calls) == 3:
            raise OSError("connection reset")
        calls.append(real_upload(local_file, destination))
        assert calls[-1].exists()
        return calls[-1]

    monkeypatch.setattr("vist2_jax.export.exporter.storage.upload", upload)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "staging"))
    (tmp_path / "staging").mkdir()
    with pytest.raises(OSError, match="connection reset"):
        export_run(f"{run_url}/checkpoints/2", failing)  # a step folder on the bucket
    assert len(calls) == 3 and not any(target.exists() for target in calls)
    assert not failing.exists() and list((tmp_path / "staging").iterdir()) == []


def test_demo_dir_resolves_to_its_last_stage(run, tmp_path):
    for stage in ("stage2_ocr", "stage4_sft", "stage3_olm"):
        (tmp_path / stage).symlink_to(run["tmp"] / "run")
    assert resolve_run_dir(tmp_path)[0].name == "stage4_sft"
    assert resolve_run_dir(tmp_path / "stage3_olm")[0].name == "stage3_olm"


@pytest.mark.parametrize("vapv", [False, True])
def test_torch_mask_equals_the_jax_reference(tiny_config, vapv):
    from vist2_jax.export.torch_mask import Meta, vision_memory_mask as torch_mask
    from vist2_jax.kernels.mask import RowMeta, vision_memory_mask

    batch = make_olm_batch(tiny_config.model, chunk_counts=((4,), (2, 1, 2)), seq_len=112, seed=7)
    ref = np.asarray(vision_memory_mask(RowMeta.from_batch(batch), vapv))
    ours = torch_mask(Meta.from_batch(batch), Meta.from_batch(batch), vapv, self_attention=True).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert 0 < ref.mean() < 0.5  # a real mask: neither empty nor causal-dense
    half = {k: v[:, 40:] for k, v in batch.items() if v.ndim == 2}  # queries over a cache of the whole row
    ref = np.asarray(vision_memory_mask(RowMeta.from_batch(half), vapv, kv_meta=RowMeta.from_batch(batch)))
    np.testing.assert_array_equal(torch_mask(Meta.from_batch(half), Meta.from_batch(batch), vapv).numpy(), ref)


@pytest.mark.parametrize("config", [
    dict(), dict(repetition_penalty=1.5), dict(no_repeat_ngram=1), dict(no_repeat_ngram=2),
    dict(no_repeat_ngram=3, repetition_penalty=0.8), dict(temperature=0.7, top_k=1),
    dict(temperature=1.0, top_p=1e-3, repetition_penalty=1.3)], ids=str)
def test_torch_sampling_follows_the_jax_rules(config):
    """Deterministic configurations (greedy, or filters leaving one token) pick what JAX picks."""
    from vist2_jax.export import torch_sampling
    from vist2_jax.inference import sampling

    rng = np.random.default_rng(0)
    for trial in range(20):
        logits = rng.standard_normal((1, 24)).astype(np.float32)
        history = rng.integers(0, 6 if trial % 2 else 24, 12).astype(np.int32)  # often repeating
        want = int(sampling.sample(logits, history[None], np.array([12], np.int32), jax.random.key(trial),
                                   sampling.SamplingConfig(**config))[0])
        got = torch_sampling.sample(torch.from_numpy(logits[0]), history.tolist(),
                                    torch_sampling.SamplingConfig(**config), torch.Generator().manual_seed(0))
        assert got == want


def test_torch_sampling_filters_keep_the_jax_support():
    from vist2_jax.export.torch_sampling import SamplingConfig, sample

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    gen = torch.Generator().manual_seed(0)
    assert {sample(logits, [], SamplingConfig(temperature=1.0, top_p=0.7), gen) for _ in range(64)} == {0, 1}
    assert {sample(logits, [], SamplingConfig(temperature=1.0, top_k=3), gen) for _ in range(200)} == {0, 1, 2}


@pytest.mark.parametrize("ocdbt,zarr3", [(True, False), (True, True), (False, False)])
def test_reader_storage_formats_and_sharded_chunks(tmp_path, ocdbt, zarr3):
    """The leaf reader handles OCDBT or plain files, zarr v2 or v3, and a stacked leaf saved
    from 8 devices (one stored chunk per layer) is read block by block, each block once."""
    import orbax.checkpoint as ocp

    from vist2_jax.export.orbax_reader import OrbaxParams

    mesh = jax.make_mesh((8,), ("layers",))
    stacked = np.arange(8 * 3 * 4, dtype=np.float32).reshape(8, 3, 4)
    sharded = jax.device_put(stacked, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("layers")))
    tree = {"params": {"stacked": sharded, "bias": {"b": np.ones(5, np.float32)}}}
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=ocdbt, use_zarr3=zarr3))
    checkpointer.save(tmp_path / "item", args=ocp.args.PyTreeSave(tree))
    reader = OrbaxParams(tmp_path / "item")
    assert sorted(reader.paths) == [("params", "bias", "b"), ("params", "stacked")]
    blocks = list(reader.layer_blocks(("params", "stacked")))
    assert [start for start, _ in blocks] == list(range(8))
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), stacked)
    np.testing.assert_array_equal(reader.read(("params", "bias", "b")), np.ones(5, np.float32))
    with pytest.raises(KeyError, match="params/missing"):
        reader.array(("params", "missing"))


MEASURE = """
import json, resource, sys
from vist2_jax.export.exporter import export_run
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = export_run(sys.argv[1], sys.argv[2], dtype="bfloat16", max_shard_bytes=64 * 2**20)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_delta": (peak - base) * 1024, "largest": result.largest_tensor_bytes,
                  "checkpoint": result.checkpoint_bytes}))
"""


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_export_streams_with_bounded_peak_rss(tmp_path, run, scan, record_property):
    """A ~240 MB checkpoint exports with a peak RSS rise (ru_maxrss after the export minus
    after the imports, in a fresh process) under 3x its largest stored tensor + 48 MiB."""
    config = load_config(overrides=[
        "model.decoder.num_layers=8", "model.decoder.hidden_size=512", "model.decoder.num_heads=8",
        "model.decoder.num_kv_heads=4", "model.decoder.head_dim=64", "model.decoder.intermediate_size=1536",
        "model.decoder.vocab_size=8192", "model.decoder.tie_embeddings=false", "model.vision.num_layers=8",
        "model.vision.hidden_size=512", "model.vision.num_heads=8", "model.vision.mlp_dim=2048",
        "model.layout.image_size=64", "model.layout.visual_len=4", "model.layout.text_len=8",
        f"model.scan_layers={str(scan).lower()}"])
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: 0.02 * rng.standard_normal(s.shape, dtype=np.float32),
                                    nn.unbox(abstract_params(config.model)))
    save_run(tmp_path / "big", config, {1: params}, run["tokenizer"])
    del params
    # Through a shell that forks: a process started straight from pytest keeps pytest's
    # ru_maxrss across exec, which would hide the export's own peak.
    proc = subprocess.run(["sh", "-c", '"$0" -c "$1" "$2" "$3"; exit $?', sys.executable, MEASURE,
                           str(tmp_path / "big"), str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    bound = 3 * m["largest"] + 48 * 2**20
    record_property(f"export peak RSS rise MiB ({'scanned' if scan else 'unrolled'}; checkpoint "
                    f"{m['checkpoint'] / 2**20:.0f} MiB, largest tensor {m['largest'] / 2**20:.0f} MiB)",
                    m["peak_delta"] / 2**20)
    assert m["checkpoint"] > 200 * 2**20 and m["checkpoint"] > bound  # loading it whole would fail the bound
    assert m["peak_delta"] < bound
    assert transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "out" / "decoder").num_parameters() == \
        sum(x.size for x in jax.tree_util.tree_leaves(nn.unbox(abstract_params(config.model))["params"]["decoder"]))
