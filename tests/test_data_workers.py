"""Grain workers: a saved iterator state restores in a new process to exactly the batches
an uninterrupted iterator gives; a worker's error reaches the caller with its cause; the
``data preview`` and ``bench data --workers`` commands run."""

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from data_pipelines.pipeline import build_pipeline, resolve_tokenizer
from vist2_jax.cli.main import main
from vist2_jax.config import load_config

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["model.decoder.num_layers=2", "model.vision.num_layers=2", "data.seq_len=256",
             "data.global_batch_size=2", "data.images_per_row=4", "train.steps=8", "train.warmup_steps=1",
             "data.num_workers=2"]
RESTORE = textwrap.dedent("""
    import pickle, sys
    import numpy as np
    from data_pipelines.pipeline import build_pipeline
    from vist2_jax.config import load_config
    overrides, workdir, state_file, out, count = pickle.load(open(sys.argv[1], "rb"))
    iterator = iter(build_pipeline(load_config(overrides=overrides), workdir).train_dataset())
    iterator.set_state(pickle.load(open(state_file, "rb")))
    batches = [next(iterator) for _ in range(count)]
    np.savez(out, **{f"{i}_{k}": v for i, b in enumerate(batches) for k, v in b.items()})
    iterator.close()
""")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return str(resolve_tokenizer(load_config(), tmp_path_factory.mktemp("tok")).path)


@pytest.mark.slow
def test_worker_state_restores_exactly_in_a_new_process(tmp_path, tokenizer_path):
    overrides = [*OVERRIDES, f"data.tokenizer={tokenizer_path}"]
    pipeline = build_pipeline(load_config(overrides=overrides), tmp_path)
    taken, after = 2, 2
    iterator = iter(pipeline.train_dataset())
    for _ in range(taken):
        next(iterator)
    (tmp_path / "state.pkl").write_bytes(pickle.dumps(iterator.get_state()))
    expected = [next(iterator) for _ in range(after)]  # the uninterrupted continuation
    iterator.close()
    args = tmp_path / "args.pkl"
    args.write_bytes(pickle.dumps((overrides, str(tmp_path), str(tmp_path / "state.pkl"),
                                   str(tmp_path / "restored.npz"), after)))
    done = subprocess.run([sys.executable, "-c", RESTORE, str(args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    restored = np.load(tmp_path / "restored.npz")
    for i, batch in enumerate(expected):
        for key, value in batch.items():
            np.testing.assert_array_equal(restored[f"{i}_{key}"], value, err_msg=f"batch {i} {key}")


def test_bad_input_fail_inside_a_worker_names_the_record(tmp_path, tokenizer_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "doc.txt").write_text("Words that cannot be drawn at 200 pixels. " * 20)
    config = load_config(overrides=[*OVERRIDES, f"data.tokenizer={tokenizer_path}", "data.bad_input=fail",
                                    f"data.source={tmp_path / 'docs'}", "data.font_sizes=[200]"])
    iterator = iter(build_pipeline(config, tmp_path).train_dataset())
    with pytest.raises(Exception, match="doc.txt: chunk cannot be rendered"):
        next(iterator)
    iterator.close()


def test_data_preview_writes_sheets_and_counters(tmp_path, tokenizer_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("data: {stage: ocr, seq_len: 256, global_batch_size: 2, images_per_row: 4}\n"
                      "train: {steps: 4, warmup_steps: 1}\n")
    code = main(["data", "preview", str(recipe), f"data.tokenizer={tokenizer_path}", "--batches", "2",
                 "--out", str(tmp_path / "preview")])
    assert code == 0
    out = capsys.readouterr().out
    assert (tmp_path / "preview" / "batch_1.png").stat().st_size > 1000
    counters = json.loads((tmp_path / "preview" / "counters.json").read_text())
    assert counters["rows"]["rows"] == 4 and counters["renderer"]["rendered"] > 0
    assert "skipped=0" in out and "rows=4" in out


def test_bench_data_measures_pipeline_rows_per_second(tmp_path, tokenizer_path):
    out = tmp_path / "bench.json"
    code = main(["bench", "data", "--chunks", "4", "--repeats", "1", "--workers", "0", "--batches", "2",
                 "--tokenizer", tokenizer_path, "--set", "data.seq_len=256", "--set",
                 "data.global_batch_size=2", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["pipeline"]["by_workers"]["0"]["rows_per_s_median"] > 0
    assert result["atlas"]["images_per_s_median"] > 0
