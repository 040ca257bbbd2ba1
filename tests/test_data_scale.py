"""Data at pretraining scale: a prepared source read lazily gives the rows the in-memory
path gives; hosts read disjoint slices that cover the data; the iterator resumes mid-epoch;
a mixture follows its weights; ``data prepare`` counts bad records with file:line and
resumes; ``bench data --scale-mb`` runs."""

import gzip
import hashlib
import json
import shutil

import numpy as np
import pytest

from data_pipelines.corpus import embedded_documents
from data_pipelines.pipeline import build_pipeline, resolve_tokenizer
from data_pipelines.prepare import prepare, split_text
from data_pipelines.prepared import is_prepared
from data_pipelines.records import BadInput
from vist2_jax.cli.main import main
from vist2_jax.config import load_config
from vist2_jax.row_contract import TEXT, VISUAL

SMALL = ["model.decoder.num_layers=2", "model.vision.num_layers=2", "data.seq_len=256",
         "data.global_batch_size=2", "data.images_per_row=4", "train.steps=3", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return resolve_tokenizer(load_config(), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Raw text the in-memory path reads too: .txt documents, a .jsonl of documents and a
    chat, and one malformed line."""
    root = tmp_path_factory.mktemp("raw")
    docs = embedded_documents()
    for i in range(6):
        (root / f"doc{i}.txt").write_text(docs[i], encoding="utf-8")
    lines = [json.dumps({"text": d}) for d in docs[6:12]]
    lines[2] = "{not json"
    lines.append(json.dumps({"prompt": docs[12][:300], "response": docs[13]}))
    lines.append(json.dumps({"messages": [{"role": "user", "content": docs[14][:200]},
                                          {"role": "assistant", "content": docs[15]}]}))
    (root / "more.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def prepared(folder, tokenizer, tmp_path_factory):
    """``folder`` prepared twice: tokenized on read, and with the token ids stored."""
    out = tmp_path_factory.mktemp("prepared")
    prepare(str(folder), str(out / "plain"), progress=False)
    prepare(str(folder), str(out / "ids"), tokenizer=tokenizer.path, workers=2, shard_mb=0.01, progress=False)
    return out


def _pipeline(workdir, tokenizer, *overrides, process_index=0, process_count=1):
    config = load_config(overrides=[*SMALL, f"data.tokenizer={tokenizer.path}", *overrides])
    return build_pipeline(config, workdir, process_index, process_count)


def _digest(row) -> str:
    h = hashlib.sha256()
    for key in sorted(row):
        h.update(key.encode() + np.ascontiguousarray(row[key]).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("kind", ["plain", "ids"])
@pytest.mark.parametrize("stage", ["olm", "ocr", "sft"])
def test_lazy_rows_equal_in_memory_rows(stage, kind, folder, prepared, tokenizer, tmp_path):
    memory = _pipeline(tmp_path, tokenizer, f"data.source={folder}", f"data.stage={stage}")
    lazy = _pipeline(tmp_path, tokenizer, f"data.source={prepared / kind}", f"data.stage={stage}")
    assert lazy.row_maker.samples.pretokenized == (kind == "ids")
    assert len(lazy.row_maker.samples) == len(memory.row_maker.samples) > 0
    assert lazy.source_counters["records"] == memory.source_counters["records"]
    assert lazy.source_counters["skipped"] == memory.source_counters["skipped"]
    for i in range(4):
        a, b = memory.row_maker(i), lazy.row_maker(i)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{stage} row {i} {key}")


def test_evaluation_reads_the_held_out_documents_of_a_prepared_source_lazily(folder, prepared, tokenizer):
    """``train.eval_tasks`` and ``vist2 eval`` on a prepared (lazy) source: the memory rows
    and OCR chunks of the folder read in memory, so the same figures (it used to read the
    prepared folder as raw text: 'holds no documents')."""
    from data_pipelines.prepared import PreparedSamples
    from vist2_jax.config.schema import CurriculumPoint
    from vist2_jax.evaluation.context import EvalContext, row_maker
    from vist2_jax.evaluation.ocr import held_out_chunks

    point = CurriculumPoint(text_len=32, max_chunks=3)
    made = {}
    for source in (folder, prepared / "plain", prepared / "ids"):
        ctx = EvalContext(load_config(overrides=[*SMALL, f"data.source={source}"]), None, tokenizer)
        olm = row_maker(ctx, "olm", point)
        ocr = held_out_chunks(row_maker(ctx, "ocr", point), 32, 6)
        made[source] = ([olm(i) for i in range(3)], [(list(t), text) for t, text, *_ in ocr], olm)
    want_rows, want_chunks, memory = made[folder]
    assert len(want_chunks) == 6 and not isinstance(memory.samples, PreparedSamples)
    for source in (prepared / "plain", prepared / "ids"):
        rows, chunks, lazy = made[source]
        assert isinstance(lazy.samples, PreparedSamples) and chunks == want_chunks
        for want, got in zip(want_rows, rows):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{source} {key}")


def test_lazy_caption_rows_equal_in_memory_rows(tmp_path, tokenizer):
    from PIL import Image

    folder = tmp_path / "caps"
    folder.mkdir()
    for i, color in enumerate([(200, 0, 0), (0, 150, 0), (0, 0, 220)]):
        Image.new("RGB", (40 + 10 * i, 30), color).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a box of colour {i}\nanother caption {i}", encoding="utf-8")
    prepare(str(folder), str(tmp_path / "prep"), layout="captions", progress=False)
    memory = _pipeline(tmp_path, tokenizer, f"data.source={folder}", "data.stage=caption")
    lazy = _pipeline(tmp_path, tokenizer, f"data.source={tmp_path / 'prep'}", "data.stage=caption")
    assert len(lazy.row_maker.captions) == len(memory.row_maker.captions) == 6
    for i in range(3):
        a, b = memory.row_maker(i), lazy.row_maker(i)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"caption row {i} {key}")


def test_prepared_source_on_a_bucket_gives_the_local_rows(folder, prepared, tokenizer, tmp_path, gcs_bucket):
    """``data prepare --out gs://...`` (a Cloud Storage emulator) and rows read from it, in a
    Grain worker process, equal the rows of the same folder prepared on local disk."""
    out = f"{gcs_bucket}/prepared/{tmp_path.name}"
    prepare(str(folder), out, tokenizer=tokenizer.path, shard_mb=0.01, progress=False)
    assert is_prepared(out)
    overrides = ["data.stage=olm", "data.num_workers=1"]
    local = _pipeline(tmp_path, tokenizer, f"data.source={prepared / 'ids'}", *overrides)
    remote = _pipeline(tmp_path, tokenizer, f"data.source={out}", *overrides)
    assert remote.row_maker.samples.pretokenized and len(remote.row_maker.samples) == len(local.row_maker.samples)
    for want, got in zip(local.train_dataset(), remote.train_dataset()):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    with pytest.raises(BadInput, match="prepare"):  # a raw folder on a bucket: say what to do
        _pipeline(tmp_path, tokenizer, f"data.source={gcs_bucket}/raw-text-folder")


def test_two_hosts_read_disjoint_slices_that_cover_all_rows(prepared, tokenizer, tmp_path):
    hosts = [_pipeline(tmp_path, tokenizer, f"data.source={prepared / 'ids'}", "data.num_workers=1",
                       "data.global_batch_size=4", process_index=p, process_count=2) for p in range(2)]
    seen = []
    for host in hosts:
        rows = [{k: v[r] for k, v in batch.items()} for batch in host.train_dataset()
                for r in range(host.local_batch_size)]
        assert len(rows) == 3 * 2  # steps x local batch
        seen.append([_digest(row) for row in rows])
    assert not set(seen[0]) & set(seen[1])
    expected = [_digest(hosts[0].row_maker(i)) for i in range(3 * 4)]
    assert sorted(seen[0] + seen[1]) == sorted(expected)
    assert seen[0] == expected[0::2] and seen[1] == expected[1::2]  # host p reads rows p, p+2, ...


def test_iterator_state_restores_mid_epoch_on_the_lazy_path(prepared, tokenizer, tmp_path):
    overrides = [f"data.source={prepared / 'plain'}", "data.num_workers=1", "train.steps=6"]
    iterator = iter(_pipeline(tmp_path, tokenizer, *overrides).train_dataset())
    for _ in range(2):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(2)]
    iterator.close()
    restored = iter(_pipeline(tmp_path, tokenizer, *overrides).train_dataset())
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    restored.close()


def test_mixture_follows_its_weights(prepared, tokenizer, tmp_path):
    """Rows of an OLM source (weight 3) and synthetic captions (weight 1): over 20,000 rows
    the share of each is within 0.015 of 0.75 / 0.25 (about 4 standard deviations), and a
    row's layout is the one of the source drawn for it."""
    sources = (f"data.sources=[{{source: '{prepared / 'ids'}', weight: 3}}, "
               "{source: embedded, weight: 1, stage: caption}]")
    pipeline = _pipeline(tmp_path, tokenizer, sources)
    mixture = pipeline.row_maker
    picks = np.array([mixture.source_of(i) for i in range(20_000)])
    assert abs((picks == 0).mean() - 0.75) < 0.015 and abs((picks == 1).mean() - 0.25) < 0.015
    for i in range(24):
        row = mixture(i)
        first = row["modality"][row["modality"] > 0][0]
        assert first == (TEXT if picks[i] == 0 else VISUAL), i
    counters = mixture.counters
    assert counters["rows:0"] == (picks[:24] == 0).sum() and counters["rows:1"] == (picks[:24] == 1).sum()
    assert [mixture.source_of(i) for i in range(50)] == picks[:50].tolist()  # deterministic


def _messy_folder(root):
    root.mkdir()
    (root / "a.jsonl").write_text('{"text": "good one"}\n{broken\n{"text": "good two"}\n', encoding="utf-8")
    with gzip.open(root / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write('{"text": "zipped"}\n\n{"title": "no text"}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["from parquet", None]}), root / "c.parquet")
    (root / "d.txt").write_bytes(b"caf\xe9")
    (root / "e.txt").write_text("word " * 60, encoding="utf-8")


def test_prepare_counts_bad_records_with_file_line_and_resumes(tmp_path, capsys):
    _messy_folder(tmp_path / "raw")
    out = tmp_path / "prep"
    assert main(["data", "prepare", str(tmp_path / "raw"), "--out", str(out), "--workers", "2",
                 "--shard-mb", "0.000001", "--max-chars", "100", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "5 good records" in printed and "4 bad of 9 read" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["stored"] == 7 and manifest["shards"] == 5  # e.txt: 3 pieces of <= 100 chars
    bad = [json.loads(line)["location"] for line in (out / "bad_records.jsonl").read_text().splitlines()]
    raw = tmp_path / "raw"
    assert bad == [f"{raw / 'a.jsonl'}:2", f"{raw / 'b.jsonl.gz'}:3", f"{raw / 'c.parquet'}:row 2", str(raw / "d.txt")]
    before = {name: (out / name).read_bytes() for name in ("records.npy", "doc.npy", "bad_records.jsonl")}
    # An interrupted run: units 1 and 3 unfinished (a half-written shard left behind), no manifest.
    (out / "manifest.json").unlink()
    for unit in ("00001", "00003"):
        (out / "shards" / f"{unit}.done.json").unlink()
        (out / "shards" / f"{unit}.bin").unlink()
    (out / "shards" / "00001.bin.tmp").write_bytes(b"partial")
    with pytest.raises(BadInput, match="unfinished preparation"):
        is_prepared(str(out))
    result = prepare(str(raw), str(out), shard_mb=0.000001, max_chars=100, progress=False)
    assert result["units_resumed"] == 3 and result["counts"] == manifest["counts"]
    assert all((out / name).read_bytes() == data for name, data in before.items())
    (raw / "f.txt").write_text("a new file", encoding="utf-8")
    with pytest.raises(BadInput, match="holds a preparation of other inputs"):
        prepare(str(raw), str(out), shard_mb=0.000001, max_chars=100, progress=False)


def test_prepared_source_with_bad_records_stops_under_fail(tmp_path, tokenizer):
    _messy_folder(tmp_path / "raw")
    prepare(str(tmp_path / "raw"), str(tmp_path / "prep"), progress=False)
    with pytest.raises(BadInput, match=r"a\.jsonl:2: malformed"):
        _pipeline(tmp_path, tokenizer, f"data.source={tmp_path / 'prep'}", "data.bad_input=fail")
    lazy = _pipeline(tmp_path, tokenizer, f"data.source={tmp_path / 'prep'}")
    assert lazy.source_counters["skipped"] == 4 and len(lazy.row_maker.samples) == 5


def test_split_text_keeps_every_character():
    text = "alpha beta gamma\ndelta " * 40 + "x" * 250
    pieces = split_text(text, 100)
    assert "".join(pieces) == text and max(map(len, pieces)) <= 100 and len(pieces) > 5


def test_bench_data_scale_mode(tmp_path, tokenizer):
    out = tmp_path / "scale.json"
    code = main(["bench", "data", "--scale-mb", "0.2", "0.4", "--workers", "0", "--batches", "2", "--repeats", "1",
                 "--tokenizer", tokenizer.path, "--scale-dir", str(tmp_path / "scale"), "--json", str(out),
                 "--set", "data.seq_len=256", "--set", "data.global_batch_size=2"])
    assert code == 0
    result = json.loads(out.read_text())
    for size in ("0.2", "0.4"):
        run = result["by_size_mb"][size]["by_workers"]["0"]
        assert run["rows_per_s_median"] > 0 and run["startup_s"] > 0 and run["rss_total_mb"] > 50
    assert "0" in result["ratio_large_to_small"]
    assert not list((tmp_path / "scale").glob("raw_*")) and not list((tmp_path / "scale").glob("prepared_*"))
    shutil.rmtree(tmp_path / "scale")


def test_mixture_config_errors_name_the_key():
    from vist2_jax.config.schema import ConfigError

    with pytest.raises(ConfigError, match=r"^data\.sources\[1\]\.weight: must be positive$"):
        load_config(overrides=["data.sources=[{source: embedded}, {source: embedded, weight: 0}]"])
    with pytest.raises(ConfigError, match=r"^data\.sources: set data\.source or data\.sources, not both$"):
        load_config(overrides=["data.source=/somewhere", "data.sources=[{source: embedded}]"])
    with pytest.raises(ConfigError, match=r"^data\.sources\[0\]\.stage"):
        load_config(overrides=["data.sources=[{source: embedded, stage: pretrain}]"])


@pytest.fixture(scope="module")
def clean(tokenizer, tmp_path_factory):
    """Six documents without a bad record, prepared with their token ids into 3 shards."""
    root = tmp_path_factory.mktemp("clean")
    for i, doc in enumerate(embedded_documents()[:6]):
        (root / "raw").mkdir(exist_ok=True)
        (root / "raw" / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    prepare(str(root / "raw"), str(root / "prep"), tokenizer=tokenizer.path, shard_mb=0.005, progress=False)
    return root / "prep"


def _damaged_copy(clean, tmp_path, damage):
    out = tmp_path / "damaged"
    shutil.copytree(clean, out)
    damage(out)
    return out


def _damage_first_shard(out):
    shard = out / "shards" / "00000.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # finite garbage: nothing else catches it
    shard.write_bytes(bytes(data))
    return shard


def test_a_damaged_shard_is_skipped_and_counted_or_stops_naming_the_file(clean, tokenizer, tmp_path):
    """Bytes damaged in a shard are never read as a row: each record read is checked against
    its CRC-32; ``bad_input=skip`` counts and skips it, ``fail`` stops naming the shard."""
    out = _damaged_copy(clean, tmp_path, _damage_first_shard)
    lazy = _pipeline(tmp_path, tokenizer, f"data.source={out}")
    damaged = [i for i in range(len(lazy.row_maker.samples)) if not _readable(lazy.row_maker.samples, i)]
    assert damaged  # the damaged record(s) of shard 0
    with pytest.raises(BadInput, match=r"shards/00000\.bin: damaged shard: checksum differs"):
        lazy.row_maker.samples[damaged[0]]
    rows = [lazy.row_maker(i) for i in range(12)]
    assert lazy.row_maker.counters["skipped_damaged"] > 0 and all(r["tokens"].any() for r in rows)
    strict = _pipeline(tmp_path, tokenizer, f"data.source={out}", "data.bad_input=fail")
    with pytest.raises(BadInput, match=r"00000\.bin: damaged shard.*data\.bad_input=fail"):
        for i in range(12):
            strict.row_maker(i)


def _readable(samples, i):
    try:
        samples[i]
        return True
    except BadInput:
        return False


@pytest.mark.parametrize("damage", ["truncated records.npy", "changed doc.npy"])
def test_a_damaged_index_is_one_line_naming_the_file(clean, tokenizer, tmp_path, damage):
    def harm(out):
        if damage.startswith("truncated"):
            (out / "records.npy").write_bytes((out / "records.npy").read_bytes()[:-40])
        else:
            data = bytearray((out / "doc.npy").read_bytes())
            data[-8] ^= 1  # a valid record number, another record: only the checksum sees it
            (out / "doc.npy").write_bytes(bytes(data))

    out = _damaged_copy(clean, tmp_path, harm)
    name = damage.split()[1]
    with pytest.raises(BadInput, match=rf"{name}: damaged index file") as err:
        _pipeline(tmp_path, tokenizer, f"data.source={out}")
    assert "\n" not in str(err.value)
