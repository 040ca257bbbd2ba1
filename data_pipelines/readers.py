"""File readers: raw files -> ``Record``s, bad ones included (with ``error``).

* ``.txt``: one document per file; ``.jsonl`` (or ``.jsonl.gz``, or parquet rows):
  ``{"text": ...}`` documents or ``{"prompt", "response"}`` / ``{"messages": [...]}`` chats.
* caption folders: ``NAME.jpg`` (any of ``IMAGE_SUFFIXES``) + ``NAME.txt``, or a
  ``captions.jsonl`` of ``{"file": ..., "caption": ...}``.
* the manual-dir layouts of the paper's corpora (``LAYOUT_READERS``): arXiv ``.tex``,
  WuDao ``.json`` lists, COCO caption annotations.

A bad record is *yielded* with ``error`` set, never raised from inside the generator
(that would end the source at the first bad record); callers skip, count and log it.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import re
from pathlib import Path
from typing import Iterator

from data_pipelines.images import IMAGE_SUFFIXES
from data_pipelines.records import BadInput, Record


def _chat_record(record: dict) -> tuple[str, str] | None:
    if "prompt" in record and "response" in record:
        return str(record["prompt"]), str(record["response"])
    messages = record.get("messages")
    if isinstance(messages, list):
        users = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        answers = [m.get("content", "") for m in messages if isinstance(m, dict) and m.get("role") == "assistant"]
        if users and answers:
            return "\n".join(users), answers[-1]
    return None


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a file, streamed; ``.gz`` files are decompressed."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        yield from enumerate(f, start=1)


def json_lines(path: Path) -> Iterator[tuple[str, dict | None, str]]:
    """(location, object or None, error) per non-blank line of a ``.jsonl`` / ``.jsonl.gz``."""
    for number, line in _lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            yield where, None, f"not valid UTF-8 ({err.reason} at byte {err.start})"
            continue
        except json.JSONDecodeError as err:
            yield where, None, f"malformed or truncated JSONL line ({err.msg} at column {err.colno})"
            continue
        if not isinstance(record, dict):
            yield where, None, "a record must be a JSON object"
            continue
        yield where, record, ""


def object_record(record: dict, where: str) -> Record:
    """A decoded JSON object (a JSONL line, a parquet row) as a document or chat record."""
    chat = _chat_record(record)
    if chat is not None:
        return Record(chat[1], chat[0], where)
    if isinstance(record.get("text"), str):
        return Record(record["text"], None, where)
    return Record("", None, where, "record has neither 'text' nor prompt/response fields")


def whole_file_record(path: Path) -> Record:
    """One UTF-8 file as one document."""
    try:
        return Record(path.read_bytes().decode("utf-8"), None, str(path))
    except UnicodeDecodeError as err:
        return Record("", None, str(path), f"not valid UTF-8 ({err.reason} at byte {err.start})")


def text_file_records(path: Path) -> Iterator[Record]:
    """The records of one ``.txt``, ``.jsonl``, ``.jsonl.gz`` or ``.parquet`` file."""
    if path.suffix == ".txt":
        yield whole_file_record(path)
    elif path.suffix == ".parquet":
        yield from parquet_records(path)
    else:
        for where, record, error in json_lines(path):
            yield Record("", None, where, error) if error else object_record(record, where)


def parquet_records(path: Path) -> Iterator[Record]:
    """Rows of a parquet file (``text`` or ``prompt``/``response`` / ``messages`` columns),
    located as ``FILE:row N`` (1-based), read one row group at a time."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a file it cannot open
        yield Record("", None, str(path), f"unreadable parquet ({type(err).__name__}: {err})")
        return
    number = 0
    for group in range(table.num_row_groups):
        for row in table.read_row_group(group).to_pylist():
            number += 1
            yield object_record(row, f"{path}:row {number}")


