"""Export to PyTorch: a run saved in the trainer's Orbax format is exported by ``vist2 export``
as a Hugging Face model folder whose remote code is the project's PyTorch runtime; logits and
generations (transformers' ``generate``, batched, gcc / pcc / text) must match JAX (fp32,
1e-4), the Auto classes must load it with JAX and this project blocked, and the export must
stream (peak RSS bounded by the largest stored tensor, not the model)."""

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
from data_pipelines.render import RenderConfig, SketchRenderer, render_config_for  # noqa: E402
from vist2_jax.config import load_config  # noqa: E402
from vist2_jax.config.loader import to_dict  # noqa: E402
from vist2_jax.checkpointing.runs import resolve_run_dir  # noqa: E402
from vist2_jax.export.exporter import export_run  # noqa: E402
from data_pipelines.render import renderer_from_saved  # noqa: E402
from vist2_jax.export.modeling_vist2 import Vist2ForCausalLM  # noqa: E402
from vist2_jax.export.tokenization_vist2 import Vist2Tokenizer  # noqa: E402
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
    renderer = SketchRenderer(render_config_for(config.data, config.model.layout.image_size)).renderer_config()
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
                result=result, out=tmp / "out", torch=load(tmp / "out"), renderer=jax_renderer,
                hf_tokenizer=Vist2Tokenizer.from_pretrained(tmp / "out"))


def load(folder):
    return Vist2ForCausalLM.from_pretrained(folder).eval()


def jax_generator(run, renderer=None):
    tokenizer = run["tokenizer"]
    return Generator(run["config"].model, run["params"], render_fn=(renderer or run["renderer"]).render,
                     detokenize=detokenizer(tokenizer), chunk_token=tokenizer.special_ids["chunk"])


def hf_generate(model, tokenizer, prompts, new, **kwargs):
    """transformers' generate on left-padded token-id prompts: (new ids per row, the output)."""
    batch = tokenizer.pad({"input_ids": [list(p) for p in prompts]}, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=new, return_dict_in_generate=True, output_logits=True, **kwargs)
    width = batch["input_ids"].shape[1]
    return [row[width:].tolist() for row in out.sequences], out


def detokenizer(tokenizer):
    return lambda ids: tokenizer.decode([t for t in ids if t < tokenizer.vocab_size])


def test_export_folder_is_a_hf_model(run):
    out, result = run["out"], run["result"]
    assert result.step == run["step"] == 4
    config = json.loads((out / "config.json").read_text())
    layout = run["config"].model.layout
    assert config["model_type"] == "vist2" and config["auto_map"] == {
        "AutoConfig": "configuration_vist2.Vist2Config", "AutoModelForCausalLM": "modeling_vist2.Vist2ForCausalLM"}
    assert config["layout"] == {"text_len": layout.text_len, "visual_len": layout.visual_len,
                                "image_size": layout.image_size, "patch_size": layout.patch_size,
                                "merge": layout.merge, "visual_attends_past_visual": False, "visual_stride": 1}
    assert config["projector"] == run["config"].model.aligner.projector
    assert config["special_ids"]["chunk"] == run["tokenizer"].special_ids["chunk"]
    assert (out / config["tokenizer_file"]).read_bytes() == Path(run["tokenizer"].path).read_bytes()
    assert config["font_sha256"] == json.loads((out / "renderer.json").read_text())["font_sha256"]
    index = json.loads((out / "model.safetensors.index.json").read_text())  # sharded above the limit
    assert {name.split(".")[0] for name in index["weight_map"]} == {"language_model", "vision_model", "aligner"}
    assert json.loads((out / "tokenizer_config.json").read_text())["auto_map"]["AutoTokenizer"][0] == \
        "tokenization_vist2.Vist2Tokenizer"
    assert json.loads((out / "generation_config.json").read_text())["mode"] == "gcc"
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
    assert "license" in front and "vist2" in front["tags"] and "base_model" not in front  # random init
    assert str(run["tmp"] / "run") in card and "step 4" in card and config["source"]["git_commit"] in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "lm_eval" in card
    # the runtime's sketches are the run's: same settings, same font bytes
    ids = run["tokenizer"].encode(PROMPT)[:8]
    np.testing.assert_array_equal(run["torch"].try_render(ids), run["renderer"].render(run["tokenizer"].decode(ids)))
    # the transformers tokenizer is the run's: same ids, specials in raw text stay text
    text = PROMPT + " <|chunk|></s>"
    assert run["hf_tokenizer"](text)["input_ids"] == run["tokenizer"].encode(text)
    assert run["hf_tokenizer"].decode(run["tokenizer"].encode(PROMPT)) == PROMPT
    assert run["hf_tokenizer"].padding_side == "left"
    eos = run["tokenizer"].special_ids["eos"]
    assert run["hf_tokenizer"].decode([eos]) == "</s>" and run["hf_tokenizer"].decode([eos], skip_special_tokens=True) == ""


