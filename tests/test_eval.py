"""Evaluation (vist2_jax/evaluation): metrics against hand-computed values, benchmark
loaders on fixture files in each benchmark's published layout, the memory ablation's row
transforms, a model made blind to its sketches showing no memory gain, and ``vist2 eval``
plus ``train.eval_tasks`` on a tiny run."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import make_olm_batch
from vist2_jax.evaluation import benchmarks, metrics
from vist2_jax.evaluation.context import EvalContext
from vist2_jax.evaluation.memory import blank_row, evaluate_memory, memory_weights, text_row
from vist2_jax.model.vist2 import Vist2Model
from vist2_jax.row_contract import VISUAL


def test_metrics_match_hand_computed_values():
    assert metrics.char_error_rate("kitten", "sitting") == pytest.approx(3 / 7)
    assert metrics.char_error_rate("", "abcd") == 1.0
    assert metrics.exact_match(" same text\n", "same text") == 1.0
    assert metrics.exact_match("same text.", "same text") == 0.0
    # normalized "cat sat" vs "cat sat down": 2 shared, precision 1, recall 2/3
    assert metrics.qa_f1("The cat sat!", "cat sat down") == pytest.approx(0.8)
    assert metrics.qa_f1("dog", "cat") == 0.0
    # LCS of [the cat sat on the mat] and [the cat lay on the mat] is 5 of 6 tokens each
    assert metrics.rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    assert metrics.classification_score("Type: LOC", "LOC", ["LOC", "NUM", "ABBR"]) == 1.0
    assert metrics.classification_score("LOC or NUM", "LOC", ["LOC", "NUM", "ABBR"]) == 0.5
    assert metrics.retrieval_score("Paragraph 3, maybe 5", "Paragraph 3") == 0.5
    assert metrics.count_score("I count 7 paragraphs", 7) == 1.0
    assert metrics.count_score("7 or 8", 7) == 0.5
    assert metrics.final_number("She pays 2 * 617 = 1,234 dollars.\n#### 1,234") == "1234"
    assert metrics.final_number("so the total is 72.0") == "72"
    assert metrics.gsm8k_match("5 + 67 = 72, the answer is 72.", "5 + 67 = 72\n#### 72") == 1.0
    assert metrics.gsm8k_match("the answer is 71", "#### 72") == 0.0
    estimate, low, high = metrics.bootstrap_ratio(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0]))
    assert (estimate, low, high) == (1.0, 1.0, 1.0)
    estimate, low, high = metrics.bootstrap_ratio(np.array([0.0, 4.0]), np.array([1.0, 1.0]))
    assert estimate == 2.0 and low == 0.0 and high == 4.0


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_longbench_loader_prompts_and_official_metrics(tmp_path):
    folder = tmp_path / "longbench"
    folder.mkdir()
    write_jsonl(folder / "hotpotqa.jsonl", [{
        "input": "Which city hosts the tower?", "context": "Passage 1:\nThe tower stands in Paris.",
        "answers": ["Paris"], "length": 7, "dataset": "hotpotqa", "language": "en", "all_classes": None,
        "_id": "a1"}])
    write_jsonl(folder / "gov_report.jsonl", [{
        "input": "", "context": "The agency audited the fund.", "answers": ["The agency audited the fund."],
        "length": 5, "dataset": "gov_report", "language": "en", "all_classes": None, "_id": "b1"}])
    write_jsonl(folder / "trec.jsonl", [{
        "input": "Where is Paris?", "context": "Question: Who is he?\nType: Individual",
        "answers": ["Other location"], "length": 9, "dataset": "trec", "language": "en",
        "all_classes": ["Individual", "Other location", "City"], "_id": "c1"}])
    examples = {e.group: e for e in benchmarks.load_longbench(folder)}
    assert set(examples) == {"hotpotqa", "gov_report", "trec"}
    qa = examples["hotpotqa"]
    assert "The tower stands in Paris." in qa.prompt
    assert qa.prompt.endswith("Question: Which city hosts the tower?\nAnswer:")
    assert (qa.metric, qa.max_new_tokens) == ("qa_f1", 32)
    assert benchmarks.score(qa, "paris") == 1.0 and benchmarks.score(qa, "in Paris France") == pytest.approx(0.5)
    summary = examples["gov_report"]
    assert summary.metric == "rouge_l" and benchmarks.score(summary, "the agency audited") == pytest.approx(
        2 * (3 / 3) * (3 / 5) / (3 / 3 + 3 / 5))
    trec = examples["trec"]
    assert trec.first_line and benchmarks.score(trec, "Other location\nCity") == 1.0
    with pytest.raises(Exception, match="lacks"):
        benchmarks.load_longbench(write_jsonl(tmp_path / "bad.jsonl", [{"input": "q"}]))


def test_loogle_loader_splits_qa_pairs_and_summaries(tmp_path):
    folder = tmp_path / "loogle"
    folder.mkdir()
    pairs = [{"Q": "Who wrote it?", "A": "Ada Lovelace", "S": ["Ada Lovelace wrote it."]},
             {"Q": "When?", "A": "In 1843", "S": ["In 1843."]}]
    write_jsonl(folder / "shortdep_qa.jsonl", [{"input": "Ada Lovelace wrote it in 1843.", "title": "Notes",
                                                "qa_pairs": str(pairs), "output": "none"}])
    write_jsonl(folder / "longdep_summarization.jsonl", [{"input": "A long paper.", "title": "Paper",
                                                          "qa_pairs": "none", "output": "A short summary."}])
    cloze = [{"Q": "<mask-0> wrote the notes.", "A": {"<mask-0>": "Ada Lovelace"}, "S": []}]
    write_jsonl(folder / "shortdep_cloze.jsonl", [{"input": "Ada Lovelace wrote the notes.", "title": "Notes",
                                                   "qa_pairs": str(cloze), "output": "none"}])
    examples = benchmarks.load_loogle(folder)
    by_group = {}
    for e in examples:
        by_group.setdefault(e.group, []).append(e)
    assert [len(by_group[g]) for g in ("shortdep_qa", "longdep_summarization", "shortdep_cloze")] == [2, 1, 1]
    qa = by_group["shortdep_qa"][0]
    assert qa.prompt.endswith("Question: Who wrote it?\nAnswer: ") and qa.answers == ("Ada Lovelace",)
    assert benchmarks.score(qa, "Ada Lovelace") == 1.0 and benchmarks.score(qa, "Ada") == pytest.approx(2 / 3)
    summary = by_group["longdep_summarization"][0]
    assert summary.metric == "rouge_l" and summary.answers == ("A short summary.",)
    cz = by_group["shortdep_cloze"][0]
    assert cz.metric == "cloze" and benchmarks.score(cz, "{'<mask-0>': 'Ada Lovelace'}") == 1.0
    assert benchmarks.score(cz, "{'<mask-0>': 'Bob'}") == 0.0 and benchmarks.score(cz, "no json") == 0.0


def test_gsm8k_loader_reads_the_official_layout(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "What is 1,000 + 234?", "answer": "1,000 + 234 = 1,234\n#### 1,234"}])
    examples = benchmarks.load_gsm8k(path)
    assert [e.prompt for e in examples][0] == "Question: Tom has 3 apples and buys 4. How many?\nAnswer:"
    assert benchmarks.score(examples[0], "3 + 4 = 7\n#### 7") == 1.0
    assert benchmarks.score(examples[1], "The answer is 1234.") == 1.0
    assert benchmarks.score(examples[1], "The answer is 1,235") == 0.0
    with pytest.raises(Exception, match="####"):
        benchmarks.load_gsm8k(write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "7"}]))


@pytest.fixture(scope="module")
def olm_rows(tiny_config):
    batch = make_olm_batch(tiny_config.model, chunk_counts=((3,), (2, 2), (4,), (3,)), seq_len=96, num_slots=4)
    return [{k: v[i] for k, v in batch.items()} for i in range(4)]


def test_blank_and_text_rows_keep_the_scored_targets(olm_rows):
    row = olm_rows[1]  # two documents of two chunks: [T1 V1 T2][T1 V1 T2]
    blank = blank_row(row)
    assert np.all(blank["images"][row["image_mask"]] == 255)
    assert np.array_equal(blank["images"][~row["image_mask"]], row["images"][~row["image_mask"]])
    text = text_row(row)
    keep = row["modality"] != VISUAL
    n = int(keep.sum())
    assert not np.any(text["modality"] == VISUAL) and n == len(row["tokens"]) - 2 * 4
    assert np.array_equal(text["tokens"][:n], row["tokens"][keep])
    assert np.array_equal(text["targets"][:n], row["targets"][keep])
    assert text["memory"].sum() == memory_weights(row).sum() > 0
    first = text["segment_id"] == 1  # one chunk id per document, positions 0.. without the visual span
    assert np.all(text["chunk_id"][first] == 1)
    assert np.array_equal(text["positions"][first], np.arange(first.sum()))
    assert first.sum() == 2 * (1 + 8)  # two text spans of <|chunk|> + L=8 tokens
    alone = text_row(row, alone=True)  # the same text, each chunk under its own id: no context
    assert all(np.array_equal(alone[k], text[k]) for k in ("tokens", "targets", "positions", "memory"))
    assert np.array_equal(alone["chunk_id"][:n], row["chunk_id"][keep]) and len(np.unique(alone["chunk_id"][first])) == 2


def _blind(params):
    """Aligner output zeroed: every sketch becomes the same all-zero visual tokens."""
    aligner = jax.tree_util.tree_map(np.zeros_like, params["params"]["aligner"])
    return {"params": {**params["params"], "aligner": aligner}}


def test_memory_gain_of_a_model_blind_to_its_sketches_is_zero(tiny_config, olm_rows):
    model = Vist2Model(tiny_config.model)
    batch = {k: np.stack([r[k] for r in olm_rows]) for k in olm_rows[0]}
    params = jax.device_get(nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)))
    blind = evaluate_memory(EvalContext(tiny_config, _blind(params), tokenizer=None), rows=olm_rows)
    assert blind["memory_gain_lo"] <= 0.0 <= blind["memory_gain_hi"]
    # chunks >= 2 count, L=8 targets each: 2 + 2x1 + 3 + 2 chunks in 5 documents
    assert blind["documents"] == 5 and blind["tokens"] == 9 * 8
    assert blind["visual_spread"] == 0.0  # every sketch reaches the decoder as zeros
    assert blind["memory_gain_foreign"] == 0.0 and blind["nll_foreign"] == blind["nll_true"]
    seeing = evaluate_memory(EvalContext(tiny_config, params, tokenizer=None), rows=olm_rows)
    assert seeing["visual_spread"] > 0.01
    assert seeing["memory_gain"] != 0.0  # blanking reaches the decoder when the aligner is live
    assert seeing["nll_text"] != seeing["nll_true"]
    # the text control with and without the earlier chunks: context reaches the text model
    assert seeing["nll_text_alone"] != seeing["nll_text"]
    assert seeing["text_context_gain"] == pytest.approx(seeing["nll_text_alone"] - seeing["nll_text"], abs=1e-6)
    assert seeing["text_context_gain_lo"] <= seeing["text_context_gain"] <= seeing["text_context_gain_hi"]
    assert seeing["memory_gain_foreign"] != 0.0  # other documents' sketches reach it too


def test_foreign_rows_give_every_real_slot_a_sketch_of_another_row(olm_rows):
    from vist2_jax.evaluation.memory import foreign_rows

    swapped = foreign_rows(olm_rows)
    pool = [(i, k) for i, row in enumerate(olm_rows) for k in np.flatnonzero(row["image_mask"])]
    for i, (row, new) in enumerate(zip(olm_rows, swapped)):
        assert np.array_equal(new["image_mask"], row["image_mask"]) and np.array_equal(new["tokens"], row["tokens"])
        for k in np.flatnonzero(row["image_mask"]):
            source = [(j, s) for j, s in pool if np.array_equal(olm_rows[j]["images"][s], new["images"][k])]
            assert source and all(j != i for j, _ in source), (i, k)  # a sketch of another row
        assert np.array_equal(new["images"][~row["image_mask"]], row["images"][~row["image_mask"]])


def test_context_rows_give_each_chunk_another_documents_text_or_its_own(tiny_config, olm_rows):
    """The text twin of the foreign control: one row per (document, chunk >= 2), the chunk's
    own tokens and targets after as many tokens of another document (or its own earlier
    text, whose summed losses are then exactly the ``text`` control's)."""
    from vist2_jax.evaluation.memory import context_rows, document_sums

    own, owners = context_rows(olm_rows, foreign=False)
    foreign, foreign_owners = context_rows(olm_rows)
    assert len(own) == len(foreign) == 2 + 2 * 1 + 3 + 2 and np.array_equal(owners, foreign_owners)
    assert owners.tolist() == [0, 0, 1, 2, 3, 3, 3, 4, 4]  # documents in document_sums' order
    for mine, theirs in zip(own, foreign):
        scored = mine["memory"] > 0
        assert scored.sum() == 8 and np.array_equal(scored, theirs["memory"] > 0)
        before = int(np.argmax(scored))
        assert np.array_equal(mine["tokens"][before:], theirs["tokens"][before:])
        assert np.array_equal(mine["targets"], theirs["targets"]) and np.array_equal(mine["positions"], theirs["positions"])
        assert not np.array_equal(mine["tokens"][:before], theirs["tokens"][:before])
    model = Vist2Model(tiny_config.model)
    batch = {k: np.stack([r[k] for r in olm_rows]) for k in olm_rows[0]}
    params = jax.device_get(nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)))
    ctx = EvalContext(tiny_config, params, tokenizer=None)
    text_sum, tokens = document_sums(ctx, [text_row(r) for r in olm_rows])
    part_sum, part_tokens = document_sums(ctx, own)
    assert np.array_equal(np.bincount(owners, part_tokens), tokens)
    np.testing.assert_allclose(np.bincount(owners, part_sum), text_sum, rtol=1e-5)
    with_text_model = evaluate_memory(ctx, rows=olm_rows, text_model=ctx)
    assert with_text_model["nll_text_foreign"] != with_text_model["nll_text"]
    assert with_text_model["text_foreign_gain"] == pytest.approx(
        with_text_model["nll_text_foreign"] - with_text_model["nll_text"], abs=1e-6)
    first = with_text_model["first_target_nll"]  # the chunk-opening targets: one per chunk >= 2
    assert first["text"] == pytest.approx(float(np.bincount(owners, document_sums(ctx, own, first=True)[0]).sum() / 9))
    assert first["text_foreign"] != first["text"] and first["true"] != first["blank"]
    assert "text_foreign_gain" not in evaluate_memory(ctx, rows=olm_rows)  # the table's control only