def caption_folder_records(folder: Path) -> Iterator[Record]:
    """Image + caption records of a folder (``captions.jsonl`` wins over sidecar ``.txt``)."""
    index = folder / "captions.jsonl"
    if index.is_file():
        for where, record, error in json_lines(index):
            if not error:
                file = record.get("file", record.get("image"))
                caption = record.get("caption", record.get("text"))
                if not isinstance(file, str) or not isinstance(caption, str):
                    error = "record needs string 'file' and 'caption' fields"
                elif not (folder / file).is_file():
                    error = f"image {folder / file} does not exist"
            yield (Record("", None, where, error) if error else
                   Record(caption, None, f"{where} ({folder / file})", image=str(folder / file)))
        return
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise BadInput(f"data.source: {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}) "
                       "and no captions.jsonl for stage caption")
    for image in images:
        sidecar = image.with_suffix(".txt")
        if not sidecar.is_file():
            yield Record("", None, str(image), f"no caption file {sidecar.name} beside the image")
            continue
        for record in text_file_records(sidecar):
            yield dataclasses.replace(record, location=str(image), image=str(image))


def arxiv_records(path: Path) -> Iterator[Record]:
    """arXiv: a ``.tex`` source is one document; ``.jsonl`` shards hold ``{"text"}`` lines."""
    yield from ([whole_file_record(path)] if path.suffix == ".tex" else text_file_records(path))


def wudao_records(path: Path) -> Iterator[Record]:
    """WuDaoCorpora 2.0: a JSON list of ``{"title", "content"}``, one record per item."""
    try:
        items = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        yield Record("", None, str(path), f"unreadable WuDao JSON ({err})")
        return
    for i, item in enumerate(items if isinstance(items, list) else [items]):
        where = f"{path}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            yield Record("", None, where, "item has no 'content' string")
            continue
        title = item.get("title") if isinstance(item.get("title"), str) else ""
        yield Record(f"{title}\n{item['content']}" if title else item["content"], None, where)


def coco_records(path: Path) -> Iterator[Record]:
    """COCO ``annotations/captions_<split>.json``: one record per image (its captions one per
    line, ``image`` the file's bytes) from the ``<split>/`` folder beside ``annotations/``."""
    split = re.sub(r"^captions_", "", Path(path).stem)
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    captions: dict[int, list[str]] = {}
    for ann in data.get("annotations", []):
        captions.setdefault(ann["image_id"], []).append(" ".join(str(ann["caption"]).split()))
    for image in data.get("images", []):
        file = Path(path).parents[1] / split / image["file_name"]
        where = f"{path}:image {image['id']} ({file})"
        if not file.is_file():
            yield Record("", None, where, f"image {file} does not exist")
            continue
        text = "\n".join(captions.get(image["id"], []))
        yield Record(text, None, where, "" if text else "image has no captions", file.read_bytes())


# Manual-dir layouts of the paper's corpora: name -> (what, file patterns, per-file reader).
LAYOUTS = {
    "text_folder": ("your .txt documents and .jsonl records", ("**/*.txt", "**/*.jsonl"), text_file_records),
    "gutenberg": ("Project Gutenberg books as UTF-8 .txt files (e.g. PG-19 train/)", ("**/*.txt",),
                  text_file_records),
    "arxiv": ("arXiv papers as .jsonl {\"text\": ...} shards or .tex sources", ("**/*.jsonl", "**/*.tex"),
              arxiv_records),
    "wudao": ("WuDaoCorpora2.0 .json files (lists of {\"title\", \"content\"})", ("**/*.json",), wudao_records),
    "narrativexl": ("NarrativeXL books (.txt) and/or .jsonl prompt/response records",
                    ("**/*.txt", "**/*.jsonl"), text_file_records),
    "coco_captions": ("COCO annotations/captions_<split>.json and <split>/ image folders",
                      ("annotations/captions_*.json",), coco_records),
}


def layout_files(name: str, folder, what_key: str = "data.manual_dir") -> list[Path]:
    """The input files of layout ``name`` in ``folder``; BadInput naming the folder, the
    expected pattern and ``what_key`` when there are none."""
    what, patterns, _ = LAYOUTS[name]
    instructions = f"put {what} there, matching {' or '.join(patterns)}"
    label = f"tfds:{name}" if what_key == "data.manual_dir" else f"--layout {name}"
    path = Path(str(folder)) if folder else None
    if path is None or not path.is_dir():
        raise BadInput(f"{label}: manual folder {path} does not exist; {instructions} (or set {what_key})")
    files = sorted({p for pattern in patterns for p in path.glob(pattern) if p.is_file()})
    if not files:
        raise BadInput(f"{label}: no files matching {' or '.join(patterns)} in {path}; "
                       f"{instructions} (or set {what_key})")
    return files