def test_bundle_is_the_runtime(run):
    """The folder's code is the project's runtime: each file equals its source with only the
    project imports made relative, and imports no JAX and no package of this project."""
    import ast
    import difflib

    from vist2_jax.export.bundle import RUNTIME, flatten, source_file

    for module, name in RUNTIME.items():
        source = source_file(module).read_text()
        copied = (run["out"] / name).read_text()
        assert copied == flatten(source, module)
        changed = [line for line in difflib.ndiff(source.splitlines(), copied.splitlines())
                   if line[:2] in ("- ", "+ ")]
        assert all(line[2:].lstrip().startswith("from ") for line in changed), changed
        for node in ast.walk(ast.parse(copied)):
            if isinstance(node, ast.ImportFrom) and node.level == 0 or isinstance(node, ast.Import):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not {n.split(".")[0] for n in names} & {"jax", "flax", "vist2_jax", "data_pipelines"}, name
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                assert f"{node.module}.py" in RUNTIME.values()
    with pytest.raises(ValueError, match="vist2_jax.model.vist2, which the export bundle lacks"):
        flatten("from vist2_jax.model.vist2 import Vist2Model\n", "x")


def test_interleaved_row_logits_match_jax(run, record_property):
    config = run["config"].model
    batch = make_olm_batch(config, chunk_counts=((4,), (2, 1, 2)), seq_len=112, num_slots=4, seed=3)
    ref = np.asarray(jax.jit(Vist2Model(config).apply)(run["params"], batch)["logits"])
    ours = run["torch"].forward_rows(batch).numpy()
    err = float(np.abs(ours - ref).max())
    record_property("export: torch vs jax row logits max abs err", err)
    assert err < TOL


def test_siglip2_tanh_aligner_and_visual_past_visual(run, record_property):
    """The other options of a run: SigLIP2 tower layout, the paper's tanh aligner, visual
    tokens reading earlier chunks' visual tokens, token-aligned tiles of 2 tokens and visual
    positions strided by 2; row logits match, and greedy gcc gives JAX's tokens and logits."""
    tmp = run["tmp"]
    config = load_config(overrides=[
        "model.decoder.num_layers=2", "model.vision.num_layers=2", "model.decoder.vocab_size=512",
        "model.layout.image_size=64", "model.layout.visual_len=4", "model.layout.text_len=8",
        "model.aligner.projector=tanh", "model.layout.visual_attends_past_visual=true",
        "model.layout.visual_stride=2", "data.sketch_tile=32", "data.sketch_tile_tokens=2"])
    batch = make_olm_batch(config.model, chunk_counts=((4,), (2, 2)), seq_len=112, seed=5)
    model = Vist2Model(config.model)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), batch))
    save_run(tmp / "run_tanh", config, {1: jax.tree_util.tree_map(np.asarray, params)}, run["tokenizer"])
    export_run(tmp / "run_tanh", tmp / "out_tanh", vision="siglip2")
    exported = load(tmp / "out_tanh")
    assert isinstance(exported.vision_model, transformers.Siglip2VisionModel)
    ref = np.asarray(jax.jit(model.apply)(params, batch)["logits"])
    err = float(np.abs(exported.forward_rows(batch).numpy() - ref).max())
    record_property("export: siglip2 + tanh + visual_attends_past_visual row logits max abs err", err)
    assert err < TOL
    # gcc generation through the SigLIP2 tower: its logits are the forward's scores of the result
    prompt = run["tokenizer"].encode(PROMPT)[:13]
    tokens, out = hf_generate(exported, run["hf_tokenizer"], [prompt], 24)
    scores = exported(torch.tensor([prompt + tokens[0]])).logits[0, len(prompt) - 1:-1]
    assert float((torch.stack(out.logits, dim=1)[0] - scores).abs().max()) < TOL
    renderer = renderer_from_saved(json.loads((tmp / "out_tanh" / "renderer.json").read_text()))
    assert renderer.config.tile_tokens == 2 and exported.stride == 2
    decode = detokenizer(run["tokenizer"])
    ref = Generator(config.model, params, render_fn=renderer.render, detokenize=decode,
                    chunk_token=run["tokenizer"].special_ids["chunk"],
                    sketch_text=lambda ids: renderer.sketch_text(ids, decode)).generate([prompt], "gcc", 24,
                                                                                        record_logits=True)
    assert ref.tokens[0] == tokens[0]
    assert float(np.abs(torch.stack(out.logits, dim=1)[0].numpy() - ref.logits[0, :24]).max()) < TOL