def test_collapse_guard_fires_on_a_constant_aligner_and_not_on_a_fresh_model(tiny_config, olm_rows):
    from vist2_jax.evaluation.during_training import CollapseGuard

    model = Vist2Model(tiny_config.model)
    batch = {k: np.stack([r[k] for r in olm_rows]) for k in olm_rows[0]}
    params = jax.device_get(nn.unbox(jax.jit(model.init)(jax.random.key(0), batch)))
    guard = CollapseGuard(tiny_config, lambda i: olm_rows[i % len(olm_rows)])
    assert guard.active and len(guard.images) == 16
    fresh = guard(params)
    assert fresh > 0.2 and guard.check(5, fresh) is None  # a random ViT + aligner keeps the image
    fc2 = params["params"]["aligner"]["fc2"]
    constant = {**fc2, "kernel": np.zeros_like(fc2["kernel"]), "bias": np.full_like(fc2["bias"], 0.5)}
    collapsed = {"params": {**params["params"], "aligner": {**params["params"]["aligner"], "fc2": constant}}}
    spread = guard(collapsed)  # every sketch -> the bias: image-independent
    assert spread < 1e-6
    assert guard.check(5, spread).startswith("step 5: visual_spread 0.0000 is below train.collapse_threshold=0.05")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step OLM run of a shrunken tiny model with ``train.eval_tasks`` on."""
    from data_pipelines.pipeline import resolve_tokenizer
    from vist2_jax.config import load_config
    from vist2_jax.training.trainer import train

    root = tmp_path_factory.mktemp("evalrun")
    small = ["model.decoder.vocab_size=1024", "model.decoder.num_layers=1", "model.vision.num_layers=1",
             "model.layout.image_size=64", "model.layout.visual_len=4", "model.layout.text_len=8",
             "data.seq_len=96", "data.global_batch_size=4", "data.images_per_row=4", "data.eval_rows=4",
             "data.font_sizes=[8,7]", "data.curriculum=[{start_step: 0, text_len: 8, max_chunks: 3}]",
             "mesh.fsdp=4", "mesh.tensor=2", "train.steps=2", "train.warmup_steps=1", "train.eval_every=2",
             "train.checkpoint_every=2", "train.eval_batches=1", "train.eval_tasks=[ocr,memory]",
             "train.eval_task_limit=4", "run.log_every=1", "run.progress=false"]
    tokenizer = resolve_tokenizer(load_config(overrides=small), root)
    train(load_config(overrides=[*small, f"data.tokenizer={tokenizer.path}", f"run.workdir={root / 'run'}"]))
    return root / "run"


def test_training_logs_eval_task_figures(tiny_run):
    from conftest import read_scalar_events

    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "eval_ocr_cer" in r]
    assert [r["step"] for r in evaluated] == [0, 2]
    for record in evaluated:
        assert 0.0 <= record["eval_ocr_exact_match"] <= 1.0 and record["eval_ocr_cer"] >= 0.0
        assert record["eval_memory_gain_lo"] <= record["eval_memory_gain"] <= record["eval_memory_gain_hi"]
        for key in ("eval_ocr_cer", "eval_ocr_cer_blank_sketch", "eval_ocr_cer_gap"):  # bootstrap over chunks
            assert record[f"{key}_lo"] <= record[key] <= record[f"{key}_hi"]
        assert record["eval_ocr_cer_gap"] == pytest.approx(record["eval_ocr_cer_blank_sketch"] - record["eval_ocr_cer"])
    events = [s for f in (tiny_run / "tensorboard").glob("events.*") for _, s in read_scalar_events(f)]
    assert any("eval_memory_gain" in s and "eval_ocr_cer" in s for s in events)


def test_vist2_eval_every_task_on_fixture_data(tiny_run, tmp_path, capsys):
    from vist2_jax.cli.main import main

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "held_out.txt").write_text("The quick brown fox jumps over the lazy dog near the river bank. " * 12)
    lb = write_jsonl(tmp_path / "hotpotqa.jsonl", [{"input": "Where?", "context": "It is in Paris. " * 6,
                                                     "answers": ["Paris"], "dataset": "hotpotqa", "_id": "x"}])
    lg = write_jsonl(tmp_path / "shortdep_qa.jsonl", [{"input": "Ada wrote notes. " * 6, "title": "t",
                                                        "qa_pairs": str([{"Q": "Who?", "A": "Ada", "S": []}]),
                                                        "output": "none"}])
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}])
    for task, extra in (("ocr", ["--data", docs, "--limit", "3"]), ("memory", ["--limit", "2"]),
                        ("longbench", ["--data", lb, "--max-new-tokens", "4"]),
                        ("loogle", ["--data", lg, "--mode", "pcc", "--max-new-tokens", "4"]),
                        ("gsm8k", ["--data", gsm, "--mode", "text", "--max-new-tokens", "4"])):
        out = tmp_path / f"{task}.json"
        assert main(["eval", str(tiny_run), "--task", task, "--json", str(out), *map(str, extra)]) == 0
        result = json.loads(out.read_text())
        assert result["task"] == task and result["step"] == 2
        if task == "ocr":
            assert result["chunks"] == 3 and 0 <= result["cer"] and "cer_ratio_2x" in result
        elif task == "memory":
            assert result["memory_gain_lo"] <= result["memory_gain"] <= result["memory_gain_hi"]
        else:
            assert result["examples"] == 1 and 0.0 <= result["score"] <= 100.0
    assert main(["eval", str(tiny_run), "--task", "gsm8k"]) == 2
    assert "--task gsm8k needs --data" in capsys.readouterr().err
    # --text-len: another ratio than the run's own (L=4 at m=4: 1x, chunks half as long)
    for task in ("ocr", "memory"):
        out = tmp_path / f"{task}_1x.json"
        assert main(["eval", str(tiny_run), "--task", task, "--limit", "2", "--text-len", "4", "--json", str(out)]) == 0
        result = json.loads(out.read_text())
        if task == "ocr":
            assert "cer_ratio_1x" in result and "cer_ratio_2x" not in result
        else:
            assert 0 < result["tokens"] < json.loads((tmp_path / "memory.json").read_text())["tokens"]
    assert main(["eval", str(tiny_run), "--task", "memory", "--text-len", "6"]) == 2
    assert "--text-len 6: must be a whole multiple of the run's m=4" in capsys.readouterr().err


def _text_of_segments(row, chunk_token):
    """Per document of a row: its text tokens in order (chunk markers dropped), as bytes."""
    text = (row["modality"] == 1) & (row["tokens"] != chunk_token)
    return [row["tokens"][text & (row["segment_id"] == s)].astype(np.int32).tobytes()
            for s in np.unique(row["segment_id"][text])]


def test_training_rows_never_hold_a_held_out_document_and_evaluation_only_those(sp_tokenizer):
    """The embedded corpus (178 documents): every document of a training row (stage 3, and
    the stage-4 stand-in built from the same documents) is a piece of a training document,
    every evaluation row's and OCR chunk's a piece of a held-out one."""
    from data_pipelines.pipeline import build_pipeline
    from data_pipelines.sources import load_samples
    from data_pipelines.split import DocumentSplit
    from vist2_jax.config import load_config
    from vist2_jax.config.schema import CurriculumPoint
    from vist2_jax.evaluation.context import row_maker
    from vist2_jax.evaluation.ocr import held_out_chunks

    documents, _ = load_samples("embedded", sp_tokenizer, "olm")
    split = DocumentSplit(documents)
    held = [d.tokens.astype(np.int32).tobytes() for d in documents if split.is_held_out(d.location)]
    kept = [d.tokens.astype(np.int32).tobytes() for d in documents if not split.is_held_out(d.location)]
    assert 2 <= len(held) <= 20 and len(held) + len(kept) == 178

    def inside(piece, texts):  # a contiguous token run of one of the texts (4-byte aligned)
        return any(any(at % 4 == 0 for at in _finds(text, piece)) for text in texts)

    overrides = ["preset=tiny", "model.decoder.vocab_size=1024", "model.layout.image_size=64",
                 "model.layout.visual_len=4", "model.layout.text_len=16", "data.seq_len=160",
                 "data.global_batch_size=8", "data.images_per_row=8", "data.eval_rows=16",
                 "data.font_sizes=[8,7]", "data.curriculum=[{start_step: 0, text_len: 16, max_chunks: 4}]"]
    for stage in ("olm", "sft"):
        config = load_config(overrides=[*overrides, f"data.stage={stage}", f"data.tokenizer={sp_tokenizer.path}"])
        pipeline = build_pipeline(config, "unused")
        chunk = pipeline.tokenizer.chunk_id
        for i in range(48):
            for piece in _text_of_segments(pipeline.row_maker(i), chunk):
                assert not inside(piece, held), f"{stage} training row {i} holds a held-out document"
        for batch in pipeline.eval_batches():
            for r in range(len(batch["tokens"])):
                for piece in _text_of_segments({k: v[r] for k, v in batch.items()}, chunk):
                    assert inside(piece, held)
    ctx = EvalContext(config, None, pipeline.tokenizer)
    chunks = held_out_chunks(row_maker(ctx, "ocr", CurriculumPoint(text_len=16, max_chunks=1)), 16, 24)
    assert len(chunks) == 24 and all(inside(np.asarray(t, np.int32).tobytes(), held) for t, *_ in chunks)


def _finds(text: bytes, piece: bytes):
    at = text.find(piece)
    while at >= 0:
        yield at
        at = text.find(piece, at + 1)


def test_each_ratio_is_measured_in_the_window_its_curriculum_trains():
    """The compression table cuts documents for L into the chunks per window of the last
    curriculum point at L (8 x 16, 6 x 32, 3 x 64), not the final point's 3 for every L."""
    from vist2_jax.config import load_config
    from vist2_jax.evaluation.context import window_at

    config = load_config(overrides=[
        "preset=tiny", "data.seq_len=256", "train.steps=30",
        "data.curriculum=[{start_step: 0, text_len: 16, max_chunks: 8}, {start_step: 10, text_len: 32, max_chunks: 6},"
        " {start_step: 20, text_len: 64, max_chunks: 3}]"])
    assert [window_at(config, length).max_chunks for length in (16, 32, 64)] == [8, 6, 3]
    assert window_at(config, 48).max_chunks == 3  # no point at L=48: the final point's window
    assert window_at(load_config(overrides=["preset=tiny", "data.images_per_row=1"]), 16).max_chunks == 2
