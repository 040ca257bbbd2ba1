"""Record sources: the embedded corpus, a local folder, or a TFDS ArrayRecord dataset.

* folder, text stages: each ``.txt`` file is one document; ``.jsonl`` lines are
  ``{"text": ...}`` documents or ``{"prompt", "response"}`` / ``{"messages": [...]}`` chats.
* folder, caption stage: ``NAME.jpg`` (any of ``IMAGE_SUFFIXES``) + ``NAME.txt``, or a
  ``captions.jsonl`` of ``{"file": ..., "caption": ...}``; each non-empty caption line is
  one sample.
* ``tfds:NAME``: records read with ``tfds.data_source`` (see ``tfds_builders``).

Bad records (invalid UTF-8, malformed JSON, missing fields, empty text, control
characters, a missing image) are *yielded* with ``error`` set, never raised from inside
the generator (that would end the source at the first bad record). ``load_samples`` then
skips, counts and logs each with its location (``bad_input=skip``) or stops (``fail``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from data_pipelines.images import IMAGE_SUFFIXES
from data_pipelines.stages import BadInput, Sample

log = logging.getLogger(__name__)
# C0/C1 control characters other than tab, newline, carriage return and form feed: a
# sketch could only show them as markers, so such a record is bad input, not rewritten.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f]")


@dataclasses.dataclass(frozen=True)
class Record:
    """One source record; ``error`` says why it is unusable. ``image``: path, bytes or
    a lazy TFDS reference (caption records)."""

    text: str
    prompt: str | None = None
    location: str = ""
    error: str = ""
    image: object = None


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


def _json_lines(path: Path) -> Iterator[tuple[str, dict | None, str]]:
    """(location, object or None, error) per non-blank line of a JSONL file."""
    for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
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


def text_file_records(path: Path) -> Iterator[Record]:
    """The records of one ``.txt`` or ``.jsonl`` file."""
    if path.suffix == ".txt":
        try:
            yield Record(path.read_bytes().decode("utf-8"), None, str(path))
        except UnicodeDecodeError as err:
            yield Record("", None, str(path), f"not valid UTF-8 ({err.reason} at byte {err.start})")
        return
    for where, record, error in _json_lines(path):
        if error:
            yield Record("", None, where, error)
            continue
        chat = _chat_record(record)
        if chat is not None:
            yield Record(chat[1], chat[0], where)
        elif isinstance(record.get("text"), str):
            yield Record(record["text"], None, where)
        else:
            yield Record("", None, where, "record has neither 'text' nor prompt/response fields")


def caption_folder_records(folder: Path) -> Iterator[Record]:
    """Image + caption records of a folder (``captions.jsonl`` wins over sidecar ``.txt``)."""
    index = folder / "captions.jsonl"
    if index.is_file():
        for where, record, error in _json_lines(index):
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


def iter_records(source: str, stage: str = "olm", data_dir: str = "",
                 manual_dir: str = "") -> Iterator[Record]:
    """Every record of a source, bad ones included (with ``error``). Raises BadInput
    (naming the config key) only when the source itself is unusable."""
    if source == "embedded":
        if stage == "caption":
            return  # stage 1 then uses the synthetic captioned shapes
        from data_pipelines.corpus import embedded_documents

        for i, doc in enumerate(embedded_documents()):
            yield Record(doc, None, f"embedded:{i}")
        return
    if source.startswith("tfds:"):
        from data_pipelines.tfds_builders import tfds_records

        yield from tfds_records(source[len("tfds:"):], data_dir, manual_dir, stage)
        return
    folder = Path(source)
    if not folder.is_dir():
        raise BadInput(f"data.source: {source!r} is neither 'embedded', tfds:NAME nor a folder")
    if stage == "caption":
        yield from caption_folder_records(folder)
        return
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".txt", ".jsonl"))
    if not files:
        raise BadInput(f"data.source: {folder} holds no .txt or .jsonl files")
    for path in files:
        yield from text_file_records(path)


def record_problem(record: Record, stage: str, source: str) -> str:
    """Why a record cannot be used ('' when it can)."""
    if record.error:
        return record.error
    if not record.text.strip():
        return "empty text"
    for text in (record.text, record.prompt or ""):
        bad = _CONTROL.search(text)
        if bad:
            return f"control character U+{ord(bad.group()):04X} at offset {bad.start()}"
    if stage == "sft" and source != "embedded" and not (record.prompt or "").strip():
        return "sft needs prompt/response records"
    if stage == "caption" and record.image is None:
        return "caption record without an image"
    return ""


def load_samples(source: str, tokenizer, stage: str, bad_input: str = "skip", data_dir: str = "",
                 manual_dir: str = "") -> tuple[list[Sample], dict]:
    """Tokenized samples of a source for a stage, and counters of what was skipped
    (``skipped`` in all, ``skipped:<reason>`` per kind)."""
    counters = {"records": 0, "skipped": 0}
    samples: list[Sample] = []
    for record in iter_records(source, stage, data_dir, manual_dir):
        counters["records"] += 1
        problem = record_problem(record, stage, source)
        if problem:
            if bad_input == "fail":
                raise BadInput(f"{record.location}: {problem} (data.bad_input=fail)")
            counters["skipped"] += 1
            kind = "skipped:" + problem.split(" (")[0].split(" at ")[0]
            counters[kind] = counters.get(kind, 0) + 1
            log.warning("skipping %s: %s", record.location, problem)
            continue
        if stage == "caption":
            for caption in filter(None, (line.strip() for line in record.text.splitlines())):
                samples.append(Sample(np.asarray(tokenizer.encode(caption), np.int32), None,
                                      record.location, record.image))
            continue
        tokens = np.asarray(tokenizer.encode(record.text), np.int32)
        prompt_tokens = np.asarray(tokenizer.encode(record.prompt), np.int32) if record.prompt else None
        samples.append(Sample(tokens, prompt_tokens, record.location))
    if stage == "sft" and source == "embedded":
        samples = [split_for_sft(s) for s in samples if len(s.tokens) > 16]
    return samples, counters


def split_for_sft(sample: Sample) -> Sample:
    """Embedded stand-in for chat data: the first third of a document is the (rendered)
    query, the rest is the response to reproduce."""
    cut = max(1, len(sample.tokens) // 3)
    return Sample(sample.tokens[cut:], sample.tokens[:cut], sample.location + ":sft")