def prompts_of(run, lengths=(13, 5, 22)):
    ids = run["tokenizer"].encode(PROMPT * 3)
    return [ids[i:i + n] for i, n in enumerate(lengths)]


@pytest.mark.parametrize("mode,new", [("gcc", 40), ("pcc", 16), ("text", 16)])
def test_batched_greedy_generate_matches_jax(run, mode, new, record_property):
    """transformers' generate on 3 left-padded prompts of different lengths (gcc: each closes
    chunks at its own tokens) gives JAX's greedy tokens and logits for every row."""
    prompts = prompts_of(run)
    ref = jax_generator(run).generate(prompts, mode, new, record_logits=True)
    tokens, out = hf_generate(run["torch"], run["hf_tokenizer"], prompts, new, mode=mode)
    logits = torch.stack(out.logits, dim=1).numpy()
    err = float(np.abs(logits - ref.logits[:, :new]).max())
    record_property(f"export: {mode} batched greedy generate logits max abs err", err)
    assert tokens == ref.tokens and all(len(t) == new for t in tokens)
    assert err < TOL


def test_generation_config_mode_sampling_streamer_and_eos(run):
    """The mode comes from the generation config too; sampling options follow
    GenerationConfig (repetition penalty and no-repeat n-grams pick what JAX's rules pick;
    top_k=1 sampling is greedy); TextStreamer prints the continuation; EOS stops a row."""
    from vist2_jax.inference.sampling_config import SamplingConfig

    model, tok = run["torch"], run["hf_tokenizer"]
    prompt = prompts_of(run)[0]
    ref = jax_generator(run).generate([prompt], "pcc", 12).tokens[0]
    config = transformers.GenerationConfig(**model.generation_config.to_dict())
    config.mode = "pcc"
    assert hf_generate(model, tok, [prompt], 12, generation_config=config)[0][0] == ref
    want = jax_generator(run).generate([prompt], "gcc", 20, sampling=SamplingConfig(
        repetition_penalty=1.5, no_repeat_ngram=2)).tokens[0]
    got = hf_generate(model, tok, [prompt], 20, repetition_penalty=1.5, no_repeat_ngram_size=2)[0][0]
    assert got == want and got != jax_generator(run).generate([prompt], "gcc", 20).tokens[0]
    greedy = hf_generate(model, tok, [prompt], 10)[0][0]
    with pytest.raises(NotImplementedError, match="not beam search"):
        model.generate(torch.tensor([prompt]), max_new_tokens=4, num_beams=2)
    assert hf_generate(model, tok, [prompt], 10, do_sample=True, top_k=1, temperature=0.7)[0][0] == greedy

    class Capture(transformers.TextStreamer):
        text = ""

        def on_finalized_text(self, text, stream_end=False):
            Capture.text += text

    model.generate(torch.tensor([prompt]), max_new_tokens=10, streamer=Capture(tok, skip_prompt=True))
    assert Capture.text == run["torch"].detokenize(greedy)
    # a row stops at an EOS token (here: its 4th greedy token) and is padded; the others run on
    prompts = prompts_of(run)
    full, _ = hf_generate(model, tok, prompts, 10)
    stop = full[0][3]
    tokens, _ = hf_generate(model, tok, prompts, 10, eos_token_id=stop)
    assert tokens[0][:4] == full[0][:4] and set(tokens[0][4:]) <= {tok.pad_token_id}
    for b in (1, 2):
        assert tokens[b][:full[b].index(stop) + 1 if stop in full[b] else 10] == \
            full[b][:full[b].index(stop) + 1 if stop in full[b] else 10]


