"""Every kind of bad input a user can give ends in one line naming the file, flag or field,
with exit code 2 and no traceback, across commands alike."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def vist2(*args, cwd=ROOT):
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "vist2_jax.cli.main", *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def assert_one_line(proc, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vist2 "), last
    for needle in needles:
        assert needle in last, (needle, last)


@pytest.fixture(scope="module")
def not_a_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("bad") / "tokenizer.model"
    path.write_text("this is not a sentencepiece model\n")
    return path


def test_generate_checkpoint_that_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    assert_one_line(vist2("generate", "--checkpoint", tmp_path / "empty", "--prompt-file", prompt),
                    "--checkpoint", "empty")
    step = tmp_path / "run" / "checkpoints" / "40"
    step.mkdir(parents=True)
    assert_one_line(vist2("generate", "--checkpoint", step, "--prompt-file", prompt), "--checkpoint")


def test_generate_sampling_flags_name_the_flag(tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    from vist2_jax.inference.sampling import SamplingConfig

    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingConfig(top_p=2.0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        SamplingConfig(temperature=-1.0)
    # checked before the checkpoint is looked at: the flag is named, not the missing folder
    assert_one_line(vist2("generate", "--checkpoint", tmp_path / "missing", "--prompt-file", prompt, "--top-p", "2"),
                    "--top-p must be in (0, 1], got 2.0")


def test_a_file_that_is_not_a_tokenizer(tmp_path, not_a_tokenizer):
    prompt = tmp_path / "p.txt"
    prompt.write_text("hello")
    assert_one_line(vist2("data", "preview", ROOT / "recipes/demo/stage3_olm.yaml", f"data.tokenizer={not_a_tokenizer}",
                          "--batches", "1", "--out", tmp_path / "out"), "data.tokenizer", str(not_a_tokenizer))
    from data_pipelines.tokenizer import TokenizerError, load_tokenizer

    with pytest.raises(TokenizerError, match="not a usable tokenizer"):
        load_tokenizer(not_a_tokenizer)


def test_render_font_that_is_not_a_font(tmp_path):
    text, font = tmp_path / "t.txt", tmp_path / "font.ttf"
    text.write_text("hello")
    font.write_bytes(b"not a font at all")
    assert_one_line(vist2("render", "--text-file", text, "--out", tmp_path / "o.png", "--font", font),
                    "data.font_path", str(font), "not a TrueType")


def test_a_small_folder_without_a_tokenizer_says_to_set_one(tmp_path):
    data = tmp_path / "docs"
    data.mkdir()
    (data / "a.txt").write_text("A short document. " * 20)
    assert_one_line(vist2("data", "preview", ROOT / "recipes/demo/stage3_olm.yaml", f"data.source={data}",
                          "model.decoder.vocab_size=4096", "--batches", "1", "--out", tmp_path / "out"),
                    "data.tokenizer", "4096")
