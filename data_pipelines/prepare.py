"""``vist2 data prepare``: raw files -> a prepared folder (``prepared.py``), in parallel,
resumable.

The inputs (``.txt``, ``.jsonl``, ``.jsonl.gz``, ``.parquet`` below SOURCE, a caption
folder, or a manual-dir layout of ``readers.LAYOUTS``) are listed in a fixed order and
grouped into units of about ``shard_mb`` of input; each unit becomes one shard, written
whole (``storage.open_atomic``; OUT may be ``gs://``), then marked done. An interrupted run leaves finished
units marked, so running it again redoes only the rest; ``plan.json`` pins the inputs
and options, so a resumed run cannot mix two preparations. Every bad record is counted
and written with its file:line to ``bad_records.jsonl``, never dropped silently.
Documents longer than ``max_chars`` are stored as consecutive pieces cut at whitespace,
so reading one stays cheap (a window never crosses a piece). With a tokenizer the token
ids are stored as well (tokenized in the prepare workers, once for all hosts).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import multiprocessing
import time
from pathlib import Path

import numpy as np
from etils import epath

from data_pipelines.prepared import (BAD_RECORDS, CAPTION, CHAT, DOC, FORMAT, MANIFEST, PLAN,
                                     encode_record, read_manifest, record_checksum, tokenizer_fingerprint)
from data_pipelines.readers import LAYOUTS, caption_folder_records, layout_files, text_file_records
from data_pipelines.records import BadInput, Record, caption_lines, content_problem, problem_kind
from vist2_jax import storage

log = logging.getLogger(__name__)
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
LOGGED_BAD = 20  # bad records logged one by one; all of them are in bad_records.jsonl


def input_files(source: Path, layout: str) -> list[Path]:
    if layout == "captions":
        if not source.is_dir():
            raise BadInput(f"SOURCE: {source} is not a caption folder")
        return [source]
    if layout != "text":
        return layout_files(layout, source, what_key="SOURCE")
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise BadInput(f"SOURCE: {source} is neither a file nor a folder")
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
    if not files:
        raise BadInput(f"SOURCE: {source} holds no {', '.join(TEXT_SUFFIXES)} files")
    return files


def plan_units(files: list[Path], shard_bytes: int) -> list[list[Path]]:
    """Consecutive files grouped into units of at least ``shard_bytes`` of input."""
    units, size = [[]], 0
    for path in files:
        if units[-1] and size >= shard_bytes:
            units.append([])
            size = 0
        units[-1].append(path)
        size += path.stat().st_size if path.is_file() else 0
    return units


def _read(path: Path, layout: str):
    if layout == "captions":
        return caption_folder_records(path)
    return LAYOUTS[layout][2](path) if layout != "text" else text_file_records(path)


def split_text(text: str, max_chars: int) -> list[str]:
    """``text`` as consecutive pieces of at most ``max_chars`` cut after whitespace (a piece
    with no whitespace is cut hard); joined they give ``text`` back."""
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = max(text.rfind(" ", start, start + max_chars), text.rfind("\n", start, start + max_chars))
        cut = cut + 1 if cut > start else start + max_chars
        pieces.append(text[start:cut])
        start = cut
    return pieces + [text[start:]]


def _image_bytes(record: Record) -> bytes:
    if isinstance(record.image, bytes):
        return record.image
    return Path(record.image).read_bytes()


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str):
    from data_pipelines.tokenizer import load_tokenizer

    return load_tokenizer(path)


def _token_ids(piece: Record, kind: int, tokenizer) -> list[list[int]]:
    if tokenizer is None:
        return []
    if kind == CAPTION:
        return [tokenizer.encode(line) for line in caption_lines(piece.text)]
    return [tokenizer.encode(piece.text)] + ([tokenizer.encode(piece.prompt)] if kind == CHAT else [])


def prepare_unit(out: str, number: int, files: list[str], layout: str, max_chars: int,
                 tokenizer: str = "") -> dict:
    """Write shard ``number`` from ``files``; returns its counts (also saved as the done mark)."""
    shards = storage.as_path(out) / "shards"
    tok = _tokenizer(tokenizer) if tokenizer else None
    name = f"{number:05d}"
    rows, bad, offset = [], [], 0
    counts = {"read": 0, "good": 0, "bad": 0, "bad_kinds": {}}
    digest = hashlib.sha256()
    with storage.open_atomic(shards / f"{name}.bin") as f:
        for path in files:
            for record in _read(Path(path), layout):
                counts["read"] += 1
                problem = content_problem(record)
                image = b""
                if not problem and record.image is not None:
                    try:
                        image = _image_bytes(record)
                    except OSError as err:
                        problem = f"image cannot be read ({err.strerror or err})"
                if problem:
                    counts["bad"] += 1
                    kind = problem_kind(problem)
                    counts["bad_kinds"][kind] = counts["bad_kinds"].get(kind, 0) + 1
                    bad.append({"location": record.location, "problem": problem})
                    continue
                counts["good"] += 1
                if image:
                    pieces, kind, lines = [record], CAPTION, len(caption_lines(record.text))
                elif record.prompt:
                    pieces, kind, lines = [record], CHAT, 0
                else:
                    texts = split_text(record.text, max_chars)
                    pieces = [Record(t, None, record.location if len(texts) == 1 else
                                     f"{record.location} part {i + 1}/{len(texts)}")
                              for i, t in enumerate(texts)]
                    kind, lines = DOC, 0
                for piece in pieces:
                    payload = encode_record(piece, image, _token_ids(piece, kind, tok))
                    f.write(payload)
                    digest.update(payload)
                    rows.append((offset, len(payload), kind, lines, record_checksum(payload)))
                    offset += len(payload)
    counts["shard"] = {"bytes": offset, "sha256": digest.hexdigest()}
    with storage.open_atomic(shards / f"{name}.npy") as f:
        np.save(f, np.asarray(rows, np.int64).reshape(-1, 5))
    storage.write_atomic(shards / f"{name}.bad.jsonl", "".join(json.dumps(b, ensure_ascii=False) + "\n" for b in bad))
    storage.write_atomic(shards / f"{name}.done.json", json.dumps(counts))  # written last: the unit is finished
    return counts


def _prepare_unit_star(args) -> tuple[int, dict]:
    return args[1], prepare_unit(*args)


def _finish(out: epath.Path, plan: dict, counts: list[dict]) -> dict:
    """Join the shards' indexes into the global ones; the manifest is written last."""
    records, kinds, lines = [], [], []
    for number in range(len(plan["units"])):
        with (out / "shards" / f"{number:05d}.npy").open("rb") as f:
            table = np.load(f)
        records.append(np.column_stack([np.full(len(table), number, np.int64), table[:, :2], table[:, 4]]))
        kinds.append(table[:, 2])
        lines.append(table[:, 3])
    records = np.concatenate(records) if records else np.zeros((0, 4), np.int64)
    kinds, lines = np.concatenate(kinds), np.concatenate(lines)
    numbers = np.arange(len(kinds), dtype=np.int64)
    captions = np.flatnonzero(kinds == CAPTION)
    caption_pairs = np.column_stack([np.repeat(captions, lines[captions]),
                                     np.concatenate([np.arange(n) for n in lines[captions]] or [[]])])
    tables = {"records": records, "doc": numbers[kinds != CAPTION], "chat": numbers[kinds == CHAT],
              "caption": caption_pairs.astype(np.int64).reshape(-1, 2)}
    files = {}
    for name, table in tables.items():
        data = io.BytesIO()
        np.save(data, table)
        storage.write_atomic(out / f"{name}.npy", data.getvalue())
        files[f"{name}.npy"] = {"bytes": len(data.getvalue()), "sha256": hashlib.sha256(data.getvalue()).hexdigest()}
    for number, unit in enumerate(counts):
        files[f"shards/{number:05d}.bin"] = unit["shard"]
    with (out / BAD_RECORDS).open("w") as f:
        for number in range(len(plan["units"])):
            f.write((out / "shards" / f"{number:05d}.bad.jsonl").read_text())
    total = {"read": 0, "good": 0, "bad": 0, "bad_kinds": {}}
    for unit in counts:
        for key in ("read", "good", "bad"):
            total[key] += unit[key]
        for kind, n in unit["bad_kinds"].items():
            total["bad_kinds"][kind] = total["bad_kinds"].get(kind, 0) + n
    total.update(stored=len(records), doc=len(tables["doc"]), chat=len(tables["chat"]),
                 caption=len(tables["caption"]), caption_records=len(captions))
    manifest = {"format": FORMAT, **{k: plan[k] for k in ("source", "layout", "max_chars", "tokenizer_sha256")},
                "shards": len(plan["units"]), "counts": total, "files": files}
    storage.write_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def prepare(source: str, out: str, *, workers: int = 1, layout: str = "text", max_chars: int = 100_000,
            shard_mb: float = 64, tokenizer: str = "", progress: bool = True) -> dict:
    """Prepare ``source`` into ``out`` (resuming a run that was interrupted); returns the
    manifest plus ``units_resumed`` (units found done) and ``seconds``. With ``tokenizer``
    (a file) the token ids are stored too, and runs with that tokenizer read them."""
    if layout not in ("text", "captions", *LAYOUTS):
        raise BadInput(f"--layout: {layout!r} is not one of text, captions, {', '.join(LAYOUTS)}")
    start = time.perf_counter()
    files = input_files(Path(source), layout)
    units = plan_units(files, int(shard_mb * 2**20))
    sha = tokenizer_fingerprint(_tokenizer(tokenizer)) if tokenizer else ""
    plan = {"format": FORMAT, "source": str(Path(source).resolve()), "layout": layout, "max_chars": max_chars,
            "tokenizer": tokenizer, "tokenizer_sha256": sha,
            "units": [[[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in unit] for unit in units]}
    root = storage.as_path(out)
    (root / "shards").mkdir(parents=True, exist_ok=True)
    if (root / PLAN).exists():
        if json.loads((root / PLAN).read_text()) != plan:
            raise BadInput(f"--out: {out} holds a preparation of other inputs or options; "
                           "remove it or choose another --out")
        if (root / MANIFEST).exists():
            return {**read_manifest(out), "units_resumed": len(units), "seconds": time.perf_counter() - start}
    else:
        (root / PLAN).write_text(json.dumps(plan))
    counts: dict[int, dict] = {}
    for number in range(len(units)):
        done = root / "shards" / f"{number:05d}.done.json"
        if done.exists():
            counts[number] = json.loads(done.read_text())
    resumed = len(counts)
    todo = [(str(root), n, [str(p) for p in unit], layout, max_chars, tokenizer)
            for n, unit in enumerate(units) if n not in counts]
    sizes = {n: sum(p[1] for p in plan["units"][n]) for n in range(len(units))}
    _run(todo, workers, counts, sizes, progress, total=sum(sizes.values()),
         initial=sum(sizes[n] for n in counts))
    manifest = _finish(root, plan, [counts[n] for n in range(len(units))])
    return {**manifest, "units_resumed": resumed, "seconds": time.perf_counter() - start}


def _run(todo, workers, counts, sizes, progress, total, initial) -> None:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, disable=not progress,
               desc="prepare", dynamic_ncols=True)
    logged = 0

    def done(number: int, unit: dict) -> None:
        nonlocal logged
        counts[number] = unit
        bar.update(sizes[number])
        bar.set_postfix(good=sum(c["good"] for c in counts.values()), bad=sum(c["bad"] for c in counts.values()))
        if unit["bad"] and logged < LOGGED_BAD:
            for line in (storage.as_path(todo[0][0]) / "shards" / f"{number:05d}.bad.jsonl").read_text().splitlines():
                if logged < LOGGED_BAD:
                    bad = json.loads(line)
                    log.warning("bad record %s: %s", bad["location"], bad["problem"])
                    logged += 1

    try:
        if workers <= 1 or len(todo) <= 1:
            for args in todo:
                done(*_prepare_unit_star(args))
        else:
            with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
                for number, unit in pool.imap_unordered(_prepare_unit_star, todo):
                    done(number, unit)
    finally:
        bar.close()