def test_forward_scores_under_gcc_like_jax(run, record_property):
    """``model(input_ids, attention_mask)`` on left- and right-padded rows gives, at every
    real position, the logits JAX's gcc generation computes for that token (teacher forced)."""
    stream = run["tokenizer"].encode(PROMPT * 3)
    rows = [stream[:30], stream[3:22]]
    prompt_len = 6
    gen = jax_generator(run)
    ref = [gen.generate([r[:prompt_len]], "gcc", len(r) - prompt_len, record_logits=True,
                        forced_tokens=np.array([r[prompt_len:]])).logits[0] for r in rows]
    worst = 0.0
    for side in ("left", "right"):
        batch = run["hf_tokenizer"].pad({"input_ids": rows}, return_tensors="pt", padding=True, padding_side=side)
        logits = run["torch"](**batch).logits.numpy()
        for b, row in enumerate(rows):
            real = logits[b][batch["attention_mask"][b].bool().numpy()]
            steps = len(row) - prompt_len
            worst = max(worst, float(np.abs(real[prompt_len - 1:prompt_len - 1 + steps] - ref[b]).max()))
    record_property("export: forward (gcc scoring) vs jax teacher-forced logits max abs err", worst)
    assert worst < TOL
    text = run["torch"](torch.tensor([rows[0]]), mode="text").logits[0].numpy()
    decoder = {"params": run["params"]["params"]["decoder"]}
    want = np.asarray(decoder_text_logits(run["config"].model, decoder, np.array([rows[0]], np.int32)))[0]
    assert float(np.abs(text - want).max()) < TOL


class CappedRenderer:
    """The run's renderer, refusing (like a full sketch) any text of more than ``cap`` tokens."""

    def __init__(self, inner, tokenizer, cap):
        self.inner, self.tokenizer, self.cap = inner, tokenizer, cap

    def sketch_text(self, ids, decode):
        return self.inner.sketch_text(ids, decode)

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


def test_chunks_closed_early_generate_the_same_in_jax_and_pytorch(run, record_property):
    """With a renderer that takes fewer than L tokens, both runtimes close chunks by the chunk
    rule at the same tokens and re-predict the same way, each row of a batch on its own."""
    config, tokenizer = run["config"].model, run["tokenizer"]
    capped = CappedRenderer(run["renderer"], tokenizer, cap=config.layout.text_len // 2)
    prompts = prompts_of(run)
    ref = jax_generator(run, capped).generate(prompts, "gcc", 30, record_logits=True)
    model = load(run["out"])
    model.renderer = capped
    tokens, out = hf_generate(model, run["hf_tokenizer"], prompts, 30)
    err = float(np.abs(torch.stack(out.logits, dim=1).numpy() - ref.logits[:, :30]).max())
    record_property("export: gcc with early-closed chunks, batched, logits max abs err", err)
    assert ref.layout.visual_chunks > (22 + 30) // config.layout.text_len + 1  # more chunks than full ones
    assert tokens == ref.tokens and err < TOL


BLOCKED = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"jax", "jaxlib", "flax", "orbax", "optax", "vist2_jax", "data_pipelines"}:
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
"""

AUTO = BLOCKED + """
import json, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer, TextStreamer
folder, prompts = sys.argv[1], json.loads(sys.argv[2])
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
batch = processor(prompts, return_tensors="pt", padding=True)
out = model.generate(**batch, max_new_tokens=12)
model.generate(**tok(prompts[:1], return_tensors="pt"), max_new_tokens=12, streamer=TextStreamer(tok, skip_prompt=True))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {"jax", "vist2_jax", "data_pipelines"})
sketch = model.try_render(tok(prompts[2])["input_ids"][:8])
print(json.dumps({"type": type(model).__name__, "config": type(config).__name__, "loaded": loaded,
                  "new": out[:, batch["input_ids"].shape[1]:].tolist(), "sketch": sketch.tolist()}))
"""


def test_auto_classes_load_and_generate_with_jax_and_project_blocked(run, tmp_path):
    texts = [PROMPT, PROMPT[:20], PROMPT * 2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", AUTO, str(run["out"]), json.dumps(texts)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["type"] == "Vist2ForCausalLM" and result["config"] == "Vist2Config" and result["loaded"] == []
    tokens, _ = hf_generate(run["torch"], run["hf_tokenizer"], [run["tokenizer"].encode(t) for t in texts], 12)
    assert result["new"] == tokens
    assert lines[-2] == run["torch"].detokenize(tokens[0])  # the streamer's text
    # the folder's renderer draws the JAX pipeline's pixels
    ids = run["tokenizer"].encode(texts[2])[:8]
    np.testing.assert_array_equal(np.array(result["sketch"], np.uint8), run["renderer"].render(run["tokenizer"].decode(ids)))
    # the block works: the project is importable in this interpreter otherwise
    proc = subprocess.run([sys.executable, "-c", BLOCKED + "import data_pipelines.render"], capture_output=True,
                          text=True, cwd=tmp_path, env=env)
    assert proc.returncode != 0 and "blocked: data_pipelines" in proc.stderr


def test_generate_cli_torch(run, tmp_path, capsys):
    from vist2_jax.cli.main import main

    (tmp_path / "prompt.txt").write_text(PROMPT)
    assert main(["generate", "--torch", str(run["out"]), "--prompt-file", str(tmp_path / "prompt.txt"),
                 "--mode", "gcc", "--max-new-tokens", "10"]) == 0
    tokens, _ = hf_generate(run["torch"], run["hf_tokenizer"], [run["tokenizer"].encode(PROMPT)], 10)
    assert capsys.readouterr().out == run["torch"].detokenize(tokens[0]) + "\n"


def test_export_cli_step_dtype_and_fallback(run, tmp_path, caplog):
    """--step picks an older checkpoint (bf16 weights); a damaged newest checkpoint is
    reported and the previous readable one exported; a non-empty --out is refused."""
    out = tmp_path / "bf16"
    proc = subprocess.run([sys.executable, "-m", "vist2_jax.cli.main", "export", str(run["tmp"] / "run"),
                           "--out", str(out), "--step", "2", "--dtype", "bfloat16"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["step"] == 2
    model = load(out)
    assert model.dtype == torch.bfloat16
    embedding = model.language_model.model.embed_tokens.weight.detach().float().numpy()
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


def test_bytes_damaged_inside_an_array_file_are_not_exported(run, tmp_path, caplog):
    """Bytes changed in the middle of a parameter data file (still a decodable file, so
    TensorStore reads it without complaint) fail the array's checksum: the export falls back
    to the previous checkpoint, and ``--step`` of the damaged one exits 2 naming the array."""
    damaged = tmp_path / "damaged"
    subprocess.run(["cp", "-r", str(run["tmp"] / "run"), str(damaged)], check=True)
    data = max((p for p in (damaged / "checkpoints" / "4" / "params").rglob("d/*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 64] = bytes(b ^ 0x5A for b in raw[middle:middle + 64])
    data.write_bytes(bytes(raw))
    with caplog.at_level(logging.ERROR, logger="vist2_jax.export.exporter"):
        result = export_run(damaged, tmp_path / "fallback")
    assert result.step == 2 and "checkpoint step 4" in caplog.text
    proc = subprocess.run([sys.executable, "-m", "vist2_jax.cli.main", "export", str(damaged), "--out",
                           str(tmp_path / "explicit"), "--step", "4"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("vist2 export: error: --step 4:"), proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "explicit").exists()
    assert "params/params/" in proc.stderr  # names the damaged array


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
        elif name == "config.json":  # equal but for where and when it was exported
            ours, want = json.loads((local / name).read_text()), json.loads((reference / name).read_text())
            assert ours.pop("source")["run_dir"] == run_url
            want.pop("source")
            assert ours == want
        elif name.endswith(".json"):
            assert json.loads((local / name).read_text()) == json.loads((reference / name).read_text())
        elif name != "README.md":  # tokenizer, font and its licence
            assert (local / name).read_bytes() == (reference / name).read_bytes()
    assert run_url in (local / "README.md").read_text()
    prompt = [run["tokenizer"].encode(PROMPT)[:13]]
    assert hf_generate(load(local), run["hf_tokenizer"], prompt, 12)[0] == \
        hf_generate(run["torch"], run["hf_tokenizer"], prompt, 12)[0]

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
    # with the saved checksums every leaf is checked, a stacked one over all its blocks
    from vist2_jax.checkpointing.checkpoints import tree_checksums
    from vist2_jax.export.orbax_reader import UnreadableCheckpoint

    sums = tree_checksums(tree, "item")
    checked = OrbaxParams(tmp_path / "item", sums)
    assert len(list(checked.layer_blocks(("params", "stacked")))) == 8
    checked.read(("params", "bias", "b"))
    wrong = OrbaxParams(tmp_path / "item", {**sums, "item/params/stacked": "0" * 16})
    with pytest.raises(UnreadableCheckpoint, match="item/params/stacked differs"):
        list(wrong.layer_blocks(("params", "stacked")))


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
    from safetensors import safe_open

    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    written = 0
    for file in set(index.values()):
        with safe_open(tmp_path / "out" / file, "np") as f:
            written += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys() if k.startswith("language_model."))
    assert written == sum(x.size for x in jax.tree_util.tree_leaves(
        nn.unbox(abstract_params(config.model))["params"]["decoder"]))


LM_EVAL_TASKS = {
    "vist2_choice": """task: vist2_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/choice.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""",
    "vist2_continue": """task: vist2_continue
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/continue.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def test_lm_eval_harness_on_the_export(run, tmp_path, record_property):
    """``lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`` runs a
    log-likelihood and a generate_until task (YAML and data written here) on the export; its
    per-sample log-likelihoods are the model's gcc scores and its generations the model's
    greedy gcc continuations."""
    contexts = [PROMPT[:n] for n in (18, 31, 47, 64)]  # prompts longer than L=8 tokens: earlier chunks are sketches
    with (tmp_path / "choice.jsonl").open("w") as f:
        for i, context in enumerate(contexts):
            f.write(json.dumps({"context": context, "choices": [" times", " wisdom of", " age"], "label": i % 3}) + "\n")
    with (tmp_path / "continue.jsonl").open("w") as f:
        for context in contexts[:3]:
            f.write(json.dumps({"context": context, "answer": "it was"}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, text in LM_EVAL_TASKS.items():
        (tasks / f"{name}.yaml").write_text(text.format(data=tmp_path))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={run['out']},trust_remote_code=True,dtype=float32",
                           "--tasks", ",".join(LM_EVAL_TASKS), "--include_path", str(tasks), "--device", "cpu",
                           "--batch_size", "2", "--output_path", str(tmp_path / "results"), "--log_samples"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = "\n".join(line for line in proc.stdout.splitlines() if line.startswith("|"))
    assert "vist2_choice" in table and "vist2_continue" in table
    record_property("export: lm-eval table", "\n" + table)
    samples = {name: [json.loads(line) for file in (tmp_path / "results").rglob(f"samples_{name}_*.jsonl")
                      for line in file.read_text().splitlines()] for name in LM_EVAL_TASKS}
    model, tok = run["torch"], run["hf_tokenizer"]
    worst = 0.0
    for sample in samples["vist2_choice"]:
        for args, resp in zip(sample["arguments"].values(), sample["resps"]):
            context, continuation = args["arg_0"], args["arg_1"]  # lm-eval's pair encoding: trailing
            spaces = len(context) - len(context.rstrip())  # spaces of the context join the continuation
            context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
            whole, head = tok.encode(context + continuation), tok.encode(context)
            logits = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
            want = sum(float(logits[i - 1, whole[i]]) for i in range(len(head), len(whole)))
            worst = max(worst, abs(float(resp[0][0]) - want))
    assert len(samples["vist2_choice"]) == len(contexts) and worst < 1e-3
    record_property("export: lm-eval loglikelihood vs model forward max abs diff", worst)
    for sample in samples["vist2_continue"]:
        ids = tok.encode(sample["doc"]["context"])
        new, _ = hf_generate(model, tok, [ids], 12)
        assert sample["resps"][0][0] == model.detokenize(new[0]).split("\n")[0]
    assert len(samples["vist2_continue"]) == 3


def test_model_card_reports_the_eval_figures_of_the_exported_step(tmp_path):
    """The card's front matter names HF starting weights, and its table the eval_* figures
    logged at the exported step (or the last logged before it), never later ones."""
    from vist2_jax.export.exporter import eval_figures
    from vist2_jax.export.readme import model_card

    records = [{"step": 10, "loss": 5.0, "eval_ocr_cer": 0.9}, {"step": 20, "eval_memory_gain": 0.0081},
               {"step": 30, "eval_memory_gain": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert eval_figures(tmp_path, 25) == {"step": 20, "eval_memory_gain": 0.0081}
    assert eval_figures(tmp_path / "nowhere", 25) == {}
    config = {"source": {"run_dir": "r", "step": 25, "git_commit": "c", "exported_at": "t",
                         "init_decoder_hf": "hf/Qwen3-0.6B/", "init_vision_hf": None},
              "layout": {"text_len": 256, "visual_len": 64, "image_size": 256}, "vision_format": "siglip",
              "lm_config": {"num_hidden_layers": 28, "hidden_size": 1024, "vocab_size": 151936},
              "projector": "mlp", "font_sha256": "f", "dtype": "float32"}
    card = model_card(config, {("a",): 4}, eval_figures(tmp_path, 25))
    assert yaml.safe_load(card.split("---")[1])["base_model"] == ["hf/Qwen3-0.6B"]
    assert "| memory gain, nats/token (blank - true sketches) (`eval_memory_gain`) | 0.0081 |" in card
    assert "step 20" in card and "0.5000" not in card
